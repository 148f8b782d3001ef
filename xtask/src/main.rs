//! Developer tasks: `cargo xtask ci` runs what CI runs; `cargo xtask bench` measures
//! `exo-node generate` on the default model and writes a table to `target/bench/`, with a
//! matrix of formats and two model sizes beside llama.cpp; `cargo xtask synth-model` makes that
//! matrix's models; `cargo xtask bench-failover` kills stages mid-answer and reports the pauses.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod cluster;
mod failover;
mod families;
mod formats;
mod modules;

const USAGE: &str = "usage: cargo xtask <ci | bench [--quick] [--runs N] [--llama-bench PATH | --no-llama] [--no-cluster] [--no-formats | --formats-only] [--formats Q4_K_M,Q8_0,...] [--shapes default,1b,gemma3] | bench-cluster [--exe PATH]... [--runs N] [--quick] [--no-llama] [--no-api | --api-only] | bench-failover [--kills N] [--exe PATH] | synth-model [--formats ...] [--shapes ...] | family-fixtures | bandwidth | modules>";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("bench-cluster") => bench_cluster(&args[1..]),
        Some("bench-failover") => failover::run(&args[1..]),
        Some("modules") => modules::check(&root()),
        Some("synth-model") => synth_model(&args[1..]),
        Some("family-fixtures") => family_fixtures(),
        Some("bandwidth") => {
            for threads in [1, 2] {
                println!(
                    "memory read bandwidth, {threads} thread(s): {:.1} GB/s",
                    formats::read_bandwidth(threads)
                );
            }
            Ok(())
        }
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

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("exo-rs")
}

/// The figures line that `exo-node generate` prints last on stderr.
#[derive(Clone, Debug)]
struct Figures {
    prompt_tokens: usize,
    generated_tokens: usize,
    ttft_ms: f64,
    prefill: f64,
    decode: f64,
    peak_mib: Option<f64>,
}

/// The number between `after` and the next `before` in `line`.
fn number_between(line: &str, after: &str, before: &str) -> Option<f64> {
    let start = line.find(after)? + after.len();
    let rest = &line[start..];
    rest[..rest.find(before)?].trim().parse().ok()
}

/// `exo-node generate PROMPT --raw --ignore-eos --max-tokens N`, to which callers add flags.
fn generate_command(exe: &Path, prompt: &str, tokens: usize) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(["generate", prompt, "--raw", "--ignore-eos"])
        .args(["--max-tokens", &tokens.to_string()]);
    cmd
}

fn parse_figures(line: &str) -> Option<Figures> {
    let num = |after: &str, before: &str| number_between(line, after, before);
    Some(Figures {
        prompt_tokens: num("prompt ", " tokens")? as usize,
        generated_tokens: num("generated ", " tokens")? as usize,
        ttft_ms: num("time to first token ", " ms")?,
        prefill: num("prefill ", " tokens/s")?,
        decode: num("decode ", " tokens/s")?,
        peak_mib: num("peak memory ", " MiB"),
    })
}

/// Median with the smallest and largest value.
fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt_spread((m, lo, hi): (f64, f64, f64)) -> String {
    format!("{m:.1} ({lo:.1}-{hi:.1})")
}

/// One run of `exo-node generate`.
fn run_ours(
    exe: &Path,
    prompt: &str,
    tokens: usize,
    threads: usize,
    weights: &str,
) -> Result<Figures> {
    let out = generate_command(exe, prompt, tokens)
        .args(["--threads", &threads.to_string(), "--weights", weights])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("exo-node generate failed:\n{stderr}");
    }
    stderr
        .lines()
        .rev()
        .find_map(parse_figures)
        .context("no figures line from exo-node")
}

