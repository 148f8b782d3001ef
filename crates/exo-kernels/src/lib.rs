//! Quantized CPU kernels for exo-rs: weight matrices kept in their compact formats (Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, f16, bf16, f32) and matrix-vector / matrix-matrix products
//! that compute on the quantized blocks. The integer formats take activations either as f32 or
//! quantized to 8-bit blocks of 32 (one plane, or two for about 15 bits: see
//! [`QuantMatrix::with_q8_activations`]); on AVX2 and AVX-512 quantized is the default for the
//! formats where byte products measured faster, f32 elsewhere. On AVX-512 with VNNI the 32-blocks
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) take four blocks per step with `vpdpbusd`, and Q4_K, Q5_K and
//! Q6_K have their own VNNI kernels, rows asked for from memory ahead of their use.
//!
//! The instruction set is chosen at run time ([`Isa`]): on x86-64 AVX-512 with VNNI or AVX2 +
//! FMA, on aarch64 NEON (with the dot-product extension's SDOT for 8-bit activations where the
//! CPU has it), or the portable scalar code that is always compiled and against which the SIMD
//! paths are tested. Formats without a kernel on a path (f16 and the K-quants on NEON) take the
//! scalar code there. [`attend`] is one head of attention over cached keys and values, on the
//! same paths.
//! Work is split across cores by output rows on a small persistent pool whose idle workers spin
//! only briefly before parking, so a busy machine does not make them collapse.
//!
//! This crate knows numbers in memory and nothing else: no files, no burn, no model structure.

mod acts;
mod attn;
mod decode;
mod error;
pub mod ggml;
mod matrix;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pool;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_panel;
#[cfg(target_arch = "x86_64")]
mod x86_q8;
#[cfg(target_arch = "x86_64")]
mod x86_vnni;

use std::sync::OnceLock;

pub use acts::QuantizedActs;
pub use attn::{attend, attend_with};
pub use error::{Error, Result};
pub use matrix::{QuantMatrix, WeightFormat};
pub use pool::{set_threads, threads};

use matrix::Storage;

/// An instruction-set path of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, always available.
    Scalar,
    /// AVX2 with FMA (and F16C for f16 weights).
    Avx2,
    /// AVX-512 F/BW/DQ with VNNI.
    Avx512Vnni,
    /// aarch64 NEON (Advanced SIMD); 8-bit activations use SDOT where the CPU has the
    /// dot-product extension and widening multiplies where it does not. f16 and K-quant weights
    /// take the scalar code on this path.
    Neon,
}

impl Isa {
    /// The best path this CPU supports, detected once.
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = [Isa::Avx512Vnni, Isa::Avx2, Isa::Neon]
                .into_iter()
                .find(|isa| isa.is_supported());
            best.unwrap_or(Isa::Scalar)
        })
    }

    /// Every path this CPU can run (for tests and benchmarks).
    pub fn supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Neon]
            .into_iter()
            .filter(|i| i.is_supported())
            .collect()
    }

    /// Whether this CPU can run the path. Decided from the CPU's feature flags for exactly the
    /// instructions the path uses; an `EXO_KERNELS_ISA` of `scalar` caps the choice to scalar
    /// code, and `avx2` caps x86 to AVX2. The x86 paths are never supported on aarch64, nor NEON
    /// on x86.
    pub fn is_supported(self) -> bool {
        // Read once: every kernel call asks, and reading the environment locks and allocates.
        static CAP: OnceLock<String> = OnceLock::new();
        let cap = CAP.get_or_init(|| std::env::var("EXO_KERNELS_ISA").unwrap_or_default());
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                cap != "scalar"
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                cap.is_empty()
                    && Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("bmi2")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => cap != "scalar" && std::arch::is_aarch64_feature_detected!("neon"),
            _ => false,
        }
    }

    /// The path's name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Neon => "neon",
        }
    }
}

/// Whether this product takes `w`'s (one part's) activations quantized: as the matrix asks,
/// except that a two-plane matrix takes f32 ones where the caller set `fine_as_f32` (if its
/// format has f32 kernels: Q5 blocks keep their integer kernels).
pub(crate) fn takes_q8(w: &QuantMatrix, a: &QuantizedActs) -> bool {
    w.q8_acts
        && !(w.fine && a.fine_as_f32 && w.format.has_f32_kernels())
        && !(w.tiles_f32 && a.rows >= 8)
}

