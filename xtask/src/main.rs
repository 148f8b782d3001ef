//! Developer tasks: `cargo xtask ci` runs what CI runs; `cargo xtask bench` measures
//! `exo-node generate` on the default model and writes a table to `target/bench/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <ci | bench [--quick] [--runs N] [--tokens N]>";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The checks CI runs, in the same order.
fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["check", "-p", "exo-shard", "--features", "wgpu,ndarray"])?;
    cargo(&["test", "--workspace", "--release"])
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

struct Run {
    prompt_tokens: usize,
    generated_tokens: usize,
    ttft_ms: f64,
    prefill: f64,
    decode: f64,
}

/// Parses the figures line that `exo-node generate` prints last on stderr.
fn parse_figures(line: &str) -> Option<Run> {
    let num = |after: &str, before: &str| -> Option<f64> {
        let start = line.find(after)? + after.len();
        let rest = &line[start..];
        rest[..rest.find(before)?].trim().parse().ok()
    };
    Some(Run {
        prompt_tokens: num("prompt ", " tokens")? as usize,
        generated_tokens: num("generated ", " tokens")? as usize,
        ttft_ms: num("time to first token ", " ms")?,
        prefill: num("prefill ", " tokens/s")?,
        decode: num("decode ", " tokens/s")?,
    })
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let (lo, hi) = (v[0], v[v.len() - 1]);
    (v[v.len() / 2], lo, hi)
}

/// Single-node prefill and decode of `exo-node generate` on the default model.
fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == flag) {
            Some(i) => args
                .get(i + 1)
                .context("missing value")?
                .parse()
                .context(flag.to_string()),
            None => Ok(default),
        }
    };
    let runs = value("--runs", if quick { 2 } else { 5 })?;
    let tokens = value("--tokens", if quick { 32 } else { 128 })?;
    cargo(&["build", "--release", "-p", "exo-node"])?;
    let exe = target_dir().join("release").join("exo-node");
    let long_prompt = "Summarise the following text in one sentence. ".to_string()
        + &"The quick brown fox jumps over the lazy dog while the farmer watches from the hill. "
            .repeat(28);
    let workloads = [
        ("short prompt", "What is the capital of France?".to_string()),
        ("long prompt", long_prompt),
    ];
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for (name, prompt) in &workloads {
        let mut results = Vec::new();
        for i in 0..runs {
            let out = Command::new(&exe)
                .args([
                    "generate",
                    prompt,
                    "--ignore-eos",
                    "--max-tokens",
                    &tokens.to_string(),
                ])
                .output()
                .with_context(|| format!("running {}", exe.display()))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                bail!("exo-node generate failed:\n{stderr}");
            }
            let run = stderr
                .lines()
                .rev()
                .find_map(parse_figures)
                .context("no figures line")?;
            eprintln!(
                "{name} run {}: prefill {:.1} tok/s, decode {:.1} tok/s",
                i + 1,
                run.prefill,
                run.decode
            );
            results.push(run);
        }
        let prompt_tokens = results[0].prompt_tokens;
        let generated = results[0].generated_tokens;
        let (prefill, pl, ph) = median(results.iter().map(|r| r.prefill).collect());
        let (decode, dl, dh) = median(results.iter().map(|r| r.decode).collect());
        let (ttft, _, _) = median(results.iter().map(|r| r.ttft_ms).collect());
        rows.push(format!(
            "| {name} | {prompt_tokens} | {generated} | {prefill:.1} ({pl:.1}-{ph:.1}) | {decode:.1} ({dl:.1}-{dh:.1}) | {ttft:.0} |"
        ));
        json.push(format!(
            "{{\"workload\":\"{name}\",\"prompt_tokens\":{prompt_tokens},\"generated_tokens\":{generated},\
             \"prefill_tokens_per_s\":{prefill:.2},\"decode_tokens_per_s\":{decode:.2},\"ttft_ms\":{ttft:.1},\"runs\":{runs}}}"
        ));
    }
    let table = format!(
        "exo-node generate, default model (SmolLM2-135M-Instruct Q4_1 dequantized to f32), flex backend, \
         {runs} runs, median (min-max)\n\n\
         | workload | prompt tokens | generated | prefill tokens/s | decode tokens/s | TTFT ms |\n\
         |---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("generate.md"), &table)?;
    std::fs::write(
        dir.join("generate.json"),
        format!("[{}]\n", json.join(",\n")),
    )?;
    println!("{table}");
    println!("written to {}", dir.display());
    Ok(())
}
