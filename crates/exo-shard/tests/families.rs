//! Each family the configuration's `Variant` describes (Qwen3's query/key norms; Gemma 3's
//! sandwich norms, GELU, embedding scale, sliding-window layers with their own rotary base;
//! Qwen2's bias) runs the same on both implementations of the layers: burn (f32) and the CPU
//! kernels (holding f32), at every position of a prompt and of the tokens after it, and again
//! after an export to a Hugging Face folder. Tiny random GGUF files of each architecture, written
//! by the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use exo_model::testing::{tiny_config, write_gguf};
use exo_model::{Activation, Checkpoint, ExportDtype, ModelConfig, ShardSpec, Variant, export_hf};
use exo_shard::{BackendKind, KvCache, LlamaShard, Weights, forward_tokens};

fn family(model_type: &str) -> ModelConfig {
    let base = ModelConfig {
        model_type: model_type.into(),
        // Seven layers: Gemma 3's sixth layer (index 5) is its global one.
        ..tiny_config(7)
    };
    match model_type {
        "qwen2" => ModelConfig {
            attention_bias: true,
            ..base
        },
        "qwen3" => ModelConfig {
            variant: Variant {
                qk_norm: true,
                ..Variant::default()
            },
            ..base
        },
        // A window of three positions, so that an eight-token prompt slides past it. (The
        // file says only the window; the rest is what the architecture fixes, read back.)
        "gemma3" => ModelConfig {
            variant: Variant {
                qk_norm: true,
                sandwich_norms: true,
                activation: Activation::GeluTanh,
                sliding_window: Some(3),
                ..Variant::default()
            },
            ..base
        },
        _ => base,
    }
}

/// The logits after `prompt`, then after each of `steps` fed one at a time.
fn logits(
    path: &std::path::Path,
    weights: Weights,
    prompt: &[u32],
    steps: &[u32],
) -> Vec<Vec<f32>> {
    let checkpoint = Checkpoint::open(path).unwrap();
    let whole = ShardSpec::whole(checkpoint.config().num_layers);
    let device = BackendKind::Flex.device().unwrap();
    let shard = LlamaShard::load_with(&checkpoint, &whole, &device, weights).unwrap();
    assert_eq!(shard.is_native(), weights != Weights::F32);
    let mut caches: Vec<KvCache> = vec![shard.new_cache()];
    let stages = [shard];
    let mut out = vec![forward_tokens(&stages, prompt, &mut caches).unwrap()];
    for &t in steps {
        out.push(forward_tokens(&stages, &[t], &mut caches).unwrap());
    }
    out
}

fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let mut worst = 0f32;
    let mut size = 0f32;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
            size = size.max(p.abs());
        }
    }
    (worst, size)
}

#[test]
fn every_family_runs_the_same_on_burn_and_on_the_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = [1u32, 40, 41, 42, 7, 9, 11, 60];
    let steps = [3u32, 77, 5, 12];
    let mut results = Vec::new();
    for model_type in ["llama", "qwen2", "qwen3", "gemma3"] {
        let path = dir.path().join(format!("{model_type}.gguf"));
        let config = family(model_type);
        write_gguf(&path, &config, 11).unwrap();
        let loaded = Checkpoint::open(&path).unwrap();
        let variant = &loaded.config().variant;
        if model_type == "gemma3" {
            // What llama.cpp fixes for the architecture, read back from the file.
            assert!(variant.qk_norm && variant.sandwich_norms);
            assert_eq!(variant.global_every, Some(6));
            assert_eq!(loaded.config().window_of(0), Some(3));
            assert_eq!(loaded.config().window_of(5), None);
        }
        let burn = logits(&path, Weights::F32, &prompt, &steps);
        let kernels = logits(&path, Weights::Stored, &prompt, &steps);
        let (worst, size) = largest_difference(&burn, &kernels);
        eprintln!("{model_type}: largest difference {worst} (largest logit {size})");
        assert!(
            worst <= 1e-3 * size.max(1.0),
            "{model_type}: max difference {worst} (largest logit {size})"
        );
        // Exported as a Hugging Face folder (Gemma's norms stored as `weight - 1`, its family's
        // config.json keys written) and read back, the model is the same.
        let folder = dir.path().join(format!("{model_type}-hf"));
        export_hf(&loaded, &folder, ExportDtype::F32).unwrap();
        let reloaded = Checkpoint::open(&folder).unwrap();
        let (mut read, mut wrote) = (reloaded.config().variant.clone(), variant.clone());
        let scale = |v: &Variant| v.attention_scale.unwrap_or(0.0);
        assert!((scale(&read) - scale(&wrote)).abs() < 1e-12, "{model_type}");
        (read.attention_scale, wrote.attention_scale) = (None, None);
        assert_eq!(read, wrote, "{model_type}");
        let from_folder = logits(&folder, Weights::Stored, &prompt, &steps);
        let (worst, size) = largest_difference(&kernels, &from_folder);
        assert!(
            worst <= 1e-4 * size.max(1.0),
            "{model_type} folder: {worst}"
        );
        results.push(burn);
    }
    // Each family's changes change the answer: the same weights as plain Llama give other logits.
    for (i, name) in ["qwen2", "qwen3", "gemma3"].iter().enumerate() {
        let (worst, _) = largest_difference(&results[0], &results[i + 1]);
        assert!(worst > 1e-2, "{name} computed what llama computes");
    }
}