/// One output value with the chosen path (`isa` must be supported; callers check).
#[inline]
fn dot(isa: Isa, w: &QuantMatrix, row: usize, a: &QuantizedActs, t: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
        use BlockKind::{Q4, Q8};
        let (cols, nb) = (w.cols, w.cols / 32);
        let wide = isa == Isa::Avx512Vnni;
        let x = &a.f[t * cols..(t + 1) * cols];
        // SAFETY (every call below): `isa` was checked as supported by the CPU before dispatch,
        // and every slice covers exactly `nb` blocks of this row and this token.
        if let Some((wd, wm, wq, kind)) = int_rows(w, row, 1) {
            if !takes_q8(w, a) {
                let r = row_args(wd, wm, wq, a, 0, 0, 0);
                let xsum = &a.fsum[t * nb..(t + 1) * nb];
                return unsafe {
                    match (kind, wide) {
                        (Q4 { offset }, true) => x86::dot_q4_f32_avx512(&r, x, xsum, nb, offset),
                        (Q4 { offset }, false) => x86::dot_q4_f32_avx2(&r, x, xsum, nb, offset),
                        (Q8, true) => x86::dot_q8_f32_avx512(&r, x, nb),
                        (Q8, false) => x86::dot_q8_f32_avx2(&r, x, nb),
                    }
                };
            }
            let [[v]] = int_q8_rows::<1, 1>(w, row, a, t);
            return v;
        }
        if let Some([[v]]) = q5_rows::<1, 1>(isa, w, row, a, t) {
            return v;
        }
        if let Storage::F32(v) = &w.storage {
            return unsafe { x86::dot_f32_avx2(&v[row * cols..(row + 1) * cols], x) };
        }
        // K-quants and 16-bit floats (after the 4- and 8-bit blocks: a decode step takes this
        // path once per output row).
        if let Some([[v]]) = tiled_rows::<1, 1>(isa, w, row, a, t) {
            return v;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        if let Some([v]) = neon_rows::<1>(w, row, a, t) {
            return v;
        }
        if let Storage::F32(v) = &w.storage {
            let cols = w.cols;
            // SAFETY: `isa` was checked as supported (NEON) before dispatch; both slices hold
            // `cols` values.
            return unsafe {
                neon::dot_f32(&v[row * cols..(row + 1) * cols], &a.f[t * cols..][..cols])
            };
        }
    }
    let _ = isa;
    scalar::dot(w, row, a, t)
}

