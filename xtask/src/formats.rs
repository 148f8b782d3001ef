//! The format matrix of `cargo xtask bench`, and `cargo xtask synth-model`, which makes its
//! models: the default model requantized by llama.cpp's `llama-quantize` from an F32 copy, and a
//! Llama-3.2-1B-shaped model with random weights (F16, then quantized the same way), both with
//! the default model's tokenizer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use exo_model::{DType, ModelConfig};

use crate::{Figures, cache_dir, fmt_spread, median, run_llama};

/// The formats of the matrix, as `llama-quantize` names them, most downloaded first.
pub(crate) const FORMATS: [&str; 6] = ["Q4_K_M", "Q8_0", "Q4_0", "F16", "Q6_K", "Q4_1"];

/// Formats `--formats` may add: `llama-quantize` makes them, and our kernels load them (Q5_0
/// and Q5_1 widened to Q8_0).
pub(crate) const MORE_FORMATS: [&str; 4] = ["Q5_K_M", "Q5_0", "Q5_1", "BF16"];

/// The two models of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// SmolLM2-135M (the default model).
    Default,
    /// Llama-3.2-1B's shape with random weights.
    OneB,
    /// Gemma 3 270M: the packaged Q4_K_M file only (a real model of another family, fetched
    /// with pip; nothing is synthesized).
    Gemma3,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Default => "SmolLM2-135M",
            Shape::OneB => "1B shape",
            Shape::Gemma3 => "Gemma 3 270M",
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            Shape::Default => "smollm2-135m",
            Shape::OneB => "llama-1b-shape",
            Shape::Gemma3 => "gemma-3-270m",
        }
    }
}

/// Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 query and 8 key/value heads, MLP 8192, tied
/// embeddings; the default model's vocabulary (49152), so its tokenizer serves.
pub(crate) fn one_b_config() -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        vocab_size: 49152,
        hidden_size: 2048,
        intermediate_size: 8192,
        num_layers: 16,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        variant: Default::default(),
    }
}

fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

/// The file of `shape` in `format` (made by [`synth_models`]); the default model's Q4_1 is the
/// fetched file itself.
pub(crate) fn model_path(shape: Shape, format: &str, default_model: &Path) -> PathBuf {
    if shape == Shape::Default && format == "Q4_1" {
        return default_model.to_path_buf();
    }
    if shape == Shape::Gemma3 && format == "Q4_K_M" {
        // Fetched on first use; a failure leaves a path that does not exist, which the
        // matrix reports as missing.
        let home = exo_model::exo_home();
        return exo_model::ensure_packaged_model(&exo_model::GEMMA3_270M, &home, &mut |l| {
            eprintln!("{l}")
        })
        .unwrap_or_else(|e| {
            eprintln!("gemma3-270m: {e}");
            home.join("models").join(exo_model::GEMMA3_270M.file_name)
        });
    }
    models_dir().join(format!("{}.{format}.gguf", shape.file_stem()))
}

/// Makes every model of the matrix that is missing: the F32 copy of the default model and the
/// F16 1B-shaped model, then each format with `llama-quantize`.
pub(crate) fn synth_models(
    quantize: &Path,
    default_model: &Path,
    shapes: &[Shape],
    formats: &[&str],
) -> Result<()> {
    let dir = models_dir();
    std::fs::create_dir_all(&dir)?;
    for &shape in shapes {
        // The source every format is quantized from: F32 for the default model (decoded from
        // its Q4_1 blocks, so requantizing loses nothing more), F16 for the 1B shape.
        let source = match shape {
            // Nothing to make: the matrix runs the packaged file.
            Shape::Gemma3 => continue,
            Shape::Default => {
                let path = model_path(shape, "F32", default_model);
                if !path.exists() {
                    eprintln!("writing {}", path.display());
                    exo_model::testing::write_dequantized_gguf(default_model, &path)?;
                }
                path
            }
            Shape::OneB => {
                let path = model_path(shape, "F16", default_model);
                if !path.exists() {
                    eprintln!("writing {} (random weights)", path.display());
                    let tmp = path.with_extension("tmp");
                    exo_model::testing::write_synthetic_gguf(
                        &tmp,
                        &one_b_config(),
                        18,
                        default_model,
                    )?;
                    std::fs::rename(&tmp, &path)?;
                }
                path
            }
        };
        for &format in formats {
            let out = model_path(shape, format, default_model);
            if out.exists() {
                continue;
            }
            eprintln!(
                "$ llama-quantize {} {} {format}",
                source.display(),
                out.display()
            );
            let tmp = out.with_extension("tmp");
            let result = Command::new(quantize)
                .arg(&source)
                .arg(&tmp)
                .arg(format)
                .output()
                .with_context(|| format!("running {}", quantize.display()))?;
            if !result.status.success() {
                bail!(
                    "llama-quantize {format} failed:\n{}",
                    String::from_utf8_lossy(&result.stderr)
                );
            }
            std::fs::rename(&tmp, &out)?;
        }
    }
    Ok(())
}

