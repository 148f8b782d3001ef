//! `exo-node generate --node URL`: ask a running node to generate, and print its answer.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use exo_core::{ChatMessage, GenerationEvent, GenerationRequest, Prompt, SamplingParams};
use exo_topology::{CLUSTER_KEY_FILE, ClusterKey};
use exo_transport::{Credential, Limits, ShardClient};

use crate::GenerateArgs;

/// The shard service credential of the cluster key given, or of the one in
/// `$EXO_HOME/cluster.key`.
fn credential(given: Option<&str>) -> Result<Credential> {
    let key = match given {
        Some(key) => ClusterKey::parse(key, "--cluster-key")?,
        None => {
            let path = exo_model::exo_home().join(CLUSTER_KEY_FILE);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading the cluster key from {} (give it with --cluster-key)",
                    path.display()
                )
            })?;
            ClusterKey::parse(&text, &path.display().to_string())?
        }
    };
    Ok(Credential::new(key.derive(Credential::PURPOSE)))
}

/// A single-threaded runtime: these commands only wait on one node.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn generate(args: GenerateArgs) -> Result<()> {
    let endpoint = args.node.clone().unwrap_or_default();
    let show_ids = args.show_token_ids;
    let credential = credential(args.cluster_key.as_deref())?;
    let prompt = if args.raw {
        Prompt::Raw(args.prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", args.prompt));
        Prompt::Chat(messages)
    };
    let request = GenerationRequest {
        logprobs: None,
        embed: false,
        prompt_logprobs: None,
        penalties: Default::default(),
        constraint: None,
        tools: Vec::new(),
        share_prefill: None,
        model: String::new(),
        prompt,
        max_tokens: Some(u32::try_from(args.max_tokens).unwrap_or(u32::MAX).max(1)),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: u32::try_from(args.top_k).unwrap_or(u32::MAX),
            seed: args.seed,
        },
        stop: args.stop,
        ignore_eos: args.ignore_eos,
    };
    runtime()?.block_on(async move {
        let started = Instant::now();
        let client = ShardClient::connect(&endpoint, Some(&credential), Limits::default()).await?;
        let mut events = client.generate(&request).await?;
        let mut stdout = std::io::stdout().lock();
        while let Some(item) = events.next().await? {
            match item? {
                GenerationEvent::Text(piece) => {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }
                // Not asked for here.
                GenerationEvent::Logprob(_)
                | GenerationEvent::Embedding(_)
                | GenerationEvent::PromptLogprobs(_) => {}
                GenerationEvent::Finished(f) => {
                    let _ = writeln!(stdout);
                    eprintln!(
                        "prompt {} tokens, generated {} tokens, time to first token {:.0} ms, decode {:.1} tokens/s (through {endpoint}, {:.2} s in all)",
                        f.prompt_tokens,
                        f.token_ids.len(),
                        f.time_to_first_token_s * 1e3,
                        f.decode_tokens_per_s(),
                        started.elapsed().as_secs_f64()
                    );
                    if show_ids {
                        eprintln!("token ids: {:?}", f.token_ids);
                    }
                }
            }
        }
        anyhow::Ok(())
    })
}

pub(crate) fn status(endpoint: &str, cluster_key: Option<&str>) -> Result<()> {
    let credential = credential(cluster_key)?;
    let s = runtime()?.block_on(async {
        ShardClient::connect(endpoint, Some(&credential), Limits::default())
            .await?
            .status()
            .await
    })?;
    println!(
        "{}",
        serde_json::json!({
            "node_id": s.node_id,
            "model": s.model,
            "epoch": s.epoch.map(|e| e.to_string()),
            "layers": [s.layers.start, s.layers.end],
            "ready": s.ready,
            "active_requests": s.active_requests,
            "weight_bytes": s.weight_bytes,
            "resident_bytes": s.resident_bytes,
            "activation_bytes_sent": s.activation_bytes_sent,
            "activation_frames_sent": s.activation_frames_sent,
            "activation_positions_sent": s.activation_positions_sent,
            "steps_computed": s.steps_computed,
            "positions_computed": s.positions_computed,
            "compute_nanos": s.compute_nanos,
            "decode_steps": s.decode_steps,
            "decode_nanos": s.decode_nanos,
        })
    );
    Ok(())
}