/// Rows `row..row + R` of an integer-format matrix against activation row `t` with the NEON
/// kernels (f32 or 8-bit activations, as the matrix asks); `None` for other formats.
#[cfg(target_arch = "aarch64")]
fn neon_rows<const R: usize>(
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[f32; R]> {
    let (cols, nb) = (w.cols, w.cols / 32);
    let (wd, wm, wq, kind) = int_rows(w, row, R)?;
    if takes_q8(w, a) && w.fine {
        // Two planes: the scalar code.
        return None;
    }
    if takes_q8(w, a) {
        let r = row_args(wd, wm, wq, a, t * nb, t * nb * 32, nb);
        // SAFETY: the caller checked NEON as supported; `r` holds `R` rows of `nb` blocks and
        // the `nb` activation blocks of token `t`.
        return Some(unsafe { neon::dot_q8_acts::<R>(&r, nb, kind) });
    }
    let r = row_args(wd, wm, wq, a, 0, 0, 0);
    let x = &a.f[t * cols..(t + 1) * cols];
    let xsum = &a.fsum[t * nb..(t + 1) * nb];
    // SAFETY: as above; `x` holds `nb * 32` values and `xsum` `nb` sums.
    Some(unsafe { neon::dot_f32_acts::<R>(&r, x, xsum, nb, kind) })
}

/// Rows `row..row + R` against activation rows `t..t + T` with the x86 kernels written for
/// any tile: K-quants and 16-bit floats on both paths, and on AVX2 also Q4_0/Q4_1/Q8_0 with f32
/// or quantized activations (AVX-512 has its own kernels for those). `None` for other formats
/// or paths.
#[cfg(target_arch = "x86_64")]
fn x86_rows<const R: usize, const T: usize>(
    isa: Isa,
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[[f32; T]; R]> {
    if let Some(v) = tiled_rows::<R, T>(isa, w, row, a, t) {
        return Some(v);
    }
    if isa != Isa::Avx2 {
        return None;
    }
    let nb = w.cols / 32;
    let (wd, wm, wq, kind) = int_rows(w, row, R)?;
    if takes_q8(w, a) {
        return Some(int_q8_rows::<R, T>(w, row, a, t));
    }
    let r = row_args(wd, wm, wq, a, 0, 0, 0);
    let (x, xsum) = (a.f32_rows::<T>(t), a.f32_sums::<T>(t));
    // SAFETY: the caller checked AVX2 as supported; `r` holds `R` whole rows, each `x` `cols`
    // values and each `xsum` `nb` sums.
    Some(unsafe { x86::int_rows_avx2::<R, T>(&r, x, xsum, nb, kind) })
}

/// Rows `row..row + count` of a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix as the 8-bit-activation
/// kernels read them, with the block kind; `None` for other formats.
#[cfg(target_arch = "x86_64")]
fn int_q8_parts(w: &QuantMatrix, row: usize, count: usize) -> Option<(x86_q8::IntRows<'_>, u8)> {
    use x86_q8::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
    let nb = w.cols / 32;
    if let Storage::Q5 { d, m, qh, q } = &w.storage {
        let blocks = row * nb..(row + count) * nb;
        let rows = x86_q8::IntRows {
            wd: &d[blocks.clone()],
            wm: if m.is_empty() {
                &[]
            } else {
                &m[blocks.clone()]
            },
            wq: &q[row * nb * 16..(row + count) * nb * 16],
            wh: &qh[blocks],
        };
        return Some((rows, if m.is_empty() { Q5_0 } else { Q5_1 }));
    }
    let (wd, wm, wq, kind) = int_rows(w, row, count)?;
    let kind = match kind {
        BlockKind::Q4 { offset: true } => Q4_0,
        BlockKind::Q4 { offset: false } => Q4_1,
        BlockKind::Q8 => Q8_0,
    };
    Some((
        x86_q8::IntRows {
            wd,
            wm,
            wq,
            wh: &[],
        },
        kind,
    ))
}

/// Rows `row..row + R` of a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix that takes 8-bit activations
/// against activation rows `t..t + T` with the AVX2 integer kernels (on either x86 path; on
/// AVX-512 `vnni_rows_into` takes these matrices first); zeros for other formats, which callers
/// do not pass.
#[cfg(target_arch = "x86_64")]
fn int_q8_rows<const R: usize, const T: usize>(
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> [[f32; T]; R] {
    use x86_q8::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, int_q8};
    let nb = w.cols / 32;
    let Some((rows, kind)) = int_q8_parts(w, row, R) else {
        return [[0.0; T]; R];
    };
    let acts = std::array::from_fn(|k| q8_row(a, t + k, nb, w.fine));
    // SAFETY: callers reach this only on an x86 path checked as supported (both include AVX2
    // and FMA); `rows` holds `R` whole rows (with their minimums for Q4_1 and Q5_1, and their
    // fifth bits for Q5) and each activation row `nb` blocks (with the second plane where the
    // matrix asks for it: `matmul_with` quantized so).
    unsafe {
        match (kind, w.fine) {
            (Q4_0, false) => int_q8::<R, T, false, Q4_0>(&rows, acts, nb),
            (Q4_0, true) => int_q8::<R, T, true, Q4_0>(&rows, acts, nb),
            (Q4_1, false) => int_q8::<R, T, false, Q4_1>(&rows, acts, nb),
            (Q4_1, true) => int_q8::<R, T, true, Q4_1>(&rows, acts, nb),
            (Q5_0, false) => int_q8::<R, T, false, Q5_0>(&rows, acts, nb),
            (Q5_0, true) => int_q8::<R, T, true, Q5_0>(&rows, acts, nb),
            (Q5_1, false) => int_q8::<R, T, false, Q5_1>(&rows, acts, nb),
            (Q5_1, true) => int_q8::<R, T, true, Q5_1>(&rows, acts, nb),
            (_, false) => int_q8::<R, T, false, Q8_0>(&rows, acts, nb),
            (_, true) => int_q8::<R, T, true, Q8_0>(&rows, acts, nb),
        }
    }
}

/// A K-quant matrix's super-block bytes and the size of one super-block as stored (Q4_K and
/// Q5_K repacked, Q6_K as ggml's); `None` for other formats.
#[cfg(target_arch = "x86_64")]
fn k_quant_storage(w: &QuantMatrix) -> Option<(&[u8], usize)> {
    match &w.storage {
        Storage::Q4K(b) => Some((b, matrix::Q4K_PACKED)),
        Storage::Q5K(b) => Some((b, matrix::Q5K_PACKED)),
        Storage::Q6K(b) => Some((b, WeightFormat::Q6K.ggml_block_bytes())),
        _ => None,
    }
}

/// Rows `r0..r1` of an integer-format matrix that takes 8-bit activations, for all `n`
/// tokens, with the AVX-512 kernels: the panels for two tokens or more, the VNNI tiles
/// otherwise and for the rows after the last whole panel, chosen once per task rather than
/// once per group of rows (on the default model's small matrices that choice and its argument
/// copies cost a seventh of a decode step). Returns the first row not computed: `r0` for other
/// formats, paths or activations, and the rows after the panels of a two-plane K-quant matrix
/// (whose tiles are AVX2's).
#[cfg(target_arch = "x86_64")]
fn vnni_rows_into(
    isa: Isa,
    w: &QuantMatrix,
    a: &QuantizedActs,
    n: usize,
    (r0, r1): (usize, usize),
    out: OutRows,
) -> usize {
    use x86_q8::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
    use x86_vnni::rows_into;
    if isa != Isa::Avx512Vnni || !takes_q8(w, a) {
        return r0;
    }
    let nsb = w.cols / 256;
    let mut r0 = r0;
    if n >= PANEL_TOKENS
        && let Some(panel) = panel_weights(w)
    {
        // SAFETY: as below; the panel kernels read rows `r0..r1` as `panel` describes them,
        // and write each token's rows of a whole panel.
        r0 = unsafe {
            x86_panel::rows_into(&panel, a, w.fine, n, (r0, r1), |t, r, v| {
                out.write_rows(t, r, v)
            })
        };
        if r0 == r1 {
            return r1;
        }
    }
    // SAFETY: `matmul_with` checked `out` against `n` tokens of all the stack's rows, and tasks
    // own disjoint row ranges `r0..r1` of this part.
    let put = |t: usize, r: usize, v: f32| unsafe { out.write(t, r, v) };
    if let Some((bytes, block)) = k_quant_storage(w) {
        if w.fine {
            return r0;
        }
        // SAFETY: as below; `bytes` holds every row's `nsb` super-blocks of `block` bytes and
        // `a` the activation rows quantized with one plane.
        unsafe { x86_vnni::k_rows_into(w.format, bytes, nsb * block, a, nsb, n, (r0, r1), put) };
        return r1;
    }
    let Some((all, kind)) = int_q8_parts(w, 0, w.rows) else {
        return r0;
    };
    let nb = w.cols / 32;
    let range = (r0, r1);
    // SAFETY: `isa` was checked as supported by `matmul_with`; `all` holds every row of the
    // matrix and `a` its `n` activation rows, quantized as the matrix asks.
    unsafe {
        match (kind, w.fine) {
            (Q4_0, false) => rows_into::<false, Q4_0>(&all, a, nb, n, range, put),
            (Q4_0, true) => rows_into::<true, Q4_0>(&all, a, nb, n, range, put),
            (Q4_1, false) => rows_into::<false, Q4_1>(&all, a, nb, n, range, put),
            (Q4_1, true) => rows_into::<true, Q4_1>(&all, a, nb, n, range, put),
            (Q5_0, false) => rows_into::<false, Q5_0>(&all, a, nb, n, range, put),
            (Q5_0, true) => rows_into::<true, Q5_0>(&all, a, nb, n, range, put),
            (Q5_1, false) => rows_into::<false, Q5_1>(&all, a, nb, n, range, put),
            (Q5_1, true) => rows_into::<true, Q5_1>(&all, a, nb, n, range, put),
            (Q8_0, false) => rows_into::<false, Q8_0>(&all, a, nb, n, range, put),
            (_, _) => rows_into::<true, Q8_0>(&all, a, nb, n, range, put),
        }
    }
    r1
}

/// From how many tokens a product takes the panel kernels (`x86_panel`) on AVX-512 VNNI: from
/// two for the integer formats (kernel throughput on 60 matrices of 1536 x 512, one thread, two
/// tokens: Q4_0 1.0-1.2x, Q4_K 1.2-1.5x, Q8_0 1.2x the four-row tiles; one token, decode, stays
/// on those, which read the stored rows twice as fast), from twelve for 16-bit floats (eight:
/// 0.9x).
const PANEL_TOKENS: usize = 2;
#[cfg(target_arch = "x86_64")]
const HALF_PANEL_TOKENS: usize = 12;

/// Rows `r0..r1` of a 16-bit float matrix against `n` tokens or more with the AVX-512 panel
/// kernel, in whole panels of sixteen; returns the first row not computed (`r0` for other
/// formats and paths, or fewer than [`HALF_PANEL_TOKENS`] tokens).
#[cfg(target_arch = "x86_64")]
fn half_panel_rows_into(
    isa: Isa,
    w: &QuantMatrix,
    a: &QuantizedActs,
    n: usize,
    (r0, r1): (usize, usize),
    out: OutRows,
) -> usize {
    use half::slice::HalfFloatSliceExt;
    if isa != Isa::Avx512Vnni || n < HALF_PANEL_TOKENS {
        return r0;
    }
    let (bits, bf16): (&[u16], bool) = match &w.storage {
        Storage::F16(v) => (v.reinterpret_cast(), false),
        Storage::BF16(v) => (v.reinterpret_cast(), true),
        _ => return r0,
    };
    let x = &a.f[..n * w.cols];
    // SAFETY: `matmul_with` checked `out` against `n` tokens of all the stack's rows, and tasks
    // own disjoint row ranges `r0..r1` of this part.
    let put = |t: usize, r: usize, v: &[f32; x86_panel::ROWS]| unsafe { out.write_rows(t, r, v) };
    // SAFETY: `isa` was checked as supported by `matmul_with`; `bits` holds every row of the
    // matrix and `x` its `n` f32 activation rows (16-bit matrices keep them as f32).
    unsafe {
        if bf16 {
            x86_panel::half_rows_into::<true>(bits, w.cols, x, n, (r0, r1), put)
        } else {
            x86_panel::half_rows_into::<false>(bits, w.cols, x, n, (r0, r1), put)
        }
    }
}

/// Rows per panel of the panel kernels (sixteen; four where there are none).
fn x86_panel_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    return x86_panel::ROWS;
    #[cfg(not(target_arch = "x86_64"))]
    4
}

/// `w` (one format, taking 8-bit activations) as the panel kernels read it; `None` for formats
/// they do not take.
#[cfg(target_arch = "x86_64")]
fn panel_weights(w: &QuantMatrix) -> Option<x86_panel::Weights<'_>> {
    let nsb = w.cols / 256;
    let Some((bytes, block)) = k_quant_storage(w) else {
        let (rows, kind) = int_q8_parts(w, 0, w.rows)?;
        return Some(x86_panel::Weights::Blocks {
            rows,
            kind,
            nb: w.cols / 32,
        });
    };
    Some(x86_panel::Weights::Super {
        format: w.format,
        bytes,
        row_bytes: nsb * block,
        nsb,
    })
}