/// Bytes per weight our kernels keep in memory for each stored type (the repackings), and so
/// read per token: `(numerator, denominator)` bytes per weight.
pub(crate) fn our_bytes_per_weight(dtype: DType) -> (usize, usize) {
    match dtype {
        DType::F32 => (4, 1),
        DType::F16 | DType::BF16 => (2, 1),
        // f32 scale beside 32 signed bytes.
        DType::Q8_0 => (36, 32),
        // f32 scale beside 16 nibble bytes.
        DType::Q4_0 => (20, 32),
        // f32 scale and minimum beside 16 nibble bytes.
        DType::Q4_1 => (24, 32),
        // Widened to Q8_0 at load.
        DType::Q5_0 | DType::Q5_1 => (36, 32),
        // Scales unpacked to a byte each.
        DType::Q4K => (148, 256),
        DType::Q5K => (180, 256),
        DType::Q6K => (210, 256),
    }
}

/// Bytes of weights one decoded token reads: every layer matrix and the head (the embedding
/// when tied), as the file stores them (llama.cpp) and as our kernels keep them.
pub(crate) fn bytes_per_token(model: &Path) -> Result<(u64, u64)> {
    let file = exo_model::gguf::GgufFile::open(model)?;
    let has_head = file.tensors().iter().any(|t| t.name == "output.weight");
    let (mut stored, mut ours) = (0u64, 0u64);
    for t in file.tensors() {
        let read = t.shape.len() == 2 && (t.name != "token_embd.weight" || !has_head);
        if read {
            stored += t.len as u64;
            let (num, den) = our_bytes_per_weight(t.dtype);
            ours += (t.elems() * num / den) as u64;
        }
    }
    Ok((stored, ours))
}

/// Read bandwidth of this machine's memory: GB/s of summing a 1 GiB buffer with `threads`
/// threads, best of three passes after one that faults the pages in.
pub(crate) fn read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..4 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        // Eight independent sums so that the loop is bound by loads, not adds.
                        let mut acc = [0u64; 8];
                        for block in part.chunks_exact(8) {
                            for (a, v) in acc.iter_mut().zip(block) {
                                *a = a.wrapping_add(*v);
                            }
                        }
                        acc.iter().fold(0u64, |a, v| a.wrapping_add(*v))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// One cell of the matrix: both engines' runs.
struct Cell {
    ours: Vec<Figures>,
    theirs: Vec<(f64, f64)>,
}

