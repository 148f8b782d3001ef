//! `exo-node` on corrupt GGUF files: a clear error and exit status 1, never an abort from a
//! count the file made up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use exo_model::gguf::Value;
use exo_model::testing::{rewrite_gguf, tiny_config, write_gguf};

fn exo_node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_exo-node"))
}

/// A tiny two-layer model whose metadata sets `key` to `value`.
fn corrupt_gguf(dir: &Path, key: &str, value: Value) -> std::path::PathBuf {
    let good = dir.join("good.gguf");
    write_gguf(&good, &tiny_config(2), 3).unwrap();
    let bad = dir.join("bad.gguf");
    rewrite_gguf(&good, &bad, |metadata, _| {
        let entry = metadata.iter_mut().find(|(k, _)| k == key);
        entry.unwrap_or_else(|| panic!("no `{key}`")).1 = value;
    })
    .unwrap();
    bad
}

/// Exit status 1 and a message on stderr that names the file and contains every one of
/// `needles`.
fn assert_clear_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in ["bad.gguf"].iter().chain(needles) {
        assert!(stderr.contains(needle), "no `{needle}` in: {stderr}");
    }
}

#[test]
fn a_block_count_of_four_billion_is_a_clear_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let bad = corrupt_gguf(dir.path(), "llama.block_count", Value::U32(u32::MAX));
    let needles = ["`llama.block_count` is 4294967295", "tensors for 2 layers"];

    let out = exo_node()
        .args(["models", "info"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_clear_failure(&out, &needles);

    let out = exo_node()
        .args(["generate", "hi", "--model"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_clear_failure(&out, &needles);
}

#[test]
fn a_context_length_of_four_billion_is_a_clear_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let bad = corrupt_gguf(dir.path(), "llama.context_length", Value::U32(u32::MAX));
    let out = exo_node()
        .args(["generate", "hi", "--model"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_clear_failure(&out, &["`llama.context_length` is 4294967295"]);
}
