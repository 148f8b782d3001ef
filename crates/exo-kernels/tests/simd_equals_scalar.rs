//! Every SIMD path equals the portable scalar reference on random matrices and activations,
//! for every format; and the quantized products stay close to the exact f32 product.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_kernels::{Isa, QuantMatrix, QuantizedActs, WeightFormat, attend_with, matmul_with};
use proptest::prelude::*;

const FORMATS: [WeightFormat; 8] = [
    WeightFormat::F32,
    WeightFormat::F16,
    WeightFormat::BF16,
    WeightFormat::Q8_0,
    WeightFormat::Q4_0,
    WeightFormat::Q4_1,
    WeightFormat::Q5_0,
    WeightFormat::Q5_1,
];

fn product(isa: Isa, w: &QuantMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * w.rows()];
    matmul_with(isa, w, x, n, &mut out, &mut QuantizedActs::new()).unwrap();
    out
}

/// Reference: dequantized weights times exact activations, in f64.
fn exact(w: &QuantMatrix, x: &[f32], n: usize) -> Vec<f64> {
    let mut row = vec![0f32; w.cols()];
    let mut out = vec![0f64; n * w.rows()];
    for r in 0..w.rows() {
        w.dequantize_row(r, &mut row).unwrap();
        for t in 0..n {
            out[t * w.rows() + r] = row
                .iter()
                .zip(&x[t * w.cols()..(t + 1) * w.cols()])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
        }
    }
    out
}

/// Reproducible values in -1..=1 (xorshift).
fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 2001) as f32 / 1000.0 - 1.0
    }
}

/// A matrix with f32 activations (`acts` 0), 8-bit ones (1) or two 8-bit planes (2).
fn with_acts(w: QuantMatrix, acts: u8) -> QuantMatrix {
    match acts {
        0 => w.with_f32_activations(),
        1 => w.with_q8_activations(),
        // The format's default on this CPU.
        3 => w,
        _ => w.with_q16_activations(),
    }
}