/// Rows `row..row + R` of a Q5_0 or Q5_1 matrix that takes 8-bit activations against
/// activation rows `t..t + T` with the AVX2 integer kernel ([`int_q8_rows`], on either x86
/// path); `None` for other formats, paths or f32 activations (the scalar code takes those).
#[cfg(target_arch = "x86_64")]
fn q5_rows<const R: usize, const T: usize>(
    isa: Isa,
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[[f32; T]; R]> {
    let q5 = matches!(w.storage, Storage::Q5 { .. });
    if !q5 || !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) || !takes_q8(w, a) {
        return None;
    }
    Some(int_q8_rows::<R, T>(w, row, a, t))
}

/// Rows `row..row + R` of a K-quant or 16-bit float matrix against activation rows
/// `t..t + T` with the x86 kernels, as `out[row][token]`; `None` for other formats or paths. The
/// caller checks that the rows and tokens exist.
#[cfg(target_arch = "x86_64")]
fn tiled_rows<const R: usize, const T: usize>(
    isa: Isa,
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[[f32; T]; R]> {
    use half::slice::HalfFloatSliceExt;
    if !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
        return None;
    }
    let cols = w.cols;
    let (bits, bf16) = match &w.storage {
        Storage::F16(v) => (v.reinterpret_cast(), false),
        Storage::BF16(v) => (v.reinterpret_cast(), true),
        _ => return k_quant_rows::<R, T>(isa, w, row, a, t),
    };
    let rows = &bits[row * cols..(row + R) * cols];
    let x = a.f32_rows::<T>(t);
    // SAFETY: `isa` was checked as supported before dispatch (both x86 paths include F16C);
    // `rows` holds `R` rows of `cols` values and each `x` `cols` values.
    Some(unsafe {
        match (isa, bf16) {
            (Isa::Avx512Vnni, false) => x86::half_rows_avx512::<R, T, false>(rows, cols, x),
            (Isa::Avx512Vnni, true) => x86::half_rows_avx512::<R, T, true>(rows, cols, x),
            (_, false) => x86::half_rows_avx2::<R, T, false>(rows, cols, x),
            (_, true) => x86::half_rows_avx2::<R, T, true>(rows, cols, x),
        }
    })
}