#[test]
fn the_sliding_window_hides_what_lies_before_it() {
    let dir = tempfile::tempdir().unwrap();
    // Five layers (none of them Gemma 3's global sixth) whose window is one position: each
    // position sees only itself, so the last logits cannot depend on the tokens before it.
    let mut config = ModelConfig {
        num_layers: 5,
        ..family("gemma3")
    };
    config.variant.sliding_window = Some(1);
    let path = dir.path().join("gemma3.gguf");
    write_gguf(&path, &config, 3).unwrap();
    let (first, second) = ([1u32, 50, 41, 42, 7, 9], [1u32, 51, 43, 44, 8, 9]);
    for weights in [Weights::Stored, Weights::F32] {
        let a = logits(&path, weights, &first, &[12]);
        let b = logits(&path, weights, &second, &[12]);
        let (worst, size) = largest_difference(&a, &b);
        assert!(worst <= 1e-4 * size.max(1.0), "{weights:?}: {worst}");
    }
    // Without the window the same weights do see the earlier tokens.
    config.variant.sliding_window = None;
    config.model_type = "qwen3".into();
    let path = dir.path().join("qwen3.gguf");
    write_gguf(&path, &config, 3).unwrap();
    let a = logits(&path, Weights::Stored, &first, &[12]);
    let b = logits(&path, Weights::Stored, &second, &[12]);
    assert!(largest_difference(&a, &b).0 > 1e-3);
}

/// Log-probabilities of `logits` (log-softmax, in f64).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits.iter().map(|&v| v as f64 - max - sum.ln()).collect()
}

#[test]
fn each_family_gives_llama_cpps_five_most_likely_tokens_at_every_position() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families-llama.cpp.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
    let prompt = ids(&fixture["prompt"]);
    let default_model =
        exo_model::ensure_default_model(&exo_model::exo_home(), &mut |l| eprintln!("{l}")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in exo_model::testing::FIXTURE_FAMILIES {
        let file = dir.path().join(format!("{name}.gguf"));
        exo_model::testing::write_family_fixture(&file, name, &default_model).unwrap();
        let theirs = &fixture["families"][name];
        let tokens = ids(&theirs["tokens"]);
        let top5 = theirs["top5"].as_array().unwrap();
        assert_eq!(top5.len(), tokens.len(), "{name}");
        for weights in [Weights::F32, Weights::Stored] {
            // The logits after the prompt, then after each of llama.cpp's tokens but the last.
            let ours = logits(&file, weights, &prompt, &tokens[..tokens.len() - 1]);
            let mut worst = 0f64;
            for (position, (mine, want)) in ours.iter().zip(top5).enumerate() {
                let mine = log_softmax(mine);
                for pair in want.as_array().unwrap() {
                    let id = pair[0].as_u64().unwrap() as usize;
                    let logprob = pair[1].as_f64().unwrap();
                    let d = (mine[id] - logprob).abs();
                    worst = worst.max(d / logprob.abs().max(1.0));
                    assert!(
                        d <= 1e-3 * logprob.abs().max(1.0),
                        "{name} {weights:?}, position {position}, token {id}: ours {}, llama.cpp {logprob}",
                        mine[id]
                    );
                }
            }
            eprintln!("{name} {weights:?}: largest relative difference {worst:.2e}");
        }
        // Exported as a Hugging Face folder (Phi-3's fused matrices fused again, experts one
        // tensor each) and read back. Llama 3's per-frequency divisors have no `config.json`
        // form (the folder's own scaling is checked against them below).
        let loaded = Checkpoint::open(&file).unwrap();
        if loaded.config().variant.rope_freq_factors.is_some() {
            continue;
        }
        let folder = dir.path().join(format!("{name}-hf"));
        export_hf(&loaded, &folder, ExportDtype::F32).unwrap();
        let steps = &tokens[..2];
        let (worst, size) = largest_difference(
            &logits(&file, Weights::Stored, &prompt, steps),
            &logits(&folder, Weights::Stored, &prompt, steps),
        );
        assert!(worst <= 1e-4 * size.max(1.0), "{name} folder: {worst}");
    }
}