/// One run of llama.cpp's `llama-bench` (pp `prompt` and tg `generated` tokens): tokens/s of each
/// (no prefill figure when `prompt` is 0).
fn run_llama(
    exe: &Path,
    model: &Path,
    threads: usize,
    prompt: usize,
    generated: usize,
) -> Result<(Option<f64>, f64)> {
    let out = Command::new(exe)
        .arg("-m")
        .arg(model)
        .args([
            "-p",
            &prompt.to_string(),
            "-n",
            &generated.to_string(),
            "-r",
            "1",
            "-o",
            "json",
            "-t",
            &threads.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "llama-bench failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each result object has "n_prompt", "n_gen" and "avg_ts"; read them without a JSON crate.
    let mut pp = None;
    let mut tg = None;
    for obj in stdout.split('}') {
        let field = |name: &str| -> Option<f64> {
            let at = obj.find(&format!("\"{name}\""))?;
            let rest = obj[at..].split_once(':')?.1;
            rest.trim_start()
                .split([',', '\n'])
                .next()?
                .trim()
                .parse()
                .ok()
        };
        match (field("n_prompt"), field("n_gen"), field("avg_ts")) {
            (Some(p), Some(g), Some(ts)) if p > 0.0 && g == 0.0 => pp = Some(ts),
            (Some(p), Some(g), Some(ts)) if p == 0.0 && g > 0.0 => tg = Some(ts),
            _ => {}
        }
    }
    if prompt > 0 && pp.is_none() {
        bail!("no pp result from llama-bench");
    }
    Ok((pp, tg.context("no tg result from llama-bench")?))
}

/// A thread that keeps one core busy until dropped, as another program on the machine would.
struct BusyNeighbour {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BusyNeighbour {
    fn start() -> BusyNeighbour {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut x = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        BusyNeighbour {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BusyNeighbour {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// llama.cpp's `llama-bench`, built once into the cache (see [`build_llama_tools`]).
fn build_llama_bench() -> Result<PathBuf> {
    Ok(build_llama_tools(false)?.0)
}

/// llama.cpp's `llama-server` (continuous batching), built once from the same source and
/// flags as `llama-bench`.
fn build_llama_server() -> Result<PathBuf> {
    build_llama_tools(false)?;
    Ok(build_llama_tools(true)?.2)
}

/// Builds llama.cpp's `llama-bench` and `llama-quantize` once into the cache, from the PyPI
/// source distribution of llama-cpp-python (which vendors llama.cpp), with portable SIMD flags
/// chosen for this CPU: `GGML_NATIVE=ON` dies with an illegal instruction on CPUs that
/// advertise AMX without allowing it, and the AVX-512 options only where the CPU has AVX-512
/// (one build directory per choice, so a cache moved between machines stays right).
fn build_llama_tools(server: bool) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = cache_dir().join("llama-bench");
    let avx512 = has_avx512();
    let build = if avx512 { "build" } else { "build-avx2" };
    let bin = dir.join(build).join("bin");
    let (bench, quantize) = (bin.join("llama-bench"), bin.join("llama-quantize"));
    let built = if server {
        bin.join("llama-server").exists()
    } else {
        bench.exists() && quantize.exists()
    };
    if built {
        return Ok((bench, quantize, bin.join("llama-server")));
    }
    std::fs::create_dir_all(&dir)?;
    let sh = |script: &str| -> Result<()> {
        eprintln!("$ {script}");
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .status()?;
        if !status.success() {
            bail!("`{script}` failed ({status})");
        }
        Ok(())
    };
    sh("command -v cmake >/dev/null || python3 -m pip install -q cmake ninja")?;
    sh(
        "ls llama_cpp_python-*.tar.gz >/dev/null 2>&1 || python3 -m pip download -q --no-deps \
        --no-binary llama-cpp-python llama-cpp-python -d .",
    )?;
    sh(
        "test -d src || { tar xzf llama_cpp_python-*.tar.gz && mv llama_cpp_python-*/vendor/llama.cpp src; }",
    )?;
    sh(&format!(
        "cmake -S src -B {build} -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON \
            -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512={on} \
            -DGGML_AVX512_VNNI={on} -DGGML_AVX512_VBMI={on} -DGGML_AVX512_BF16={on} \
            -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF \
            -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=ON >/dev/null",
        on = if avx512 { "ON" } else { "OFF" }
    ))?;
    sh(&format!(
        "cmake --build {build} --target {targets} -j 2 >/dev/null",
        targets = if server {
            "llama-server"
        } else {
            "llama-bench llama-quantize"
        }
    ))?;
    Ok((bench, quantize, bin.join("llama-server")))
}

/// Single-node figures of `exo-node generate` on the default model and, when llama.cpp's
/// `llama-bench` is available, the same workload side by side at 1 and 2 threads, the two
/// engines run alternately so that neither is favoured by what else the machine is doing.
fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let runs: usize = match flag("--runs") {
        Some(v) => v.parse().context("--runs")?,
        None if quick => 1,
        None => 3,
    };
    cargo(&["build", "--release", "-p", "exo-node"])?;
    let exe = target_dir().join("release").join("exo-node");
    let model = Command::new(&exe).args(["models", "fetch"]).output()?;
    let model = PathBuf::from(String::from_utf8_lossy(&model.stdout).trim());
    let llama = if args.iter().any(|a| a == "--no-llama") {
        None
    } else if let Some(path) = flag("--llama-bench") {
        Some(PathBuf::from(path))
    } else {
        match build_llama_bench() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("llama-bench unavailable, comparing nothing: {e:#}");
                None
            }
        }
    };
    let mut md = String::new();
    let mut json = Vec::new();
    if !args.iter().any(|a| a == "--formats-only") {
        default_tables(
            &exe,
            &model,
            llama.as_deref(),
            runs,
            quick,
            args,
            &mut md,
            &mut json,
        )?;
    }
    if !args.iter().any(|a| a == "--no-formats") {
        let (shapes, list) = matrix_choice(args)?;
        let quantize = build_llama_tools(false)?.1;
        formats::synth_models(&quantize, &model, &shapes, &list)?;
        formats::matrix(
            &exe,
            llama.as_deref(),
            &model,
            &shapes,
            &list,
            runs,
            quick,
            &mut md,
            &mut json,
        )?;
    }
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.md"), &md)?;
    std::fs::write(dir.join("bench.json"), format!("[{}]\n", json.join(",\n")))?;
    println!("{md}");
    println!("written to {}", dir.display());
    Ok(())
}

/// Whether this CPU has the AVX-512 subsets llama.cpp's AVX-512 build uses.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// The single-model tables: the default model at 1 and 2 threads beside llama.cpp, prefill by
/// prompt length, decode beside a busy process, and (unless `--no-cluster`) the cluster and
/// API tables.
#[allow(clippy::too_many_arguments)]
fn default_tables(
    exe: &Path,
    model: &Path,
    llama: Option<&Path>,
    runs: usize,
    quick: bool,
    args: &[String],
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    // About 128 tokens of prompt, as llama-bench's pp128.
    let prompt =
        "The quick brown fox jumps over the lazy dog while the farmer watches from the hill. "
            .repeat(7);
    let tokens = if quick { 32 } else { 128 };
    md.push_str(&format!(
        "Default model (SmolLM2-135M-Instruct, Q4_1 GGUF), prompt of ~128 tokens, {tokens} generated \
         tokens, {runs} run(s) each, median (min-max); tokens/s.\n\n"
    ));
    md.push_str(
        "| threads | engine | prefill | decode | TTFT ms | peak MiB |\n|---|---|---|---|---|---|\n",
    );
    let mut side = String::from(
        "\n| threads | prefill ours / llama.cpp | decode ours / llama.cpp |\n|---|---|---|\n",
    );
    for threads in [1usize, 2] {
        let mut ours = Vec::new();
        let mut reference = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..runs {
            ours.push(run_ours(exe, &prompt, tokens, threads, "auto")?);
            if let Some(llama) = &llama {
                let (pp, tg) = run_llama(llama, model, threads, 128, 128)?;
                theirs.push((pp.unwrap_or(0.0), tg));
            }
            if !quick {
                reference.push(run_ours(exe, &prompt, tokens, threads, "f32")?);
            }
        }
        let row = |name: &str, f: &[Figures], md: &mut String, json: &mut Vec<String>| {
            if f.is_empty() {
                return;
            }
            let pre = median(f.iter().map(|r| r.prefill).collect());
            let dec = median(f.iter().map(|r| r.decode).collect());
            let ttft = median(f.iter().map(|r| r.ttft_ms).collect());
            let peak = median(f.iter().filter_map(|r| r.peak_mib).collect());
            md.push_str(&format!(
                "| {threads} | {name} | {} | {} | {:.0} | {:.0} |\n",
                fmt_spread(pre),
                fmt_spread(dec),
                ttft.0,
                peak.0
            ));
            json.push(format!(
                "{{\"threads\":{threads},\"engine\":\"{name}\",\"prompt_tokens\":{},\"generated_tokens\":{},\
                 \"prefill_tokens_per_s\":{:.2},\"decode_tokens_per_s\":{:.2},\"ttft_ms\":{:.1},\"peak_mib\":{:.1}}}",
                f[0].prompt_tokens, f[0].generated_tokens, pre.0, dec.0, ttft.0, peak.0
            ));
        };
        row("exo-rs (quantized CPU kernels)", &ours, md, json);
        row("exo-rs (f32, burn-flex)", &reference, md, json);
        if !theirs.is_empty() {
            let pp = median(theirs.iter().map(|t| t.0).collect());
            let tg = median(theirs.iter().map(|t| t.1).collect());
            md.push_str(&format!(
                "| {threads} | llama.cpp llama-bench pp128/tg128 | {} | {} | | |\n",
                fmt_spread(pp),
                fmt_spread(tg)
            ));
            json.push(format!(
                "{{\"threads\":{threads},\"engine\":\"llama.cpp\",\"prefill_tokens_per_s\":{:.2},\"decode_tokens_per_s\":{:.2}}}",
                pp.0, tg.0
            ));
            let ours_pp = median(ours.iter().map(|r| r.prefill).collect()).0;
            let ours_tg = median(ours.iter().map(|r| r.decode).collect()).0;
            side.push_str(&format!(
                "| {threads} | {:.2}x | {:.2}x |\n",
                ours_pp / pp.0,
                ours_tg / tg.0
            ));
        }
    }
    if llama.is_some() {
        md.push_str(&side);
    }
    md.push_str(
        "\nPrefill by prompt length (quantized CPU kernels, 1 generated token):\n\n\
         | threads | prompt tokens | prefill tokens/s | TTFT ms |\n|---|---|---|---|\n",
    );
    let sentence =
        "The quick brown fox jumps over the lazy dog while the farmer watches from the hill. ";
    for threads in [1usize, 2] {
        // About 32 and about 512 tokens.
        for repeats in [2usize, 28] {
            let text = sentence.repeat(repeats);
            let mut f = Vec::new();
            for _ in 0..runs {
                f.push(run_ours(exe, &text, 1, threads, "auto")?);
            }
            let pre = median(f.iter().map(|r| r.prefill).collect());
            let ttft = median(f.iter().map(|r| r.ttft_ms).collect());
            md.push_str(&format!(
                "| {threads} | {} | {} | {:.0} |\n",
                f[0].prompt_tokens,
                fmt_spread(pre),
                ttft.0
            ));
            json.push(format!(
                "{{\"threads\":{threads},\"prompt_tokens\":{},\"prefill_tokens_per_s\":{:.2},\"ttft_ms\":{:.1}}}",
                f[0].prompt_tokens, pre.0, ttft.0
            ));
        }
    }
    {
        // Two threads beside one busy core: threads that spin waiting for each other collapse.
        let generated = 32;
        md.push_str(&format!(
            "\nBeside a busy process (a thread of the bench spinning on one of the cores), 2 threads, \
             {generated} generated tokens:\n\n| engine | decode tokens/s |\n|---|---|\n"
        ));
        let busy = BusyNeighbour::start();
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..runs {
            ours.push(run_ours(exe, &prompt, generated, 2, "auto")?.decode);
            if let Some(llama) = &llama {
                theirs.push(run_llama(llama, model, 2, 0, generated)?.1);
            }
        }
        drop(busy);
        md.push_str(&format!(
            "| exo-rs (quantized CPU kernels) | {} |\n",
            fmt_spread(median(ours.clone()))
        ));
        json.push(format!(
            "{{\"busy_neighbour\":true,\"threads\":2,\"engine\":\"exo-rs\",\"decode_tokens_per_s\":{:.2}}}",
            median(ours).0
        ));
        if !theirs.is_empty() {
            md.push_str(&format!(
                "| llama.cpp llama-bench tg{generated} | {} |\n",
                fmt_spread(median(theirs.clone()))
            ));
            json.push(format!(
                "{{\"busy_neighbour\":true,\"threads\":2,\"engine\":\"llama.cpp\",\"decode_tokens_per_s\":{:.2}}}",
                median(theirs).0
            ));
        }
    }
    if !args.iter().any(|a| a == "--no-cluster") {
        cluster_tables(exe, model, &prompt, tokens, runs, md, json)?;
        api_tables(exe, model, runs, quick, llama.is_some(), md, json)?;
    }
    Ok(())
}

/// Which models and formats the matrix covers (`--shapes default,1b`, `--formats Q4_K_M,...`).
fn matrix_choice(args: &[String]) -> Result<(Vec<formats::Shape>, Vec<&'static str>)> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let shapes = match flag("--shapes") {
        None => vec![
            formats::Shape::Default,
            formats::Shape::OneB,
            formats::Shape::Gemma3,
        ],
        Some(list) => list
            .split(',')
            .map(|s| match s {
                "default" => Ok(formats::Shape::Default),
                "1b" => Ok(formats::Shape::OneB),
                "gemma3" => Ok(formats::Shape::Gemma3),
                other => bail!("unknown shape `{other}` (default, 1b, gemma3)"),
            })
            .collect::<Result<_>>()?,
    };
    let list = match flag("--formats") {
        None => formats::FORMATS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|f| {
                formats::FORMATS
                    .iter()
                    .chain(formats::MORE_FORMATS.iter())
                    .find(|k| k.eq_ignore_ascii_case(f))
                    .copied()
                    .with_context(|| format!("unknown format `{f}`"))
            })
            .collect::<Result<_>>()?,
    };
    Ok((shapes, list))
}

/// `cargo xtask family-fixtures`: llama.cpp's outputs on each family's small random model,
/// into `crates/exo-shard/tests/fixtures/families-llama.cpp.json`.
fn family_fixtures() -> Result<()> {
    cargo(&["build", "--release", "-p", "exo-node"])?;
    let exe = target_dir().join("release").join("exo-node");
    let model = Command::new(&exe).args(["models", "fetch"]).output()?;
    let model = PathBuf::from(String::from_utf8_lossy(&model.stdout).trim());
    let server = build_llama_server()?;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/exo-shard/tests/fixtures/families-llama.cpp.json");
    families::record(&server, &model, &out)
}

/// `cargo xtask synth-model`: the matrix's models, made where missing.
fn synth_model(args: &[String]) -> Result<()> {
    cargo(&["build", "--release", "-p", "exo-node"])?;
    let exe = target_dir().join("release").join("exo-node");
    let model = Command::new(&exe).args(["models", "fetch"]).output()?;
    let model = PathBuf::from(String::from_utf8_lossy(&model.stdout).trim());
    let (shapes, list) = matrix_choice(args)?;
    let quantize = build_llama_tools(false)?.1;
    formats::synth_models(&quantize, &model, &shapes, &list)?;
    for shape in shapes {
        for format in &list {
            println!("{}", formats::model_path(shape, format, &model).display());
        }
    }
    Ok(())
}

/// Only the cluster tables, for one or more `exo-node` binaries (`--exe`, repeatable; default
/// the one built from this tree), measured in turn within one run so that builds can be
/// compared side by side (before and after a change to the runtime).
fn bench_cluster(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let runs: usize = match args.iter().position(|a| a == "--runs") {
        Some(i) => args.get(i + 1).context("--runs needs a number")?.parse()?,
        None if quick => 1,
        None => 3,
    };
    let mut exes: Vec<PathBuf> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == "--exe")
        .filter_map(|(i, _)| args.get(i + 1).map(PathBuf::from))
        .collect();
    if exes.is_empty() {
        cargo(&["build", "--release", "-p", "exo-node"])?;
        exes.push(target_dir().join("release").join("exo-node"));
    }
    let model = Command::new(&exes[0]).args(["models", "fetch"]).output()?;
    let model = PathBuf::from(String::from_utf8_lossy(&model.stdout).trim());
    let prompt =
        "The quick brown fox jumps over the lazy dog while the farmer watches from the hill. "
            .repeat(7);
    let tokens = if quick { 32 } else { 128 };
    let with_llama = !args.iter().any(|a| a == "--no-llama");
    let no_api = args.iter().any(|a| a == "--no-api");
    let no_layouts = args.iter().any(|a| a == "--api-only");
    let mut md = String::new();
    let mut json = Vec::new();
    for exe in &exes {
        md.push_str(&format!(
            "
### {}
",
            exe.display()
        ));
        if !no_layouts {
            cluster_tables(exe, &model, &prompt, tokens, runs, &mut md, &mut json)?;
        }
        if !no_api {
            api_tables(exe, &model, runs, quick, with_llama, &mut md, &mut json)?;
        }
    }
    println!("{md}");
    Ok(())
}