/// The K-quant part of [`tiled_rows`].
#[cfg(target_arch = "x86_64")]
fn k_quant_rows<const R: usize, const T: usize>(
    isa: Isa,
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[[f32; T]; R]> {
    if !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) {
        return None;
    }
    let (bytes, block) = k_quant_storage(w)?;
    let format = w.format;
    let nsb = w.cols / 256;
    let per_row = nsb * block;
    let rows = &bytes[row * per_row..(row + R) * per_row];
    if takes_q8(w, a) {
        let acts = std::array::from_fn(|k| q8_row(a, t + k, nsb * 8, w.fine));
        // SAFETY: both x86 paths include AVX2, FMA and F16C, and `isa` was checked as
        // supported; `rows` holds `R` rows of `nsb` super-blocks and each activation row
        // `nsb * 8` blocks (with the second plane where the matrix asks for it).
        return Some(unsafe {
            use x86_q8::{q4k_q8, q6k_q8};
            match (format, w.fine) {
                (WeightFormat::Q4K, false) => {
                    q4k_q8::<R, T, false, false>(rows, per_row, acts, nsb)
                }
                (WeightFormat::Q4K, true) => q4k_q8::<R, T, false, true>(rows, per_row, acts, nsb),
                (WeightFormat::Q5K, false) => q4k_q8::<R, T, true, false>(rows, per_row, acts, nsb),
                (WeightFormat::Q5K, true) => q4k_q8::<R, T, true, true>(rows, per_row, acts, nsb),
                (_, false) => q6k_q8::<R, T, false>(rows, per_row, acts, nsb),
                (_, true) => q6k_q8::<R, T, true>(rows, per_row, acts, nsb),
            }
        });
    }
    let (x, xsum) = (a.f32_rows::<T>(t), a.f32_sums::<T>(t));
    // SAFETY: `isa` was checked as supported by the CPU before dispatch (both x86 paths include
    // F16C); `rows` holds `R` rows of `nsb` super-blocks, each `x` `cols` values and each
    // `xsum` `cols / 32` sums.
    Some(unsafe {
        use WeightFormat::{Q4K, Q5K};
        match (isa, format) {
            (Isa::Avx512Vnni, Q4K) => x86::q4k_avx512::<R, T, false>(rows, per_row, x, xsum, nsb),
            (Isa::Avx512Vnni, Q5K) => x86::q4k_avx512::<R, T, true>(rows, per_row, x, xsum, nsb),
            (Isa::Avx512Vnni, _) => x86::q6k_avx512::<R, T>(rows, per_row, x, nsb),
            (_, Q4K) => x86::q4k_avx2::<R, T, false>(rows, per_row, x, xsum, nsb),
            (_, Q5K) => x86::q4k_avx2::<R, T, true>(rows, per_row, x, xsum, nsb),
            (_, _) => x86::q6k_avx2::<R, T>(rows, per_row, x, nsb),
        }
    })
}

/// Activation row `t` (of `nb` blocks) quantized, as the 8-bit kernels read it; with `fine`,
/// the second plane too (the caller quantized with it).
#[cfg(target_arch = "x86_64")]
fn q8_row(a: &QuantizedActs, t: usize, nb: usize, fine: bool) -> x86_q8::Q8Row<'_> {
    let blocks = t * nb..(t + 1) * nb;
    let (sum, lo, s16lo): (&[f32], &[i8], &[i16]) = if fine {
        (
            &a.sum_fine[blocks.clone()],
            &a.lo[t * nb * 32..(t + 1) * nb * 32],
            &a.s16lo[t * nb * 2..(t + 1) * nb * 2],
        )
    } else {
        (&a.sum[blocks.clone()], &[], &[])
    };
    x86_q8::Q8Row {
        d: &a.d[blocks],
        sum,
        s16: &a.s16[t * nb * 2..(t + 1) * nb * 2],
        q: &a.q[t * nb * 32..(t + 1) * nb * 32],
        lo,
        s16lo,
    }
}

/// Slices of some weight rows and one activation row, already cut to the blocks a kernel reads.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) struct RowArgs<'a> {
    pub(crate) wd: &'a [f32],
    pub(crate) wm: &'a [f32],
    pub(crate) wq: &'a [u8],
    // The activation blocks: only the NEON kernels read them (the x86 ones take `Q8Row`s).
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) ad: &'a [f32],
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) asum: &'a [f32],
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) aq: &'a [i8],
}

/// Which block layout an integer kernel reads.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// 4-bit nibbles; `offset` for Q4_0 (values `q - 8`), else Q4_1 (a minimum per block).
    Q4 { offset: bool },
    /// Signed bytes (Q8_0).
    Q8,
}

/// Scales, minimums (Q4_1 only), quant bytes and block layout of some rows of a matrix.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
type IntRows<'a> = (&'a [f32], &'a [f32], &'a [u8], BlockKind);

