//! Decode and prefill throughput of each format on matrices too big for the caches (a set of
//! 1B-model-sized matrices cycled through), in weights per second and bytes per second.
//! `cargo run --release -p exo-kernels --example throughput -- THREADS`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_kernels::{QuantMatrix, QuantizedActs, WeightFormat, matmul};
use std::time::Instant;

fn k_bytes(format: WeightFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let block = format.ggml_block_bytes();
    let blocks = rows * cols / 256;
    let mut state = seed | 1;
    let mut bytes: Vec<u8> = (0..blocks * block)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let offs: &[usize] = if format == WeightFormat::Q6K {
        &[208]
    } else {
        &[0, 2]
    };
    for b in 0..blocks {
        for &o in offs {
            bytes[b * block + o..b * block + o + 2]
                .copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
        }
    }
    bytes
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    exo_kernels::set_threads(threads);
    let only: Option<String> = std::env::args().nth(2);
    // With a fourth argument, only that token count, that many repetitions (for `perf stat`).
    let fixed: Option<(usize, usize)> = std::env::args()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .zip(std::env::args().nth(4).and_then(|r| r.parse().ok()));
    // `EXO_SHAPE=ROWSxCOLSxCOUNT` for other shapes (the default model's: 1536x576x60).
    let shape: Vec<usize> = std::env::var("EXO_SHAPE")
        .unwrap_or_default()
        .split('x')
        .filter_map(|v| v.parse().ok())
        .collect();
    let (rows, cols, count) = match shape[..] {
        [r, c, n] => (r, c, n as u64),
        _ => (8192, 2048, 12),
    };
    for format in [
        WeightFormat::Q4K,
        WeightFormat::Q6K,
        WeightFormat::Q5K,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::F16,
        WeightFormat::BF16,
    ] {
        if only.as_deref().is_some_and(|o| o != format.name()) {
            continue;
        }
        let ms: Vec<QuantMatrix> = (0..count)
            .map(|i| match format {
                WeightFormat::Q4K | WeightFormat::Q5K | WeightFormat::Q6K => {
                    QuantMatrix::from_ggml(format, rows, cols, &k_bytes(format, rows, cols, i + 1))
                        .unwrap()
                }
                _ => {
                    let v: Vec<f32> = (0..rows * cols)
                        .map(|j| ((j * 2654435761 + i as usize) % 1000) as f32 / 1000.0 - 0.5)
                        .collect();
                    QuantMatrix::from_f32(format, rows, cols, &v).unwrap()
                }
            })
            .collect();
        let bytes: usize = ms.iter().map(QuantMatrix::bytes).sum();
        let mut acts = QuantizedActs::new();
        let runs = match fixed {
            Some((n, reps)) => vec![(n, reps)],
            None => vec![(1, 6), (32, 1)],
        };
        // Integer formats run three times: with f32 activations, 8-bit ones, and two 8-bit
        // planes.
        let kinds: &[u8] = if matches!(
            format,
            WeightFormat::F16 | WeightFormat::BF16 | WeightFormat::F32
        ) {
            &[0]
        } else {
            &[0, 1, 2]
        };
        let default = match (ms[0].uses_q8_activations(), ms[0].uses_q16_activations()) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        for &kind in kinds {
            let ms: Vec<QuantMatrix> = ms
                .iter()
                .map(|m| match kind {
                    0 => m.clone().with_f32_activations(),
                    1 => m.clone().with_q8_activations(),
                    _ => m.clone().with_q16_activations(),
                })
                .collect();
            let label = match (kind, kinds.len() > 1) {
                (_, false) => "",
                (0, true) => " f32-acts",
                (1, true) => " q8-acts ",
                _ => " q16-acts",
            };
            let mark = if kinds.len() > 1 && kind == default {
                " (default)"
            } else {
                ""
            };
            for &(n, reps) in &runs {
                let x: Vec<f32> = (0..n * cols).map(|j| (j % 7) as f32 * 0.1 - 0.3).collect();
                let mut out = vec![0f32; n * rows];
                let mut best = f64::MAX;
                if reps == 0 {
                    continue;
                }
                for _ in 0..reps {
                    let start = Instant::now();
                    for m in &ms {
                        matmul(m, &x, n, &mut out, &mut acts).unwrap();
                    }
                    best = best.min(start.elapsed().as_secs_f64());
                }
                let weights = (count as usize * rows * cols) as f64;
                println!(
                    "{:5}{label} n={n:2} threads={threads}: {:6.2} Gweights/s {:6.2} GB/s ({:.3} bytes/weight){mark}",
                    format.name(),
                    weights * n as f64 / best / 1e9,
                    bytes as f64 / best / 1e9,
                    bytes as f64 / weights
                );
            }
        }
    }
}