#[test]
fn llama_3_rope_frequencies_from_gguf_match_the_folders_rope_scaling() {
    let dir = tempfile::tempdir().unwrap();
    // Small enough an original context that every band of the scaling shows at short range.
    let scaling = exo_model::RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let config = ModelConfig {
        rope_scaling: Some(scaling.clone()),
        ..family("llama")
    };
    let folder = dir.path().join("llama3-hf");
    exo_model::testing::write_hf_folder(&folder, &config, 21, 1).unwrap();
    // The same weights as GGUF, with the scaling as llama.cpp's converter stores it: one divisor
    // per rotary frequency.
    let plain = dir.path().join("plain.gguf");
    write_gguf(&plain, &family("llama"), 21).unwrap();
    let half = config.head_dim / 2;
    let factors: Vec<f32> = (0..half)
        .map(|i| {
            let f = 1.0
                / config
                    .rope_theta
                    .powf((2 * i) as f64 / config.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let original = scaling.original_max_position_embeddings as f64;
            let (low, high) = (
                original / scaling.low_freq_factor,
                original / scaling.high_freq_factor,
            );
            if wavelen < high {
                1.0
            } else if wavelen > low {
                scaling.factor as f32
            } else {
                let smooth = (original / wavelen - scaling.low_freq_factor)
                    / (scaling.high_freq_factor - scaling.low_freq_factor);
                (1.0 / ((1.0 - smooth) / scaling.factor + smooth)) as f32
            }
        })
        .collect();
    let scaled = dir.path().join("llama3.gguf");
    exo_model::testing::rewrite_gguf(&plain, &scaled, |_, tensors| {
        tensors.push(exo_model::gguf::TensorToWrite {
            name: "rope_freqs.weight".into(),
            shape: vec![half],
            dtype: exo_model::DType::F32,
            data: factors.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    })
    .unwrap();
    let prompt = [1u32, 40, 41, 42, 7, 9, 11, 60];
    let steps = [3u32, 77];
    let from_folder = logits(&folder, Weights::Stored, &prompt, &steps);
    for weights in [Weights::Stored, Weights::F32] {
        let from_gguf = logits(&scaled, weights, &prompt, &steps);
        let (worst, size) = largest_difference(&from_folder, &from_gguf);
        assert!(worst <= 1e-3 * size.max(1.0), "{weights:?}: {worst}");
    }
    // Without the factors the answer differs: they are applied, not ignored.
    let unscaled = logits(&plain, Weights::Stored, &prompt, &steps);
    assert!(largest_difference(&from_folder, &unscaled).0 > 1e-3);
}

#[test]
fn a_mixture_of_experts_keeps_its_experts_quantized_and_answers_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    // Qwen3-MoE's layout at a width whose rows are whole Q4_K blocks: eight experts, two per
    // token.
    let config = ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        variant: Variant {
            qk_norm: true,
            moe: Some(exo_model::Moe {
                experts: 8,
                experts_per_token: 2,
                intermediate_size: 256,
                normalize: true,
            }),
            ..Variant::default()
        },
        ..family("qwen3")
    };
    let f32_file = dir.path().join("moe-f32.gguf");
    write_gguf(&f32_file, &config, 9).unwrap();
    let q4k_file = dir.path().join("moe-q4k.gguf");
    exo_model::testing::write_gguf_typed(&q4k_file, &config, 9, &|id| match id {
        exo_model::TensorId::Layer { part, .. } if part.expert().is_some() => exo_model::DType::Q4K,
        _ => exo_model::DType::F32,
    })
    .unwrap();
    let checkpoint = Checkpoint::open(&q4k_file).unwrap();
    let id = exo_model::TensorId::Layer {
        layer: 1,
        part: exo_model::LayerPart::ExpertDown(5),
    };
    assert_eq!(checkpoint.stored_dtype(id), Some(exo_model::DType::Q4K));
    // One expert's share of the stack: 256 x 256 weights in 144-byte blocks of 256.
    assert_eq!(checkpoint.stored_bytes(id), Some(256 * 144));

    let prompt = [1u32, 40, 41, 42, 7, 9, 11, 60];
    let steps = [3u32, 77, 5];
    let reference = logits(&f32_file, Weights::F32, &prompt, &steps);
    let quantized = logits(&q4k_file, Weights::Stored, &prompt, &steps);
    let mut worst = 0f32;
    for (position, (want, got)) in reference.iter().zip(&quantized).enumerate() {
        for t in common::top5(want) {
            let d = (want[t] - got[t]).abs();
            worst = worst.max(d);
            assert!(
                d < 0.5,
                "position {position}, token {t}: {} vs {}",
                want[t],
                got[t]
            );
        }
    }
    eprintln!("Q4_K experts: top-5 logits within {worst} of f32");
}