/// Rows `row..row + count` of an integer-format matrix as the SIMD kernels read them; `None`
/// for other formats.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn int_rows(w: &QuantMatrix, row: usize, count: usize) -> Option<IntRows<'_>> {
    let nb = w.cols / 32;
    let scales = row * nb..(row + count) * nb;
    let nibbles = row * nb * 16..(row + count) * nb * 16;
    match &w.storage {
        Storage::Q4_1 { d, m, q } => Some((
            &d[scales.clone()],
            &m[scales],
            &q[nibbles],
            BlockKind::Q4 { offset: false },
        )),
        Storage::Q4_0 { d, q } => {
            Some((&d[scales], &[], &q[nibbles], BlockKind::Q4 { offset: true }))
        }
        Storage::Q8_0 { d, q } => {
            let q = &q[row * w.cols..(row + count) * w.cols];
            // SAFETY: i8 and u8 have the same size and alignment; the kernels read them as i8.
            let q = unsafe { std::slice::from_raw_parts(q.as_ptr() as *const u8, q.len()) };
            Some((&d[scales], &[], q, BlockKind::Q8))
        }
        _ => None,
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn row_args<'a>(
    wd: &'a [f32],
    wm: &'a [f32],
    wq: &'a [u8],
    a: &'a QuantizedActs,
    ab: usize,
    aq: usize,
    nb: usize,
) -> RowArgs<'a> {
    RowArgs {
        wd,
        wm,
        wq,
        ad: &a.d[ab..ab + nb],
        asum: &a.sum[ab..ab + nb],
        aq: &a.q[aq..aq + nb * 32],
    }
}