/// Multi-node decode on loopback, and concurrent streams through the API.
#[allow(clippy::too_many_arguments)]
fn cluster_tables(
    exe: &Path,
    model: &Path,
    prompt: &str,
    tokens: usize,
    runs: usize,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    use cluster::Layout;
    let layouts = [
        Layout {
            name: "1 node, 1 core",
            nodes: 1,
            memory_limit: None,
            threads: 1,
            pin: true,
            wire: "f16",
        },
        Layout {
            name: "1 node, 2 cores",
            nodes: 1,
            memory_limit: None,
            threads: 2,
            pin: false,
            wire: "f16",
        },
        Layout {
            name: "2 nodes, 1 core each",
            nodes: 2,
            memory_limit: Some("120MiB"),
            threads: 1,
            pin: true,
            wire: "f16",
        },
        Layout {
            name: "2 nodes, 1 core each, q8 wire",
            nodes: 2,
            memory_limit: Some("120MiB"),
            threads: 1,
            pin: true,
            wire: "q8",
        },
        Layout {
            name: "3 nodes on 2 cores",
            nodes: 3,
            memory_limit: Some("80MiB"),
            threads: 1,
            pin: true,
            wire: "f16",
        },
    ];
    md.push_str(&format!(
        "\nThrough the cluster on loopback (`exo-node serve` processes, `generate --node`, {tokens} tokens, \
         f16 activations unless the layout says q8; cores pinned with taskset where it exists):\n\n\
         | layout | decode tokens/s | TTFT ms | activation bytes/token/hop | resident MiB per node |\n|---|---|---|---|---|\n"
    ));
    for layout in &layouts {
        let nodes = cluster::start(exe, model, layout, &[])?;
        let origin = &nodes[0];
        let mut decode = Vec::new();
        let mut ttft = Vec::new();
        for _ in 0..runs {
            let (d, t) = cluster::generate_through(exe, origin, prompt, tokens)?;
            decode.push(d);
            ttft.push(t);
        }
        let mut per_hop = Vec::new();
        for node in &nodes {
            let s = cluster::status(exe, node)?;
            let (bytes, positions) = (
                s["activation_bytes_sent"].as_f64().unwrap_or(0.0),
                s["activation_positions_sent"].as_f64().unwrap_or(0.0),
            );
            if positions > 0.0 {
                per_hop.push(bytes / positions);
            }
        }
        let rss: Vec<String> = nodes
            .iter()
            .map(|n| format!("{:.0}", n.rss_mib()))
            .collect();
        let hop = if per_hop.is_empty() {
            "none".to_owned()
        } else {
            format!("{:.0}", per_hop[0])
        };
        let d = median(decode);
        md.push_str(&format!(
            "| {} | {} | {:.0} | {hop} | {} |\n",
            layout.name,
            fmt_spread(d),
            median(ttft).0,
            rss.join(", ")
        ));
        json.push(format!(
            "{{\"layout\":\"{}\",\"decode_tokens_per_s\":{:.2},\"bytes_per_token_per_hop\":{},\"rss_mib\":[{}]}}",
            layout.name,
            d.0,
            per_hop.first().copied().unwrap_or(0.0),
            rss.join(",")
        ));
    }

    Ok(())
}

