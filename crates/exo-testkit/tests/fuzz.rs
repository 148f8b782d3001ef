//! Bounded fuzzing in `cargo test` (stable Rust, `exo_testkit::fuzz`): what a file, a peer or
//! an HTTP client can hand a node, mutated from valid seeds, must never make it panic.
//!
//! - GGUF files and Hugging Face folders (config and safetensors): opened, their tokenizer and
//!   chat template built, the shard loaded on the CPU kernels and run on two tokens;
//! - every protobuf message a peer can send, through the checks and conversions a handler's
//!   input passes;
//! - request bodies of every generating route, mutated as JSON trees and as bytes, against the
//!   API with a scripted engine: never a 500;
//! - both sides of the join exchange (`exo-node invite` / `join`) against mutated transcripts:
//!   never a crash, and never a key handed on or accepted;
//! - model manifests a peer sends (`exo-store`), mutated as JSON trees and as bytes (with the
//!   hash made to match, so they reach the checks), and what a node then does with one.
//!
//! Each target runs a fixed number of executions within a time budget and prints what it did.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use exo_model::testing::{tiny_config, write_gguf, write_gguf_typed, write_hf_folder};
use exo_model::{Checkpoint, DType, ShardSpec};
use exo_shard::{BackendKind, LlamaShard, Weights};
use exo_testkit::fuzz::{self, Mutator};
use serde_json::{Value, json};

/// Executions per target, and the time each may take at most (CI runs on 2 cores).
const EXECUTIONS: usize = 20_000;
const BUDGET: Duration = Duration::from_secs(20);

/// How far a mutant got: opened, its tokenizer built, its shard loaded, run on two tokens.
#[derive(Debug, Default)]
struct Depth {
    opened: usize,
    tokenized: usize,
    loaded: usize,
    ran: usize,
}

/// Whatever a checkpoint at `path` holds, the steps a node takes with it: errors are fine,
/// panics are not.
fn load_and_run(path: &Path, depth: &mut Depth) {
    let Ok(checkpoint) = Checkpoint::open(path) else {
        return;
    };
    depth.opened += 1;
    if let Ok(tokenizer) = checkpoint.tokenizer() {
        depth.tokenized += 1;
        let _ = tokenizer.encode("Hello, world! <|im_start|>");
        let _ = tokenizer.decode(&[0, 1, 2, 3]);
        let _ = checkpoint.chat_template_with(&tokenizer);
    }
    let config = checkpoint.config();
    // A file may claim any number of layers: the loader checks the tensors it finds.
    if config.num_layers > 64 || config.hidden_size > 4096 || config.vocab_size > 1 << 20 {
        return;
    }
    let spec = ShardSpec::whole(config.num_layers);
    let device = BackendKind::Flex.device().unwrap();
    let Ok(shard) = LlamaShard::load_with(&checkpoint, &spec, &device, Weights::Stored) else {
        return;
    };
    depth.loaded += 1;
    let mut x = Vec::new();
    if shard.embed_into(&[1, 2], &mut x).is_err() {
        return;
    }
    let mut cache = shard.new_cache();
    if shard.forward_in_place(&mut x, &mut cache).is_ok() {
        let mut logits = Vec::new();
        let _ = shard.logits_rows(&x, &mut cache, &mut logits);
        depth.ran += 1;
    }
}

#[test]
fn gguf_files_never_crash_a_loader() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = Vec::new();
    let config = tiny_config(2);
    for (i, dtype) in [DType::F32, DType::Q8_0, DType::Q4_0]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("seed{i}.gguf"));
        write_gguf_typed(&path, &config, 3, &|_| dtype).unwrap();
        seeds.push(std::fs::read(&path).unwrap());
    }
    let plain = dir.path().join("plain.gguf");
    write_gguf(&plain, &tiny_config(1), 4).unwrap();
    seeds.push(std::fs::read(&plain).unwrap());
    let target = dir.path().join("mutant.gguf");
    let mut depth = Depth::default();
    let run = fuzz::run("gguf", &seeds, EXECUTIONS, BUDGET, 8192, |bytes| {
        std::fs::write(&target, bytes).unwrap();
        load_and_run(&target, &mut depth);
    });
    eprintln!("gguf: {run:?}, {depth:?}");
    assert!(run.executions >= seeds.len());
}