/// Four consecutive outputs `row..row + 4` at once where a fused kernel exists (K-quants and
/// 16-bit floats on x86; AVX2 with quantized activations; AVX-512 with f32 activations; NEON
/// with either activation kind); `None` otherwise, and the caller takes them one at a time.
fn dot4(isa: Isa, w: &QuantMatrix, row: usize, a: &QuantizedActs, t: usize) -> Option<[f32; 4]> {
    // K-quants and 16-bit floats. (Q4_0/Q4_1/Q8_0 with f32 activations take the one-row AVX2
    // kernels for a single token: measured faster than four rows at once, 8.0 against 6.4
    // tokens/s on a 1B shape and 52 against 50 on the default model, one core.)
    #[cfg(target_arch = "x86_64")]
    if row + 4 <= w.rows
        && let Some(four) = tiled_rows::<4, 1>(isa, w, row, a, t)
    {
        return Some(four.map(|[v]| v));
    }
    // Q5_0/Q5_1 with 8-bit activations, on either x86 path.
    #[cfg(target_arch = "x86_64")]
    if row + 4 <= w.rows
        && let Some(four) = q5_rows::<4, 1>(isa, w, row, a, t)
    {
        return Some(four.map(|[v]| v));
    }
    // Q4_0/Q4_1/Q8_0 with 8-bit activations: four rows share each activation load.
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2
        && takes_q8(w, a)
        && row + 4 <= w.rows
        && let Some(four) = x86_rows::<4, 1>(isa, w, row, a, t)
    {
        return Some(four.map(|[v]| v));
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && row + 4 <= w.rows {
        return neon_rows::<4>(w, row, a, t);
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && !takes_q8(w, a) && row + 4 <= w.rows {
        let (cols, nb) = (w.cols, w.cols / 32);
        let (wd, wm, wq, kind) = int_rows(w, row, 4)?;
        let r = row_args(wd, wm, wq, a, 0, 0, 0);
        let x = &a.f[t * cols..(t + 1) * cols];
        let xsum = &a.fsum[t * nb..(t + 1) * nb];
        // SAFETY: the CPU supports AVX-512 (checked by the caller), and the slices cover four
        // whole rows.
        return Some(unsafe {
            match kind {
                BlockKind::Q4 { offset } => x86::dot4_q4_f32_avx512(&r, x, xsum, nb, offset),
                BlockKind::Q8 => x86::dot4_q8_f32_avx512(&r, x, nb),
            }
        });
    }
    let _ = (isa, w, row, a, t);
    None
}

/// Outputs `row..row + 4` for tokens `t..t + 8` at once (prefill and batches) for Q4_0, Q4_1
/// and Q8_0 on f32 activations with AVX2 (`None` elsewhere): one row at a time against eight
/// tokens, which fits AVX2's registers where the 2 x 4 tile of [`dot4x4`] spilled.
fn dot4x8(
    isa: Isa,
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[[f32; 8]; 4]> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && !takes_q8(w, a) && row + 4 <= w.rows && t + 8 <= a.rows {
        let nb = w.cols / 32;
        // Other formats (16-bit floats, whose columns need not fill blocks of 32) go on to the
        // tiles of four tokens.
        int_rows(w, row, 1)?;
        let (x, xsum) = (a.f32_rows::<8>(t), a.f32_sums::<8>(t));
        let mut out = [[0f32; 8]; 4];
        for (k, o) in out.iter_mut().enumerate() {
            let (wd, wm, wq, kind) = int_rows(w, row + k, 1)?;
            // SAFETY: the caller checked AVX2 as supported; the slices hold one whole row of
            // `nb` blocks, each `x` `cols` values and each `xsum` `nb` sums.
            *o = unsafe { x86::int_row_x8_avx2(wd, wm, wq, x, xsum, nb, kind) };
        }
        return Some(out);
    }
    let _ = (isa, w, row, a, t);
    None
}

/// Outputs `row..row + 4` for tokens `t..t + 4` at once (prefill), where a fused kernel exists.
fn dot4x4(
    isa: Isa,
    w: &QuantMatrix,
    row: usize,
    a: &QuantizedActs,
    t: usize,
) -> Option<[[f32; 4]; 4]> {
    #[cfg(target_arch = "x86_64")]
    if row + 4 <= w.rows && t + 4 <= a.rows {
        if isa == Isa::Avx512Vnni
            && let Some(block) = tiled_rows::<4, 4>(isa, w, row, a, t)
        {
            return Some(block);
        }
        // Sixteen AVX2 registers hold two rows by four tokens of sums, not four by four.
        if let Some([r0, r1]) = q5_rows::<2, 4>(isa, w, row, a, t)
            && let Some([r2, r3]) = q5_rows::<2, 4>(isa, w, row + 2, a, t)
        {
            return Some([r0, r1, r2, r3]);
        }
        if isa == Isa::Avx2
            && let Some([r0, r1]) = x86_rows::<2, 4>(isa, w, row, a, t)
            && let Some([r2, r3]) = x86_rows::<2, 4>(isa, w, row + 2, a, t)
        {
            return Some([r0, r1, r2, r3]);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && !takes_q8(w, a) && row + 4 <= w.rows && t + 4 <= a.rows {
        let nb = w.cols / 32;
        let (wd, wm, wq, kind) = int_rows(w, row, 4)?;
        let r = row_args(wd, wm, wq, a, 0, 0, 0);
        let (x, xsum) = (a.f32_rows::<4>(t), a.f32_sums::<4>(t));
        // SAFETY: the CPU supports AVX-512 (checked by the caller); slices cover four rows and
        // four tokens.
        return Some(unsafe { x86::dot4x4_f32_avx512(&r, x, xsum, nb, kind) });
    }
    let _ = (isa, w, row, a, t);
    None
}

/// Calls `f(i, piece)` for every `chunk`-sized piece of `data` (the last may be shorter), spread
/// over the kernels' thread pool; returns when every call has ended. Each piece goes to exactly
/// one call, so `f` may write it freely: this is how model code outside the kernels (attention
/// heads, for example) shares the pool without an unsafe line of its own.
pub fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = data.len();
    let tasks = len.div_ceil(chunk);
    let base = SendPtr(data.as_mut_ptr());
    pool::pool().run(tasks, &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `run` calls each index in `0..tasks` exactly once and returns only after
        // every call has ended, so the pieces `start..end` are disjoint, in bounds, and borrowed
        // from `data` (held mutably for this whole function) while they are used.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, piece)
    });
}

/// A pointer to a buffer whose disjoint pieces go to different tasks.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: only used by `for_each_chunk`, whose tasks touch disjoint pieces of `T: Send` values.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// A raw pointer that may cross threads: each task writes a disjoint set of elements.
#[derive(Clone, Copy, Debug)]
struct OutPtr(*mut f32);

impl OutPtr {
    /// # Safety
    /// `i` is in bounds of the buffer and no other task writes it.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v };
    }
}
// SAFETY: tasks write disjoint indices (distinct rows of the output), and the buffer outlives
// the parallel section because `matmul_with` borrows it mutably for the whole call.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[t, r] = sum_c w[r, c] * x[t, c]` for `n` activation rows `x` (`[n, cols]`), giving
/// `out` (`[n, rows]`). `acts` is scratch reused between calls so decoding allocates nothing.
pub fn matmul(
    w: &QuantMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    acts: &mut QuantizedActs,
) -> Result<()> {
    matmul_with(Isa::detected(), w, x, n, out, acts)
}

/// [`matmul`] on a chosen instruction-set path (falls back to scalar if the CPU lacks it).
pub fn matmul_with(
    isa: Isa,
    w: &QuantMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    acts: &mut QuantizedActs,
) -> Result<()> {
    if x.len() != n * w.cols {
        return Err(Error::Shape {
            what: "activations",
            expected: n * w.cols,
            actual: x.len(),
        });
    }
    if out.len() != n * w.rows {
        return Err(Error::Shape {
            what: "output",
            expected: n * w.rows,
            actual: out.len(),
        });
    }
    let isa = if isa.is_supported() { isa } else { Isa::Scalar };
    // Prefill tiles of four tokens and more run two-plane matrices on f32 activations, except
    // where the panel kernels take them (their two planes measured faster).
    acts.fine_as_f32 = n >= 4 && !(isa == Isa::Avx512Vnni && n >= PANEL_TOKENS);
    if w.quantizes_activations(acts.fine_as_f32, n >= 8) {
        acts.quantize(x, n, w.cols, w.quantizes_second_plane(acts.fine_as_f32));
    } else {
        acts.keep_f32(x, n, w.cols);
    }
    let rows = w.rows;
    let pool = pool::pool();
    let threads = pool.threads();
    let work = rows * w.cols * n;
    let out = OutRows {
        ptr: OutPtr(out.as_mut_ptr()),
        stride: rows,
        offset: 0,
    };
    let acts = &*acts;
    // A stack of mixed formats runs each part's rows with that part's kernels; tasks may span
    // parts.
    let parts = match &w.storage {
        Storage::Parts(parts) => parts.as_slice(),
        _ => std::slice::from_ref(w),
    };
    let run = move |r0: usize, r1: usize| {
        let mut base = 0;
        for p in parts {
            let (lo, hi) = (r0.max(base), r1.min(base + p.rows));
            if lo < hi {
                let out = OutRows {
                    offset: base,
                    ..out
                };
                rows_into(isa, p, acts, n, lo - base, hi - base, out);
            }
            base += p.rows;
        }
    };
    if threads <= 1 || work < 1 << 16 {
        run(0, rows);
    } else {
        // A couple of tasks per thread: balance when one core is busier, at little cost. Whole
        // groups of four rows, or of sixteen where the panel kernels take many tokens.
        let group = if isa == Isa::Avx512Vnni && n >= PANEL_TOKENS {
            x86_panel_rows()
        } else {
            4
        };
        let chunk = rows.div_ceil(threads * 2).max(8).next_multiple_of(group);
        let tasks = rows.div_ceil(chunk);
        pool.run(tasks, &|i| run(i * chunk, ((i + 1) * chunk).min(rows)));
    }
    Ok(())
}

/// Where a task writes its outputs: token `t`, row `r` of a part goes to
/// `ptr[t * stride + offset + r]`.
#[derive(Clone, Copy)]
struct OutRows {
    ptr: OutPtr,
    stride: usize,
    offset: usize,
}

impl OutRows {
    /// # Safety
    /// `t * stride + offset + r` is in bounds of the output, and no other task writes it.
    unsafe fn write(self, t: usize, r: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.ptr.write(t * self.stride + self.offset + r, v) };
    }

    /// Token `t`, rows `r..r + v.len()`.
    ///
    /// # Safety
    /// As [`OutRows::write`], for each of those rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn write_rows(self, t: usize, r: usize, v: &[f32]) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let at = self.ptr.0.add(t * self.stride + self.offset + r);
            std::ptr::copy_nonoverlapping(v.as_ptr(), at, v.len());
        }
    }
}

