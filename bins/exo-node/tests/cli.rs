//! `exo-node` as a user runs it: `generate` on the default model, `models export` and
//! `models info`, and clear errors for bad model paths.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn exo_node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_exo-node"))
}

#[test]
fn generate_answers_with_the_default_model_and_reports_figures() {
    // The f32 reference path gives exactly the reference engines' greedy answer.
    let out = exo_node()
        .args([
            "generate",
            "What is the capital of France?",
            "--max-tokens",
            "16",
            "--weights",
            "f32",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "The capital of France is Paris.",
        "stderr: {stderr}"
    );
    let figures = stderr.lines().last().unwrap_or_default();
    assert!(
        figures.starts_with("prompt 37 tokens, generated 8 tokens"),
        "{figures}"
    );
    assert!(
        figures.contains("time to first token") && figures.contains("decode"),
        "{figures}"
    );
}

#[test]
fn the_default_quantized_path_answers_too() {
    let out = exo_node()
        .args([
            "generate",
            "What is the capital of France?",
            "--max-tokens",
            "16",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Stored weights"), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
    let figures = stderr.lines().last().unwrap_or_default();
    assert!(figures.contains("peak memory"), "{figures}");
}

#[test]
fn a_system_message_and_sampling_flags_are_used() {
    let run = |seed: &str| {
        let out = exo_node()
            .args([
                "generate",
                "Name a colour.",
                "--system",
                "Answer in one word.",
                "--max-tokens",
                "8",
            ])
            .args(["--temperature", "1.0", "--top-p", "0.95", "--seed", seed])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(run("7"), run("7"), "the same seed gives the same answer");
}

#[test]
fn export_writes_a_folder_that_generates() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    exo_model::testing::write_gguf(&gguf, &exo_model::testing::tiny_config(2), 3).unwrap();
    let folder = dir.path().join("tiny-hf");
    let out = exo_node()
        .args(["models", "export"])
        .arg(&gguf)
        .arg(&folder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(folder.join(file).exists(), "{file}");
    }
    // Exporting onto an existing folder is refused and leaves it alone.
    let again = exo_node()
        .args(["models", "export"])
        .arg(&gguf)
        .arg(&folder)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let info = exo_node()
        .args(["models", "info"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(info.status.success());
    assert!(String::from_utf8_lossy(&info.stdout).contains("layers           2"));

    let generated = exo_node()
        .args(["generate", "!!", "--raw", "--max-tokens", "3", "--model"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(String::from_utf8_lossy(&generated.stderr).contains("generated 3 tokens"));
}

#[test]
fn a_missing_or_corrupt_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let out = exo_node()
        .args(["generate", "hi", "--model"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nope.gguf") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = exo_node()
        .args(["generate", "hi", "--model"])
        .arg(&junk)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("junk.gguf") && stderr.contains("truncated"),
        "{stderr}"
    );
}