fn check(format: WeightFormat, acts: u8, rows: usize, blocks: usize, n: usize, seed: u64) {
    let cols = blocks * 32;
    let mut next = uniform(seed);
    let values: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
    let x: Vec<f32> = (0..n * cols).map(|_| next() * 3.0).collect();
    let w = with_acts(
        QuantMatrix::from_f32(format, rows, cols, &values).unwrap(),
        acts,
    );
    let reference = product(Isa::Scalar, &w, &x, n);
    let scale: f32 = x.iter().map(|v| v.abs()).sum::<f32>() / n as f32;
    for isa in Isa::supported() {
        let got = product(isa, &w, &x, n);
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale + 1e-5,
                "{format} {isa:?} output {i}: {a} vs scalar {b}"
            );
        }
    }
    // 8-bit activations move each value by at most half a step (amax / 254 of its block), so
    // the error is bounded by the weights' magnitudes times those half-steps.
    let exact = exact(&w, &x, n);
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        w.dequantize_row(r, &mut row).unwrap();
        for t in 0..n {
            let xs = &x[t * cols..(t + 1) * cols];
            let bound: f64 = if !w.uses_q8_activations() {
                1e-4 * row
                    .iter()
                    .zip(xs)
                    .map(|(a, b)| (a * b).abs() as f64)
                    .sum::<f64>()
                    + 1e-5
            } else {
                // Two planes: half a step of the second, 254 times finer.
                let step = if w.uses_q16_activations() {
                    254.0 * 254.0
                } else {
                    254.0
                };
                row.chunks(32)
                    .zip(xs.chunks(32))
                    .map(|(wb, xb)| {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        wb.iter().map(|v| v.abs() as f64).sum::<f64>() * amax / step * 1.001
                    })
                    .sum::<f64>()
                    + 1e-5
                        * row
                            .iter()
                            .zip(xs)
                            .map(|(a, b)| (a * b).abs() as f64)
                            .sum::<f64>()
                    + 1e-4
            };
            let (a, b) = (reference[t * rows + r] as f64, exact[t * rows + r]);
            assert!(
                (a - b).abs() <= bound,
                "{format}: row {r}: {a} vs exact {b}, bound {bound}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn simd_paths_equal_the_scalar_reference(
        format in prop::sample::select(FORMATS.to_vec()),
        rows in 1usize..40,
        blocks in 1usize..9,
        n in 1usize..10,
        acts in 0u8..3,
        seed in any::<u64>(),
    ) {
        check(format, acts, rows, blocks, n, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn attention_paths_equal_the_scalar_reference_and_an_f64_softmax(
        hd in 1usize..80,
        heads in 1usize..4,
        visible in 0usize..70,
        seed in any::<u64>(),
    ) {
        let stride = hd * heads;
        let mut next = uniform(seed);
        let q: Vec<f32> = (0..hd).map(|_| next() * 2.0).collect();
        let keys: Vec<f32> = (0..visible * stride).map(|_| next()).collect();
        let values: Vec<f32> = (0..visible * stride).map(|_| next() * 3.0).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        // The last head of the interleaved caches: keys start `(heads - 1) * hd` in.
        let off = (heads - 1) * hd;
        let (k, v) = if visible == 0 { (&keys[..], &values[..]) } else { (&keys[off..], &values[off..]) };
        let run = |isa| {
            let (mut scores, mut out) = (vec![0f32; visible], vec![0f32; hd]);
            attend_with(isa, &q, k, v, stride, visible, scale, &mut scores, &mut out).unwrap();
            out
        };
        let reference = run(Isa::Scalar);
        // f64 softmax-weighted values.
        let logits: Vec<f64> = (0..visible)
            .map(|j| (0..hd).map(|i| q[i] as f64 * k[j * stride + i] as f64).sum::<f64>() * scale as f64)
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = w.iter().sum();
        for i in 0..hd {
            let want: f64 = (0..visible).map(|j| w[j] / total * v[j * stride + i] as f64).sum();
            prop_assert!((reference[i] as f64 - want).abs() < 1e-4, "scalar {} vs f64 {want}", reference[i]);
        }
        for isa in Isa::supported() {
            let got = run(isa);
            for (a, b) in got.iter().zip(&reference) {
                prop_assert!((a - b).abs() <= 1e-5, "{isa:?}: {a} vs scalar {b}");
            }
        }
    }
}

/// Random K-quant super-blocks (`rows * blocks` of them) with sane f16 scales: any other bytes
/// are a valid block.
fn k_quant_bytes(format: WeightFormat, rows: usize, blocks: usize, seed: u64) -> Vec<u8> {
    let block = format.ggml_block_bytes();
    let mut state = seed | 1;
    let mut bytes: Vec<u8> = (0..rows * blocks * block)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let scale_offsets: &[usize] = match format {
        WeightFormat::Q4K | WeightFormat::Q5K => &[0, 2],
        _ => &[208],
    };
    for b in 0..rows * blocks {
        for &o in scale_offsets {
            let v = 0.001 * (1 + (b * 7 + o) % 13) as f32;
            let half = half::f16::from_f32(v).to_le_bytes();
            bytes[b * block + o..b * block + o + 2].copy_from_slice(&half);
        }
    }
    bytes
}

/// Every path's product of `w` with `x` (`n` rows) equals the scalar path's, within rounding of
/// the terms' magnitudes, and the scalar path equals dequantized weights times `x` in f64
/// (within half an 8-bit step of each activation where the matrix takes 8-bit activations).
fn check_matrix(w: &QuantMatrix, x: &[f32], n: usize) {
    let (rows, cols) = (w.rows(), w.cols());
    let reference = product(Isa::Scalar, w, x, n);
    let exact = exact(w, x, n);
    let mut row = vec![0f32; cols];
    let mut magnitude = vec![0f64; n * rows];
    let mut q8_error = vec![0f64; n * rows];
    // Half a step of the activations' last plane (254 times finer with two planes).
    let step = if w.uses_q16_activations() {
        254.0 * 254.0
    } else {
        254.0
    };
    for r in 0..rows {
        w.dequantize_row(r, &mut row).unwrap();
        for t in 0..n {
            let xs = &x[t * cols..(t + 1) * cols];
            magnitude[t * rows + r] = row.iter().zip(xs).map(|(a, b)| (a * b).abs() as f64).sum();
            q8_error[t * rows + r] = row
                .chunks(32)
                .zip(xs.chunks(32))
                .map(|(wb, xb)| {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    wb.iter().map(|v| v.abs() as f64).sum::<f64>() * amax / step * 1.001
                })
                .sum();
        }
    }
    let q8 = w.uses_q8_activations();
    for (i, (a, b)) in reference.iter().zip(&exact).enumerate() {
        let bound = 1e-5 * magnitude[i] + 1e-5 + if q8 { q8_error[i] + 1e-4 } else { 0.0 };
        assert!(
            (*a as f64 - b).abs() <= bound,
            "scalar output {i}: {a} vs exact {b}"
        );
    }
    for isa in Isa::supported() {
        let got = product(isa, w, x, n);
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            let bound = 2e-5 * magnitude[i] + 1e-5;
            assert!(
                ((a - b).abs() as f64) <= bound,
                "{:?} {isa:?} output {i}: {a} vs scalar {b}",
                w.formats()
            );
        }
    }
}

fn activations(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut next = uniform(seed);
    (0..n * cols).map(|_| next() * 3.0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn k_quant_paths_equal_the_scalar_reference(
        format in prop::sample::select(vec![WeightFormat::Q4K, WeightFormat::Q5K, WeightFormat::Q6K]),
        rows in 1usize..14,
        blocks in 1usize..4,
        n in 1usize..10,
        acts in 0u8..3,
        seed in any::<u64>(),
    ) {
        let cols = blocks * 256;
        let bytes = k_quant_bytes(format, rows, blocks, seed);
        let w = with_acts(QuantMatrix::from_ggml(format, rows, cols, &bytes).unwrap(), acts);
        prop_assert_eq!(w.uses_q8_activations(), acts > 0);
        prop_assert_eq!(w.uses_q16_activations(), acts > 1);
        check_matrix(&w, &activations(n, cols, seed ^ 5), n);
    }

    #[test]
    fn mixed_format_stacks_equal_their_parts(
        picks in prop::collection::vec((0usize..8, 1usize..7), 1..5),
        n in 1usize..7,
        acts in 0u8..3,
        seed in any::<u64>(),
    ) {
        let cols = 512;
        let mut next = uniform(seed);
        let parts: Vec<QuantMatrix> = picks
            .iter()
            .enumerate()
            .map(|(i, &(f, rows))| {
                let format = [
                    WeightFormat::Q4K,
                    WeightFormat::Q6K,
                    WeightFormat::Q4_1,
                    WeightFormat::Q8_0,
                    WeightFormat::F16,
                    WeightFormat::Q4_0,
                    WeightFormat::Q5K,
                    WeightFormat::BF16,
                ][f];
                let m = if matches!(format, WeightFormat::Q4K | WeightFormat::Q5K | WeightFormat::Q6K) {
                    let bytes = k_quant_bytes(format, rows, cols / 256, seed ^ i as u64);
                    QuantMatrix::from_ggml(format, rows, cols, &bytes).unwrap()
                } else {
                    let values: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
                    QuantMatrix::from_f32(format, rows, cols, &values).unwrap()
                };
                with_acts(m, acts)
            })
            .collect();
        let stacked = QuantMatrix::stack(&parts).unwrap();
        let total: usize = parts.iter().map(QuantMatrix::rows).sum();
        prop_assert_eq!(stacked.rows(), total);
        let x = activations(n, cols, seed ^ 9);
        for isa in Isa::supported() {
            let got = product(isa, &stacked, &x, n);
            // Equal to rounding: a task's rows may start inside a part, so rows can be grouped
            // in fours differently than when the part runs alone.
            let mut base = 0;
            let mut row = vec![0f32; cols];
            for p in &parts {
                let alone = product(isa, p, &x, n);
                for r in 0..p.rows() {
                    p.dequantize_row(r, &mut row).unwrap();
                    for t in 0..n {
                        let magnitude: f32 = row
                            .iter()
                            .zip(&x[t * cols..(t + 1) * cols])
                            .map(|(a, b)| (a * b).abs())
                            .sum();
                        let (a, b) = (got[t * total + base + r], alone[t * p.rows() + r]);
                        prop_assert!(
                            (a - b).abs() <= 2e-5 * magnitude + 1e-5,
                            "{:?} {:?} token {} row {}: {} vs {}", isa, stacked.formats(), t, base + r, a, b
                        );
                    }
                }
                base += p.rows();
            }
        }
        // Rows decode from the part that holds them.
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        let mut base = 0;
        for p in &parts {
            for r in 0..p.rows() {
                stacked.dequantize_row(base + r, &mut a).unwrap();
                p.dequantize_row(r, &mut b).unwrap();
                prop_assert_eq!(&a, &b);
            }
            base += p.rows();
        }
    }
}

#[test]
fn a_q4_k_m_style_mix_stacks_into_one_matrix_of_parts() {
    // q and k in Q4_K, v in Q6_K: a Q4_K_M layer's attention (the load that used to fail).
    let cols = 512;
    let q = QuantMatrix::from_ggml(
        WeightFormat::Q4K,
        64,
        cols,
        &k_quant_bytes(WeightFormat::Q4K, 64, 2, 1),
    )
    .unwrap();
    let k = QuantMatrix::from_ggml(
        WeightFormat::Q4K,
        16,
        cols,
        &k_quant_bytes(WeightFormat::Q4K, 16, 2, 2),
    )
    .unwrap();
    let v = QuantMatrix::from_ggml(
        WeightFormat::Q6K,
        16,
        cols,
        &k_quant_bytes(WeightFormat::Q6K, 16, 2, 3),
    )
    .unwrap();
    let qkv = QuantMatrix::stack(&[q.clone(), k.clone(), v.clone()]).unwrap();
    assert_eq!(qkv.formats(), [WeightFormat::Q4K, WeightFormat::Q6K]);
    assert_eq!(qkv.rows(), 96);
    assert_eq!(qkv.bytes(), q.bytes() + k.bytes() + v.bytes());
    check_matrix(&qkv, &activations(5, cols, 4), 5);
    // Different widths are still an error, and say which widths.
    let narrow = QuantMatrix::from_f32(WeightFormat::Q8_0, 2, 256, &[0.5; 512]).unwrap();
    let err = QuantMatrix::stack(&[q, narrow]).unwrap_err().to_string();
    assert!(err.contains("512") && err.contains("256"), "{err}");
}

#[test]
fn large_k_quant_and_mixed_shapes_split_across_threads_agree() {
    let cols = 1024;
    let q4k = QuantMatrix::from_ggml(
        WeightFormat::Q4K,
        300,
        cols,
        &k_quant_bytes(WeightFormat::Q4K, 300, 4, 11),
    )
    .unwrap();
    let q6k = QuantMatrix::from_ggml(
        WeightFormat::Q6K,
        90,
        cols,
        &k_quant_bytes(WeightFormat::Q6K, 90, 4, 12),
    )
    .unwrap();
    for acts in 0..3 {
        let (q4k, q6k) = (with_acts(q4k.clone(), acts), with_acts(q6k.clone(), acts));
        check_matrix(&q4k, &activations(6, cols, 13), 6);
        check_matrix(&q6k, &activations(9, cols, 14), 9);
        let mixed = QuantMatrix::stack(&[q4k, q6k]).unwrap();
        check_matrix(&mixed, &activations(7, cols, 15), 7);
    }
}

#[test]
fn large_shapes_split_across_threads_agree() {
    // Big enough to take the multi-threaded path.
    for format in FORMATS {
        check(format, 0, 300, 18, 6, 99);
        check(format, 1, 300, 18, 9, 98);
        check(format, 2, 300, 18, 7, 97);
    }
}

#[test]
fn eight_token_tiles_and_their_remainders_equal_the_scalar_reference() {
    // Prefill and batches of eight tokens or more take AVX2's one-row-by-eight-tokens kernel
    // for Q4_0, Q4_1 and Q8_0 on f32 activations (and two-plane Q4_1, which takes f32
    // activations for four tokens or more, and by default on AVX2 Q4_0, whose products of
    // eight tokens or more take f32 activations there); the tokens after the last eight take the
    // 2 x 4 and single-token kernels. Rows that do not fill a group of four take the single-row
    // path.
    for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0] {
        for acts in [0, 2, 3] {
            for (rows, n) in [(8, 8), (12, 9), (7, 16), (20, 19)] {
                check(format, acts, rows, 5, n, 41 + n as u64);
            }
        }
    }
}

#[test]
fn sixteen_row_panels_and_their_remainders_equal_the_scalar_reference() {
    // On AVX-512 VNNI, products of two tokens or more (twelve for 16-bit floats) take the
    // panel kernels sixteen rows at a time, in chunks of 16, 8, 4, 2 and 1 tokens; rows after
    // the last whole panel take the four-row tiles. Block counts below and above four cover the
    // panel's transposed scales and its gathered last ones; Q5 covers the fifth bits, Q4_1 and
    // Q5_1 the minimums.
    let shapes = [
        (16, 8, 5),
        (37, 31, 9),
        (48, 9, 4),
        (33, 16, 3),
        (32, 3, 2),
        (17, 2, 1),
    ];
    for format in [
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
    ] {
        for acts in [1, 2, 3] {
            for (rows, n, blocks) in shapes {
                check(format, acts, rows, blocks, n, 7 * n as u64 + rows as u64);
            }
        }
    }
    // Long rows take the tokens in blocks (here of sixteen: 8,192 columns with two planes).
    check(WeightFormat::Q4_1, 2, 17, 256, 40, 5);
    check(WeightFormat::Q4_0, 1, 16, 256, 70, 6);
    // 16-bit floats take f32 activations; a column count that is not a multiple of eight
    // covers the panel's columns widened one by one.
    for format in [WeightFormat::F16, WeightFormat::BF16] {
        for (rows, n, blocks) in shapes {
            check(format, 0, rows, blocks, n, n as u64);
        }
        let mut next = uniform(3);
        let values: Vec<f32> = (0..35 * 36).map(|_| next()).collect();
        let w = QuantMatrix::from_f32(format, 35, 36, &values).unwrap();
        check_matrix(&w, &activations(21, 36, 4), 21);
    }
    for format in [WeightFormat::Q4K, WeightFormat::Q5K, WeightFormat::Q6K] {
        for acts in [1, 2] {
            for (rows, n, blocks) in shapes {
                let blocks = blocks.div_ceil(3);
                let bytes = k_quant_bytes(format, rows, blocks, rows as u64);
                let w = QuantMatrix::from_ggml(format, rows, blocks * 256, &bytes).unwrap();
                let w = with_acts(w, acts);
                check_matrix(&w, &activations(n, blocks * 256, n as u64), n);
            }
        }
    }
}

#[test]
fn q8_0_weights_from_ggml_bytes_decode_like_the_format_says() {
    // One block: scale 0.5 (f16 0x3800), quants 0..31.
    let mut bytes = vec![0x00, 0x38];
    bytes.extend((0..32u8).map(|q| q.wrapping_sub(16)));
    let w = QuantMatrix::from_ggml(WeightFormat::Q8_0, 1, 32, &bytes).unwrap();
    let mut row = vec![0f32; 32];
    w.dequantize_row(0, &mut row).unwrap();
    assert_eq!(row[0], -8.0);
    assert_eq!(row[31], 7.5);
    assert!(QuantMatrix::from_ggml(WeightFormat::Q8_0, 1, 32, &bytes[..33]).is_err());
    assert!(QuantMatrix::from_ggml(WeightFormat::Q4_1, 1, 48, &[0; 40]).is_err());
}

#[test]
fn stacking_matrices_stacks_their_outputs() {
    let a = QuantMatrix::from_f32(WeightFormat::Q4_1, 3, 64, &vec![0.25; 192]).unwrap();
    let b = QuantMatrix::from_f32(WeightFormat::Q4_1, 2, 64, &vec![-0.5; 128]).unwrap();
    let both = QuantMatrix::stack(&[a.clone(), b.clone()]).unwrap();
    let x = vec![1.0f32; 64];
    let mut out = product(Isa::detected(), &a, &x, 1);
    out.extend(product(Isa::detected(), &b, &x, 1));
    assert_eq!(product(Isa::detected(), &both, &x, 1), out);
}

#[test]
fn concurrent_callers_get_their_own_results() {
    // Several threads sharing the kernel pool (several requests decoding at once).
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                for round in 0..20 {
                    check(
                        WeightFormat::Q4_1,
                        0,
                        256,
                        18,
                        1 + (i + round) % 6,
                        (i * 100 + round) as u64,
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn k_quant_rows_compute_what_they_decode_to() {
    // Any bytes are a valid K-quant block once its f16 scales are sane numbers.
    for (format, block, scale_offsets) in [
        (WeightFormat::Q4K, 144usize, vec![0usize, 2]),
        (WeightFormat::Q6K, 210, vec![208]),
    ] {
        let (rows, blocks) = (6, 2);
        let mut bytes: Vec<u8> = (0..rows * blocks * block)
            .map(|i| (i * 7919 % 251) as u8)
            .collect();
        for b in 0..rows * blocks {
            for &o in &scale_offsets {
                let half = half::f16::from_f32(0.01 * (1 + b % 5) as f32).to_le_bytes();
                bytes[b * block + o..b * block + o + 2].copy_from_slice(&half);
            }
        }
        let cols = blocks * 256;
        let w = QuantMatrix::from_ggml(format, rows, cols, &bytes)
            .unwrap()
            .with_f32_activations();
        let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        let got = product(Isa::detected(), &w, &x, 1);
        let want = exact(&w, &x, 1);
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() <= 1e-3 * b.abs().max(1.0),
                "{format}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn each_architecture_offers_its_own_simd_paths_only() {
    let supported = Isa::supported();
    assert!(supported.contains(&Isa::Scalar));
    let capped = std::env::var("EXO_KERNELS_ISA").as_deref() == Ok("scalar");
    if cfg!(target_arch = "aarch64") {
        // NEON is part of the aarch64 baseline, so every aarch64 CPU runs it.
        assert_eq!(supported.contains(&Isa::Neon), !capped, "{supported:?}");
        assert_eq!(
            Isa::detected(),
            if capped { Isa::Scalar } else { Isa::Neon }
        );
        assert!(!supported.contains(&Isa::Avx2) && !supported.contains(&Isa::Avx512Vnni));
    } else {
        assert!(!supported.contains(&Isa::Neon), "{supported:?}");
        assert!(!Isa::Neon.is_supported());
    }
    assert_eq!(Isa::Neon.name(), "neon");
}

#[test]
fn x86_paths_take_quantized_activations_by_default_where_their_kernels_measured_faster() {
    use WeightFormat::{F16, Q4_0, Q4_1, Q4K, Q5_0, Q5_1, Q5K, Q6K, Q8_0};
    let choice = std::env::var("EXO_KERNELS_ACTS").unwrap_or_default();
    // Formats with one 8-bit plane, with two, and with f32 activations by default.
    let (one, two, f32): (&[WeightFormat], &[WeightFormat], &[WeightFormat]) = match Isa::detected()
    {
        // AVX2's integer kernels; Q8_0 measured no faster with bytes there. Q5 blocks have
        // only 8-bit-activation kernels.
        Isa::Avx2 => (&[Q4K, Q5K, Q6K, Q4_0, Q5_0, Q5_1], &[Q4_1], &[Q8_0, F16]),
        // The VNNI kernels (AVX2's for Q4_K/Q5_K with two planes); two planes where the
        // default model's golden logits need them.
        Isa::Avx512Vnni => (&[Q4K, Q5K, Q6K, Q4_0, Q5_0, Q5_1], &[Q4_1, Q8_0], &[F16]),
        _ => return,
    };
    if !choice.is_empty() {
        return;
    }
    let matrix = |format: WeightFormat| {
        if matches!(format, Q4K | Q5K | Q6K) {
            QuantMatrix::from_ggml(format, 2, 256, &k_quant_bytes(format, 2, 1, 7)).unwrap()
        } else {
            QuantMatrix::from_f32(format, 2, 32, &[0.25; 64]).unwrap()
        }
    };
    for &format in one {
        let w = matrix(format);
        assert!(
            w.uses_q8_activations() && !w.uses_q16_activations(),
            "{format}"
        );
    }
    for &format in two {
        let w = matrix(format);
        assert!(
            w.uses_q8_activations() && w.uses_q16_activations(),
            "{format}"
        );
    }
    for &format in f32 {
        assert!(!matrix(format).uses_q8_activations(), "{format}");
    }
    // The opt-out, per matrix.
    assert!(!matrix(Q4K).with_f32_activations().uses_q8_activations());
}

#[test]
fn q5_blocks_on_every_path_equal_the_scalar_reference() {
    // Decode (one token), a four-token tile and a ragged prefill, with each activation kind,
    // on shapes with and without whole groups of four rows.
    for format in [WeightFormat::Q5_0, WeightFormat::Q5_1] {
        for acts in 0..3 {
            for (rows, blocks, n) in [(4, 1, 1), (9, 3, 1), (8, 18, 4), (13, 5, 7), (36, 2, 33)] {
                for seed in 1..4 {
                    check(format, acts, rows, blocks, n, seed * 7919 + rows as u64);
                }
            }
        }
    }
}
