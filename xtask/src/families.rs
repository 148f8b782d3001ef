//! `cargo xtask family-fixtures`: llama.cpp's outputs on small random models of each family
//! (`exo_model::testing::family_fixture`), recorded for `exo-shard`'s tests: for a fixed
//! prompt, the eight greedy tokens after it and, at each of those positions, llama.cpp's five
//! most likely tokens with their log-probabilities (before sampling, over the whole vocabulary).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use exo_model::testing::{FIXTURE_FAMILIES, write_family_fixture};

use crate::cluster::LlamaServer;

/// The prompt every family's fixture starts from (ids of the default model's vocabulary).
const PROMPT: [u32; 8] = [1, 504, 3458, 282, 4667, 314, 216, 1083];

/// Writes the fixtures file at `out`, running `server` (llama.cpp's `llama-server`) on each
/// family's model, written beside it with the tokenizer of `default_model`.
pub(crate) fn record(server: &Path, default_model: &Path, out: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("exo-family-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut families = serde_json::Map::new();
    for name in FIXTURE_FAMILIES {
        let model = dir.join(format!("{name}.gguf"));
        write_family_fixture(&model, name, default_model)?;
        eprintln!("llama-server on {}", model.display());
        let running = LlamaServer::start(server, &model, 2, 1, 64)?;
        let body = serde_json::json!({
            "prompt": PROMPT,
            "n_predict": 8,
            "temperature": 0.0,
            "top_k": 1,
            "samplers": ["top_k"],
            "ignore_eos": true,
            "cache_prompt": false,
            "return_tokens": true,
            "n_probs": 5,
        });
        let reply = post(&running.api, "/completion", &body.to_string())?;
        let tokens = reply["tokens"].clone();
        let positions: Vec<serde_json::Value> = reply["completion_probabilities"]
            .as_array()
            .context("no completion_probabilities in llama-server's reply")?
            .iter()
            .map(|p| {
                serde_json::Value::Array(
                    p["top_logprobs"]
                        .as_array()
                        .map(|top| {
                            top.iter()
                                .map(|t| serde_json::json!([t["id"], t["logprob"]]))
                                .collect()
                        })
                        .unwrap_or_default(),
                )
            })
            .collect();
        families.insert(
            name.into(),
            serde_json::json!({"tokens": tokens, "top5": positions}),
        );
        let _ = std::fs::remove_file(&model);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let fixture = serde_json::json!({
        "about": "llama.cpp (llama-server, CPU, f32 weights) on exo_model::testing::family_fixture \
                  models: 8 greedy tokens after `prompt`, and at each of those positions the five \
                  most likely [id, log-probability] pairs before sampling",
        "prompt": PROMPT,
        "families": families,
    });
    std::fs::write(out, serde_json::to_string_pretty(&fixture)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn post(api: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(api)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("no body in the reply to POST {path}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("POST {path}: {head}\n{body}");
    }
    serde_json::from_str(body).with_context(|| format!("POST {path} gave no JSON: {body}"))
}