#[test]
fn hugging_face_folders_never_crash_a_loader() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed");
    write_hf_folder(&seed, &tiny_config(2), 5, 1).unwrap();
    let config = std::fs::read(seed.join("config.json")).unwrap();
    let weights = std::fs::read(seed.join("model.safetensors")).unwrap();
    let folder = dir.path().join("mutant");
    std::fs::create_dir_all(&folder).unwrap();
    // Even executions mutate the config, odd ones the safetensors header.
    let mut mutator = Mutator::new(11);
    let mut turn = 0usize;
    let mut depth = Depth::default();
    let run = fuzz::run(
        "safetensors",
        std::slice::from_ref(&weights),
        EXECUTIONS,
        BUDGET,
        4096,
        |mutant| {
            turn += 1;
            let (config, weights) = if turn.is_multiple_of(2) {
                (mutator.mutate(&config, config.len()), weights.as_slice())
            } else {
                (config.clone(), mutant)
            };
            std::fs::write(folder.join("config.json"), config).unwrap();
            std::fs::write(folder.join("model.safetensors"), weights).unwrap();
            load_and_run(&folder, &mut depth);
        },
    );
    eprintln!("safetensors: {run:?}, {depth:?}");
}

#[test]
fn peer_messages_never_crash_a_node() {
    use exo_transport::testing::{MESSAGE_KINDS, accept_untrusted, sample_messages};
    for kind in MESSAGE_KINDS {
        let seeds = sample_messages(kind);
        assert!(!seeds.is_empty(), "{kind}: no seeds");
        for seed in &seeds {
            assert!(accept_untrusted(kind, seed), "{kind}: a seed is refused");
        }
        let mut accepted = 0;
        // Decoding takes microseconds: ten times the executions.
        let run = fuzz::run(kind, &seeds, EXECUTIONS * 10, BUDGET, 256, |bytes| {
            accepted += usize::from(accept_untrusted(kind, bytes));
        });
        eprintln!("{kind}: {run:?}, {accepted} accepted");
    }
}

#[test]
fn the_join_exchange_never_crashes_either_side() {
    use exo_topology::join_testing::{fetch_against, offer_against, seeds};
    let (joining, inviting) = seeds();
    let mut handed = 0;
    let run = fuzz::run(
        "join-inviter",
        &[joining],
        EXECUTIONS,
        BUDGET,
        64,
        |bytes| {
            handed += usize::from(offer_against(bytes));
        },
    );
    eprintln!("join-inviter: {run:?}");
    assert_eq!(
        handed, 0,
        "an inviter handed the key to a mutant that cannot know the code"
    );
    let mut accepted = 0;
    let run = fuzz::run(
        "join-joiner",
        &[inviting],
        EXECUTIONS,
        BUDGET,
        160,
        |bytes| {
            accepted += usize::from(fetch_against(bytes));
        },
    );
    eprintln!("join-joiner: {run:?}");
    assert_eq!(
        accepted, 0,
        "a joiner accepted a key from a mutant that cannot know the code"
    );
}

#[test]
fn manifests_from_peers_never_crash_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.gguf");
    write_gguf(&path, &tiny_config(3), 5).unwrap();
    let manifest = exo_store::Manifest::of_model_chunked(&path, 512, |_, _| {}).unwrap();
    let seed: Value = serde_json::from_slice(&manifest.to_bytes()).unwrap();
    let mut mutator = Mutator::new(41);
    let mut parsed = 0usize;
    let run = fuzz::run(
        "manifest",
        &[manifest.to_bytes()],
        EXECUTIONS,
        BUDGET,
        0,
        |bytes| {
            let bytes = if mutator.below(3) < 2 {
                let mut tree = seed.clone();
                for _ in 0..1 + mutator.below(3) {
                    mutate_tree(&mut tree, &mut mutator);
                }
                tree.to_string().into_bytes()
            } else {
                mutator.mutate(bytes, bytes.len())
            };
            let hash = exo_store::hash_hex(&bytes);
            let Ok(m) = exo_store::Manifest::from_bytes(&bytes, &hash) else {
                return;
            };
            parsed += 1;
            for (layers, embedding, head) in [
                (0..1, true, false),
                (1..3, false, true),
                (0..usize::MAX, true, true),
            ] {
                let parts = exo_store::ShardParts {
                    layers,
                    embedding,
                    head,
                };
                let set = m.chunks_for_shard(&parts);
                let _ = m.bytes_of(&set);
            }
            let _ = (m.header().covers(m.chunk_count()), m.hash());
        },
    );
    eprintln!("manifest: {run:?}, {parsed} parsed");
    assert!(parsed > 0);
}

