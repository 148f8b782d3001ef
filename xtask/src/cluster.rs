//! The multi-node and API parts of `cargo xtask bench`: `exo-node serve` processes on loopback,
//! pinned to cores with `taskset` where it exists, measured through `exo-node generate --node`,
//! `exo-node status` and the HTTP API.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub(crate) const KEY: &str = "be9c4be9c4be9c4be9c4be9c4be9c4be9c4be9c4be9c4be9c4be9c4be9c4be9c";

/// One running `exo-node serve`.
pub(crate) struct Node {
    child: Child,
    log: Arc<Mutex<String>>,
    pub(crate) grpc: String,
    pub(crate) api: String,
    home: PathBuf,
    /// How it was started (program and arguments), to start it again.
    program: PathBuf,
    args: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

impl Node {
    /// Starts `program` with `args` and $EXO_HOME `home`, collecting its stderr.
    fn launch(program: &Path, args: &[String], home: &Path) -> Result<(Child, Arc<Mutex<String>>)> {
        let mut child = Command::new(program)
            .args(args)
            .env("EXO_HOME", home)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut l) = sink.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Ok((child, log))
    }

    /// Resident memory, MiB.
    pub(crate) fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// What it logged so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL: no goodbye to anyone).
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again as it was started, with the same home (the same identity) and ports.
    pub(crate) fn restart(&mut self) -> Result<()> {
        self.kill();
        let (child, log) = Node::launch(&self.program, &self.args, &self.home)?;
        self.child = child;
        self.log = log;
        Ok(())
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn has_taskset() -> bool {
    Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// How a configuration places its nodes.
pub(crate) struct Layout {
    pub(crate) name: &'static str,
    pub(crate) nodes: usize,
    pub(crate) memory_limit: Option<&'static str>,
    pub(crate) threads: usize,
    /// Pin node `i` to core `i % cores`.
    pub(crate) pin: bool,
    /// How activations travel (`exo-node serve --wire`).
    pub(crate) wire: &'static str,
}

/// Starts the nodes of `layout` and waits until they agree on a plan of `layout.nodes` stages.
pub(crate) fn start(
    exe: &Path,
    model: &Path,
    layout: &Layout,
    extra: &[&str],
) -> Result<Vec<Node>> {
    let nodes = start_nodes(exe, model, layout, extra)?;
    wait_for_plan(&nodes, layout.name, layout.nodes)?;
    Ok(nodes)
}

/// Starts the nodes of `layout`, each dialling all the others, without waiting for a plan.
pub(crate) fn start_nodes(
    exe: &Path,
    model: &Path,
    layout: &Layout,
    extra: &[&str],
) -> Result<Vec<Node>> {
    let ports: Vec<u16> = (0..layout.nodes)
        .map(|_| free_port())
        .collect::<Result<_>>()?;
    let pin = layout.pin && has_taskset();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The nodes' log level (`EXO_BENCH_LOG`, default `warn`).
    let level = std::env::var("EXO_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned());
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let home =
            std::env::temp_dir().join(format!("exo-bench-{}-{i}-{port}", std::process::id()));
        std::fs::create_dir_all(&home)?;
        let (grpc, api) = (free_port()?, free_port()?);
        let (program, mut args) = if pin {
            let core = (i % cores).to_string();
            (
                PathBuf::from("taskset"),
                vec!["-c".to_owned(), core, exe.display().to_string()],
            )
        } else {
            (exe.to_path_buf(), Vec::new())
        };
        let serve_args = [
            format!("--model={}", model.display()),
            format!("--threads={}", layout.threads),
            format!("--wire={}", layout.wire),
            format!("--listen=/ip4/127.0.0.1/tcp/{port}"),
            format!("--grpc-listen=127.0.0.1:{grpc}"),
            format!("--api-addr=127.0.0.1:{api}"),
        ];
        args.extend(
            ["--log", &level, "serve", "--no-mdns", "--cluster-key", KEY].map(str::to_owned),
        );
        args.extend(serve_args);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        if let Some(limit) = layout.memory_limit {
            args.push(format!("--memory-limit={limit}"));
        }
        for (j, other) in ports.iter().enumerate() {
            if i != j {
                args.push(format!("--peer=/ip4/127.0.0.1/tcp/{other}"));
            }
        }
        let (child, log) = Node::launch(&program, &args, &home)?;
        nodes.push(Node {
            child,
            log,
            grpc: format!("http://127.0.0.1:{grpc}"),
            api: format!("127.0.0.1:{api}"),
            home,
            program,
            args,
        });
    }
    Ok(nodes)
}

/// Waits (at most 90 s) until every node of `nodes` logged a plan of `stages` stages.
pub(crate) fn wait_for_plan(nodes: &[Node], name: &str, stages: usize) -> Result<()> {
    let want = format!("{stages} stage(s)");
    let deadline = Instant::now() + Duration::from_secs(90);
    for node in nodes {
        loop {
            let log = node.log();
            if log.contains(&want) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name}: no {want} plan within 90 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Decode tokens/s and time to first token (ms) of one generation through `node`.
pub(crate) fn generate_through(
    exe: &Path,
    node: &Node,
    prompt: &str,
    tokens: usize,
) -> Result<(f64, f64)> {
    let out = crate::generate_command(exe, prompt, tokens)
        .args(["--node", &node.grpc, "--cluster-key", KEY])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("generate --node failed:\n{stderr}");
    }
    let num = crate::number_between;
    stderr
        .lines()
        .rev()
        .find_map(|l| {
            Some((
                num(l, "decode ", " tokens/s")?,
                num(l, "time to first token ", " ms")?,
            ))
        })
        .context("no figures line from generate --node")
}

/// `exo-node status` of a node, as JSON.
pub(crate) fn status(exe: &Path, node: &Node) -> Result<serde_json::Value> {
    let out = Command::new(exe)
        .args(["status", "--node", &node.grpc, "--cluster-key", KEY])
        .output()?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One streaming chat request as its client saw it.
pub(crate) struct StreamRun {
    /// Time to the first text, ms.
    pub(crate) ttft_ms: f64,
    /// Completion tokens (from the usage chunk, else one per text chunk).
    pub(crate) tokens: usize,
    /// Gaps between consecutive text chunks, ms.
    pub(crate) gaps_ms: Vec<f64>,
}

/// The question of stream `i`: about 100 tokens once templated, different for each stream from
/// its first words (a server that caches prompt prefixes, as llama-server does, gains little).
pub(crate) fn question(i: usize) -> String {
    format!(
        "Question {i}. {}Now, write a short poem about the number {i}.",
        "The quick brown fox jumps over the lazy dog while the farmer watches from the hill. "
            .repeat(4)
    )
}

/// One streaming chat request to the OpenAI-compatible API at `api` (`host:port`).
pub(crate) fn stream_once(api: &str, max_tokens: usize, question: &str) -> Result<StreamRun> {
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(api)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut first = None;
    let mut last = None;
    let mut gaps_ms = Vec::new();
    let (mut usage, mut chunks) = (0usize, 0usize);
    let mut pending = String::new();
    let mut head = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(at) = pending.find('\n') {
            let line: String = pending.drain(..=at).collect();
            if head.len() < 1000 {
                head.push_str(&line);
            }
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            let text = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !text.is_empty() {
                let now = started.elapsed().as_secs_f64() * 1e3;
                first.get_or_insert(now);
                if let Some(before) = last {
                    gaps_ms.push(now - before);
                }
                last = Some(now);
                chunks += 1;
            }
            if let Some(t) = v["usage"]["completion_tokens"].as_u64() {
                usage = t as usize;
            }
        }
    }
    let tokens = if usage > 0 { usage } else { chunks };
    if tokens == 0 {
        bail!("a stream from {api} gave no tokens: {head}{pending}");
    }
    Ok(StreamRun {
        ttft_ms: first.unwrap_or(0.0),
        tokens,
        gaps_ms,
    })
}

/// What `streams` concurrent streaming requests saw together.
pub(crate) struct Streams {
    /// Completion tokens of all, per second of the whole run.
    pub(crate) rate: f64,
    pub(crate) ttfts: Vec<f64>,
    /// Every gap between two tokens of a stream, ms.
    pub(crate) gaps: Vec<f64>,
}

/// Questions asked so far in this run: every request asks a new one, so that no server's
/// prompt cache answers a prompt it saw before (llama-server keeps each slot's last prompt,
/// and reused prompts made its time to first token look ten times shorter than its prefill).
static ASKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `streams` concurrent streaming requests, each asking a [`question`] not asked before in
/// this run.
pub(crate) fn concurrent_streams(api: &str, streams: usize, max_tokens: usize) -> Result<Streams> {
    let started = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let api = api.to_owned();
            let i = ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::spawn(move || stream_once(&api, max_tokens, &question(i)))
        })
        .collect();
    let mut out = Streams {
        rate: 0.0,
        ttfts: Vec::new(),
        gaps: Vec::new(),
    };
    let mut tokens = 0;
    for h in handles {
        let run = h
            .join()
            .map_err(|_| anyhow::anyhow!("a stream thread panicked"))??;
        out.ttfts.push(run.ttft_ms);
        out.gaps.extend(run.gaps_ms);
        tokens += run.tokens;
    }
    out.rate = tokens as f64 / started.elapsed().as_secs_f64();
    Ok(out)
}

/// A running `llama-server` (llama.cpp's OpenAI-compatible server, continuous batching).
pub(crate) struct LlamaServer {
    child: Child,
    pub(crate) api: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LlamaServer {
    /// Starts `bin` on `model` with `threads` threads and `parallel` slots of `context`
    /// positions each, and waits until it answers `/health`.
    pub(crate) fn start(
        bin: &Path,
        model: &Path,
        threads: usize,
        parallel: usize,
        context: usize,
    ) -> Result<LlamaServer> {
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["-m", &model.display().to_string()])
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
            .args(["-np", &parallel.to_string(), "-cb"])
            .args(["-c", &(parallel * context).to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = LlamaServer {
            child,
            api: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if health(&server.api).unwrap_or(false) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("llama-server did not answer /health within 120 s")
    }
}

/// Waits (at most 60 s) until the API at `api` says it is ready: `/readyz` answers anything
/// but 503 (older builds without it answer 404).
pub(crate) fn wait_ready(api: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = get(api, "/readyz").unwrap_or_default();
        if !reply.is_empty() && !reply.starts_with("HTTP/1.1 503") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{api} not ready within 60 s: {reply}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The JSON body of `GET path` from the API at `api`.
pub(crate) fn get_json(api: &str, path: &str) -> Result<serde_json::Value> {
    let reply = get(api, path)?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("no body in the reply to GET {path}: {reply}"))?;
    serde_json::from_str(body).with_context(|| format!("GET {path} gave no JSON: {body}"))
}

fn get(api: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(api)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

fn health(api: &str) -> Result<bool> {
    let mut s = std::net::TcpStream::connect(api)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.starts_with("HTTP/1.1 200"))
}

/// The `p`-th percentile (0..=100) of `v`, nearest rank.
pub(crate) fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}