/// The format matrix: formats x models x {1, 2} threads, prefill and decode, ours beside
/// llama.cpp's `llama-bench` (run alternately), plus the read bandwidth and our GB/s on the
/// 1B shape. Appends a markdown table to `md` and objects to `json`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matrix(
    exe: &Path,
    llama: Option<&Path>,
    default_model: &Path,
    shapes: &[Shape],
    formats: &[&str],
    runs: usize,
    quick: bool,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    let prompt =
        "The quick brown fox jumps over the lazy dog while the farmer watches from the hill. "
            .repeat(7);
    let bw = [read_bandwidth(1), read_bandwidth(2)];
    md.push_str(&format!(
        "\nFormat matrix: prompt of ~128 tokens, {runs} run(s) each, median (min-max), tokens/s; \
         llama.cpp is `llama-bench -p 128 -n N` on the same file, run alternately with ours. \
         Memory read bandwidth (1 GiB summed): {:.1} GB/s with 1 thread, {:.1} GB/s with 2.\n\n\
         | model | format | threads | prefill ours | prefill llama.cpp | ratio | decode ours | decode llama.cpp | ratio | peak MiB (file MiB) | MB/token ours (file) | ours GB/s (% of read bw) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        bw[0], bw[1]
    ));
    for &shape in shapes {
        let generated = match (shape, quick) {
            (Shape::Default, false) => 128,
            (Shape::Default, true) => 32,
            (Shape::OneB, false) => 32,
            (Shape::OneB, true) => 16,
            (Shape::Gemma3, false) => 64,
            (Shape::Gemma3, true) => 32,
        };
        // Gemma 3 ships in one format.
        let only_q4_k_m = ["Q4_K_M"];
        let formats = if shape == Shape::Gemma3 {
            &only_q4_k_m[..]
        } else {
            formats
        };
        for &format in formats {
            let model = model_path(shape, format, default_model);
            if !model.exists() {
                eprintln!("{} missing: run `cargo xtask synth-model`", model.display());
                continue;
            }
            let file_mib = std::fs::metadata(&model)?.len() as f64 / (1 << 20) as f64;
            let (stored, ours_bytes) = bytes_per_token(&model)?;
            for threads in [1usize, 2] {
                let mut cell = Cell {
                    ours: Vec::new(),
                    theirs: Vec::new(),
                };
                for _ in 0..runs {
                    let out = crate::generate_command(exe, &prompt, generated)
                        .args(["--threads", &threads.to_string(), "--weights", "auto"])
                        .arg("--model")
                        .arg(&model)
                        .output()?;
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    if !out.status.success() {
                        bail!("exo-node generate on {} failed:\n{stderr}", model.display());
                    }
                    cell.ours.push(
                        stderr
                            .lines()
                            .rev()
                            .find_map(crate::parse_figures)
                            .context("no figures line from exo-node")?,
                    );
                    if let Some(llama) = llama {
                        let (pp, tg) = run_llama(llama, &model, threads, 128, generated)?;
                        cell.theirs.push((pp.unwrap_or(0.0), tg));
                    }
                }
                let pre = median(cell.ours.iter().map(|f| f.prefill).collect());
                let dec = median(cell.ours.iter().map(|f| f.decode).collect());
                let peak = median(cell.ours.iter().filter_map(|f| f.peak_mib).collect());
                let (lpre, ldec) = if cell.theirs.is_empty() {
                    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
                } else {
                    (
                        median(cell.theirs.iter().map(|t| t.0).collect()),
                        median(cell.theirs.iter().map(|t| t.1).collect()),
                    )
                };
                let ratio = |a: f64, b: f64| {
                    if b > 0.0 {
                        format!("{:.2}x", a / b)
                    } else {
                        "-".into()
                    }
                };
                let gbs = ours_bytes as f64 * dec.0 / 1e9;
                let bw_cell = if shape == Shape::OneB {
                    format!("{gbs:.1} ({:.0} %)", 100.0 * gbs / bw[threads - 1])
                } else {
                    format!("{gbs:.1}")
                };
                md.push_str(&format!(
                    "| {} | {format} | {threads} | {} | {} | {} | {} | {} | {} | {:.0} ({file_mib:.0}) | {:.0} ({:.0}) | {bw_cell} |\n",
                    shape.name(),
                    fmt_spread(pre),
                    fmt_spread(lpre),
                    ratio(pre.0, lpre.0),
                    fmt_spread(dec),
                    fmt_spread(ldec),
                    ratio(dec.0, ldec.0),
                    peak.0,
                    ours_bytes as f64 / 1e6,
                    stored as f64 / 1e6,
                ));
                json.push(format!(
                    "{{\"matrix\":true,\"model\":\"{}\",\"format\":\"{format}\",\"threads\":{threads},\
                     \"prefill\":{:.2},\"prefill_llama\":{:.2},\"decode\":{:.2},\"decode_llama\":{:.2},\
                     \"peak_mib\":{:.1},\"file_mib\":{file_mib:.1},\"bytes_per_token\":{ours_bytes},\
                     \"file_bytes_per_token\":{stored},\"gb_per_s\":{gbs:.2},\"read_bw_gb_per_s\":{:.2}}}",
                    shape.name(),
                    pre.0,
                    lpre.0,
                    dec.0,
                    ldec.0,
                    peak.0,
                    bw[threads - 1]
                ));
                eprintln!("{}", md.lines().last().unwrap_or_default());
            }
        }
    }
    Ok(())
}