/// A JSON tree with one node replaced by a value of some other shape.
fn mutate_tree(value: &mut Value, mutator: &mut Mutator) {
    let replacement = |m: &mut Mutator| match m.below(10) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1e300),
        4 => json!(u64::MAX),
        5 => json!(""),
        6 => json!("x".repeat(m.below(5000))),
        7 => json!([]),
        8 => json!({}),
        _ => json!([{"role": "tool", "content": null}, 3]),
    };
    let mut node = value;
    loop {
        let children = match node {
            Value::Array(items) if !items.is_empty() => items.len(),
            Value::Object(map) if !map.is_empty() => map.len(),
            _ => 0,
        };
        // Stop here, or go down into a child.
        if children == 0 || mutator.below(3) == 0 {
            *node = replacement(mutator);
            return;
        }
        let pick = mutator.below(children);
        node = match node {
            Value::Array(items) => &mut items[pick],
            Value::Object(map) => {
                let Some(key) = map.keys().nth(pick).cloned() else {
                    return;
                };
                if mutator.below(8) == 0 {
                    // Or drop the field.
                    map.remove(&key);
                    return;
                }
                map.get_mut(&key).unwrap()
            }
            _ => return,
        };
    }
}

#[test]
fn request_bodies_never_get_a_500() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = exo_testkit::fake::FakeEngine::new().build();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    let config = exo_api::ApiConfig {
        max_concurrent: 64,
        max_queued: 64,
        ..exo_api::ApiConfig::default()
    };
    let server = exo_api::serve(listener, engine, config, std::future::pending());
    runtime.spawn(async move {
        let _ = server.await;
    });
    let model = "llama-3.2-1b";
    let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}});
    let routes: Vec<(&str, Value)> = vec![
        (
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "r"}], "tools": [tool], "tool_choice": "auto", "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2, "n": 2, "logit_bias": {"5": 1}, "stop": ["x"], "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}}),
        ),
        (
            "/v1/completions",
            json!({"model": model, "prompt": "Once", "max_tokens": 4, "echo": true, "logprobs": 2, "stream": false, "seed": 3}),
        ),
        (
            "/v1/embeddings",
            json!({"model": model, "input": ["a", "b"], "encoding_format": "base64"}),
        ),
        (
            "/v1/responses",
            json!({"model": model, "instructions": "i", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}, {"type": "function_call_output", "call_id": "c", "output": "o"}], "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}], "text": {"format": {"type": "json_object"}}, "stream": true}),
        ),
        (
            "/v1/messages",
            json!({"model": model, "max_tokens": 8, "system": "s", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]}], "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}, "stream": true}),
        ),
        (
            "/api/chat",
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "format": {"type": "object"}, "options": {"num_predict": 4, "temperature": 0.5}, "stream": false}),
        ),
        (
            "/api/generate",
            json!({"model": model, "prompt": "p", "system": "s", "raw": false, "options": {"num_predict": 4}}),
        ),
        ("/api/embed", json!({"model": model, "input": ["a"]})),
    ];
    let mut mutator = Mutator::new(29);
    let mut statuses = std::collections::BTreeMap::new();
    let seeds: Vec<Vec<u8>> = (0..routes.len())
        .map(|i| i.to_le_bytes().to_vec())
        .collect();
    let run = fuzz::run("api", &seeds, EXECUTIONS, BUDGET, 0, |pick| {
        let route = usize::from(pick.first().copied().unwrap_or(0)) % routes.len();
        let (path, body) = &routes[route];
        // Two in three as JSON trees (reaching the fields' checks), one as bytes.
        let bytes = if mutator.below(3) < 2 {
            let mut tree = body.clone();
            for _ in 0..1 + mutator.below(3) {
                mutate_tree(&mut tree, &mut mutator);
            }
            tree.to_string().into_bytes()
        } else {
            let text = body.to_string().into_bytes();
            mutator.mutate(&text, text.len())
        };
        let status = runtime.block_on(post_raw(address, path, &bytes));
        *statuses.entry(status).or_insert(0usize) += 1;
        assert_ne!(status, 500, "{path}: {}", String::from_utf8_lossy(&bytes));
        assert_ne!(
            status,
            0,
            "{path}: no answer to {}",
            String::from_utf8_lossy(&bytes)
        );
    });
    eprintln!("api: {run:?}, statuses {statuses:?}");
}

/// POSTs `body` as it is and returns the status (0 when the answer had none).
async fn post_raw(address: std::net::SocketAddr, path: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "{path}: no answer within 30 s");
    String::from_utf8_lossy(&raw)
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