/// Rows `r0..r1` of `w` (a matrix of one format) for all `n` tokens.
fn rows_into(
    isa: Isa,
    w: &QuantMatrix,
    acts: &QuantizedActs,
    n: usize,
    r0: usize,
    r1: usize,
    out: OutRows,
) {
    // SAFETY (every write below): `matmul_with` checked `out` against `n` tokens of all the
    // stack's rows, `r < r1 <= w.rows` and the part's rows start at `out.offset`; tasks own
    // disjoint row ranges.
    //
    // Four rows at a time for a block of tokens, four tokens at a time where a kernel takes
    // them (each unpacked weight serves all four): the four rows stay in the nearest cache while
    // the block's activations stream past, so a matrix bigger than the caches is read from
    // memory once per block of tokens, not once per four tokens.
    #[cfg(target_arch = "x86_64")]
    let r0 = half_panel_rows_into(isa, w, acts, n, (r0, r1), out);
    #[cfg(target_arch = "x86_64")]
    let r0 = vnni_rows_into(isa, w, acts, n, (r0, r1), out);
    if r0 == r1 {
        return;
    }
    const TOKENS: usize = 32;
    for t0 in (0..n).step_by(TOKENS) {
        let t1 = (t0 + TOKENS).min(n);
        let mut r = r0;
        while r + 4 <= r1 {
            // A kernel's block of four rows by `T` tokens, written out.
            fn put<const T: usize>(out: OutRows, r: usize, t: usize, block: &[[f32; T]; 4]) {
                for (k, row) in block.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        // SAFETY: as for every write of `rows_into`.
                        unsafe { out.write(t + j, r + k, *v) };
                    }
                }
            }
            let mut t = t0;
            while t + 8 <= t1 {
                let Some(block) = dot4x8(isa, w, r, acts, t) else {
                    break;
                };
                put(out, r, t, &block);
                t += 8;
            }
            while t + 4 <= t1 {
                let Some(block) = dot4x4(isa, w, r, acts, t) else {
                    break;
                };
                put(out, r, t, &block);
                t += 4;
            }
            for t in t..t1 {
                if let Some(four) = dot4(isa, w, r, acts, t) {
                    for (k, v) in four.into_iter().enumerate() {
                        unsafe { out.write(t, r + k, v) };
                    }
                } else {
                    for k in 0..4 {
                        unsafe { out.write(t, r + k, dot(isa, w, r + k, acts, t)) };
                    }
                }
            }
            r += 4;
        }
        for r in r..r1 {
            for t in t0..t1 {
                unsafe { out.write(t, r, dot(isa, w, r, acts, t)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_each_chunk_gives_every_piece_to_exactly_one_call() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 1), (1000, 7), (5, 0)] {
            let mut data = vec![0u32; len];
            for_each_chunk(&mut data, chunk, |i, piece| {
                assert!(piece.len() <= chunk.max(1));
                for v in piece.iter_mut() {
                    *v += i as u32 + 1;
                }
            });
            let expect: Vec<u32> = (0..len).map(|j| (j / chunk.max(1)) as u32 + 1).collect();
            assert_eq!(data, expect, "len {len} chunk {chunk}");
        }
    }

    #[test]
    fn a_wrong_activation_length_is_an_error() -> Result<()> {
        let w = QuantMatrix::from_f32(WeightFormat::Q8_0, 2, 32, &[0.5; 64])?;
        let mut out = vec![0.0; 2];
        let err = matmul(&w, &[1.0; 31], 1, &mut out, &mut QuantizedActs::new());
        assert!(err.is_err());
        let err = matmul(&w, &[1.0; 32], 1, &mut out[..1], &mut QuantizedActs::new());
        assert!(err.is_err());
        Ok(())
    }
}