/// Concurrent streaming chats through the HTTP API: one node beside llama-server on the same
/// GGUF and threads at 1, 4, 8 and 16 streams; the cluster layouts at 1 and 8 streams; and the
/// node's resident memory across many requests.
fn api_tables(
    exe: &Path,
    model: &Path,
    runs: usize,
    quick: bool,
    with_llama: bool,
    md: &mut String,
    json: &mut Vec<String>,
) -> Result<()> {
    use cluster::Layout;
    let max_tokens = if quick { 32 } else { 64 };
    let llama_server = if with_llama {
        match build_llama_server() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("llama-server unavailable, comparing nothing: {e:#}");
                None
            }
        }
    } else {
        None
    };
    md.push_str(&format!(
        "\nThrough the HTTP API, streaming chats of about 100 prompt tokens and up to {max_tokens} \
         generated tokens each (greedy), one process with 2 threads: `exo-node serve \
         --max-concurrent 16` beside `llama-server -np 8 -cb` on the same GGUF. \
         ITL: the gap between two tokens of one stream.\n\n\
         | engine | streams | aggregate tokens/s | x its 1 stream | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |\n\
         |---|---|---|---|---|---|---|---|\n"
    ));
    let single = Layout {
        name: "API",
        nodes: 1,
        memory_limit: None,
        threads: 2,
        pin: false,
        wire: "f16",
    };
    let stream_counts: &[usize] = if quick { &[1, 8] } else { &[1, 4, 8, 16] };
    let mut engines: Vec<&str> = vec!["exo-node"];
    if llama_server.is_some() {
        engines.push("llama-server");
    }
    for engine in engines {
        // One engine alive at a time: they would share the two cores otherwise.
        let mut _nodes = Vec::new();
        let mut _server = None;
        let api = if engine == "exo-node" {
            _nodes = cluster::start(exe, model, &single, &["--max-concurrent", "16"])?;
            cluster::wait_ready(&_nodes[0].api)?;
            _nodes[0].api.clone()
        } else {
            let bin = llama_server.as_deref().context("no llama-server")?;
            let server = cluster::LlamaServer::start(bin, model, 2, 8, 1024)?;
            let api = server.api.clone();
            _server = Some(server);
            api
        };
        // A warm-up request, so that no row pays for first-touch page faults.
        cluster::concurrent_streams(&api, 1, 8)?;
        let mut one = 0.0;
        for &streams in stream_counts {
            let mut rates = Vec::new();
            let (mut ttfts, mut gaps) = (Vec::new(), Vec::new());
            // At least 8 streams measured per row, so the percentiles mean something.
            let rounds = runs.max(8usize.div_ceil(streams));
            for _ in 0..rounds {
                let r = cluster::concurrent_streams(&api, streams, max_tokens)?;
                rates.push(r.rate);
                ttfts.extend(r.ttfts);
                gaps.extend(r.gaps);
            }
            let rate = median(rates.clone());
            if streams == 1 {
                one = rate.0;
            }
            let p = cluster::percentile;
            let row = format!(
                "| {engine} | {streams} | {} | {:.2}x | {:.0} | {:.0} | {:.1} | {:.1} |\n",
                fmt_spread(rate),
                rate.0 / one.max(1e-9),
                p(&ttfts, 50.0),
                p(&ttfts, 95.0),
                p(&gaps, 50.0),
                p(&gaps, 95.0),
            );
            eprint!("{row}");
            md.push_str(&row);
            json.push(format!(
                "{{\"api_engine\":\"{engine}\",\"api_streams\":{streams},\"aggregate_tokens_per_s\":{:.2},\"ttft_p50_ms\":{:.1},\"ttft_p95_ms\":{:.1},\"itl_p50_ms\":{:.1},\"itl_p95_ms\":{:.1}}}",
                rate.0,
                p(&ttfts, 50.0),
                p(&ttfts, 95.0),
                p(&gaps, 50.0),
                p(&gaps, 95.0),
            ));
        }
    }

    md.push_str(&format!(
        "\nThe cluster layouts through the API of the first node (same chats, {max_tokens} tokens, \
         `--max-concurrent 16`):\n\n\
         | layout | streams | aggregate tokens/s | TTFT p95 ms | ITL p95 ms |\n|---|---|---|---|---|\n"
    ));
    let layouts = [
        Layout {
            name: "1 node, 1 core",
            nodes: 1,
            memory_limit: None,
            threads: 1,
            pin: true,
            wire: "f16",
        },
        Layout {
            name: "2 nodes, 1 core each",
            nodes: 2,
            memory_limit: Some("120MiB"),
            threads: 1,
            pin: true,
            wire: "f16",
        },
        Layout {
            name: "3 nodes on 2 cores",
            nodes: 3,
            memory_limit: Some("80MiB"),
            threads: 1,
            pin: true,
            wire: "f16",
        },
    ];
    for layout in &layouts {
        let nodes = cluster::start(exe, model, layout, &["--max-concurrent", "16"])?;
        let api = nodes[0].api.clone();
        cluster::wait_ready(&api)?;
        cluster::concurrent_streams(&api, 1, 8)?;
        for streams in [1usize, 8] {
            let mut rates = Vec::new();
            let (mut ttfts, mut gaps) = (Vec::new(), Vec::new());
            let rounds = runs
                .max(8usize.div_ceil(streams))
                .min(if quick { 2 } else { 8 });
            for _ in 0..rounds {
                let r = cluster::concurrent_streams(&api, streams, max_tokens)?;
                rates.push(r.rate);
                ttfts.extend(r.ttfts);
                gaps.extend(r.gaps);
            }
            let rate = median(rates);
            let row = format!(
                "| {} | {streams} | {} | {:.0} | {:.1} |\n",
                layout.name,
                fmt_spread(rate),
                cluster::percentile(&ttfts, 95.0),
                cluster::percentile(&gaps, 95.0),
            );
            eprint!("{row}");
            md.push_str(&row);
            json.push(format!(
                "{{\"api_layout\":\"{}\",\"api_streams\":{streams},\"aggregate_tokens_per_s\":{:.2}}}",
                layout.name, rate.0
            ));
        }
    }

    // Resident memory of one node across many requests: flat once the first ones have sized its
    // buffers (each request's keys and values are freed when it ends).
    let total = if quick { 80 } else { 504 };
    let nodes = cluster::start(exe, model, &single, &["--max-concurrent", "16"])?;
    let api = nodes[0].api.clone();
    cluster::wait_ready(&api)?;
    let mut rss = Vec::new();
    let mut done = 0;
    while done < total {
        cluster::concurrent_streams(&api, 8, 16)?;
        done += 8;
        if done == 8 || done == 104 || done >= total {
            rss.push((done, nodes[0].rss_mib()));
        }
    }
    md.push_str(&format!(
        "\nResident memory of one node across {total} chats (8 at a time, 16 tokens each): {}\n",
        rss.iter()
            .map(|(n, m)| format!("{m:.0} MiB after {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    json.push(format!(
        "{{\"rss_mib_after_requests\":[{}]}}",
        rss.iter()
            .map(|(n, m)| format!("[{n},{m:.1}]"))
            .collect::<Vec<_>>()
            .join(",")
    ));
    Ok(())
}
