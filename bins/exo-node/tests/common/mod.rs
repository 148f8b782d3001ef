//! Running `exo-node serve` processes on loopback for the multi-node tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod netns;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const KEY: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

pub fn exo_node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_exo-node"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The default model, fetched into the test run's $EXO_HOME if needed.
pub fn default_model() -> PathBuf {
    let out = exo_node().args(["models", "fetch"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub const QUESTION: &str = "What is the capital of France?";

/// Greedy ids (EOS ignored) and text from `generate`, locally or through `--node`.
pub fn generate(extra: &[&str]) -> (Vec<u32>, String, String) {
    let out = exo_node()
        .args([
            "generate",
            QUESTION,
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--show-token-ids",
        ])
        .args(["--cluster-key", KEY])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let ids = stderr
        .lines()
        .find_map(|l| l.strip_prefix("token ids: "))
        .unwrap_or_else(|| panic!("no ids in: {stderr}"));
    let ids = ids
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|t| t.parse().unwrap())
        .collect();
    (
        ids,
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}

/// The token ids `generate --show-token-ids` printed on stderr.
pub fn ids_in(stderr: &str) -> &str {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("token ids: "))
        .unwrap_or_else(|| panic!("no ids in: {stderr}"))
}

/// What a child wrote to stdout, and when each piece came.
pub type Pieces = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

/// Reads a child's stdout on a thread, keeping when each piece came.
pub fn timed_reader(stdout: std::process::ChildStdout) -> (Pieces, std::thread::JoinHandle<()>) {
    let pieces = Pieces::default();
    let sink = Arc::clone(&pieces);
    let reader = std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
            sink.lock()
                .unwrap()
                .push((Instant::now(), buf[..n].to_vec()));
        }
    });
    (pieces, reader)
}

/// Waits (at most 60 s) until `pieces` hold `bytes` bytes of text.
pub fn wait_for_text(pieces: &Pieces, bytes: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pieces
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| p.len())
        .sum::<usize>()
        < bytes
    {
        assert!(
            Instant::now() < deadline,
            "no {bytes} bytes of text within 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (at most `within`) until `child` ends; `None` when it still runs.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The longest wait for text from `from` on: the pause a client saw after `from`.
pub fn longest_wait(pieces: &[(Instant, Vec<u8>)], from: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    let mut last = from;
    for (at, _) in pieces.iter().filter(|(at, _)| *at >= from) {
        longest = longest.max(at.duration_since(last));
        last = *at;
    }
    longest
}

/// `line` without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `ESC [ ... letter`.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process whose stderr is collected line by line.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        Proc { child, log }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The rest of the first log line containing `marker`, after it, up to white space.
    pub fn wait_for_value(&self, marker: &str, within: Duration) -> String {
        self.wait_for(marker, within);
        let log = self.log_text();
        let at = log.find(marker).unwrap() + marker.len();
        log[at..]
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the log contains `text`.
    pub fn wait_for(&self, text: &str, within: Duration) {
        self.wait_for_count(0, text, 1, within);
    }

    /// Waits until the log, past its first `from` bytes, contains `text` at least `times`
    /// times.
    pub fn wait_for_count(&self, from: usize, text: &str, times: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log_text();
            if log
                .get(from..)
                .is_some_and(|rest| rest.matches(text).count() >= times)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{text}` not logged {times} time(s) within {within:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resident and peak resident memory, bytes (Linux).
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `exo-node serve`.
pub struct NodeProc {
    pub proc: Proc,
    /// Its shard service.
    pub grpc: String,
    /// Its HTTP API (`http://127.0.0.1:PORT/v1`).
    pub api: String,
    /// Its membership address.
    pub membership: String,
    /// What it was started with, to start it again.
    memory_limit: String,
    key: String,
    extra: Vec<String>,
    /// Its $EXO_HOME (its identity and key): kept across restarts.
    home: tempfile::TempDir,
}

impl std::ops::Deref for NodeProc {
    type Target = Proc;

    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl NodeProc {
    /// The node's home folder (its keys).
    pub fn home(&self) -> &std::path::Path {
        self.home.path()
    }

    /// Starts the node again, as it was started, with the same home (so the same identity),
    /// dialling the membership addresses `peers`; the old process is killed first if it still
    /// runs. Waits until it listens.
    pub fn restart(&mut self, peers: &[String]) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
        let (proc, grpc, api, membership) = launch(
            self.home.path(),
            &self.memory_limit,
            &self.key,
            &extra,
            &peers,
        );
        self.proc = proc;
        self.grpc = grpc;
        self.api = api;
        self.membership = membership;
    }
}

pub struct Cluster {
    pub nodes: Vec<NodeProc>,
}

/// The membership addresses of every node of `nodes` but the `i`th.
pub fn peers_of(nodes: &[NodeProc], i: usize) -> Vec<String> {
    nodes
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(_, n)| n.membership.clone())
        .collect()
}

/// The cluster as node `api` shows it (`GET /v1/cluster`).
pub fn cluster_view(api: &str) -> serde_json::Value {
    let (status, body) = http(api, "GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The id of the node whose API is `api`.
pub fn node_id(api: &str) -> String {
    let view = cluster_view(api);
    view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["is_self"] == true)
        .and_then(|n| n["id"].as_str())
        .unwrap()
        .to_owned()
}

/// Waits (at most `within`) until node `api`'s view lists node `id` in one of `states`;
/// returns the view.
pub fn wait_for_node_state(
    api: &str,
    id: &str,
    states: &[&str],
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let view = cluster_view(api);
        let shown = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == id && states.iter().any(|s| n["state"] == *s));
        if shown {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} not shown as {states:?} within {within:?}: {view:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `n` nodes with cluster key `key` that know each other as static peers (no mDNS),
/// each offering `memory_limit`, and waits until every one has joined a plan of `n` stages and
/// printed its ready line.
pub fn start_cluster_with_key(n: usize, memory_limit: &str, key: &str, extra: &[&str]) -> Cluster {
    let nodes = spawn_nodes(n, memory_limit, key, extra);
    let want = format!("{n} stage(s)");
    for node in &nodes {
        node.wait_for(&want, Duration::from_secs(90));
        node.wait_for(
            "exo-node: ready: the cluster serves",
            Duration::from_secs(90),
        );
    }
    Cluster { nodes }
}

/// Starts `n` nodes as [`start_cluster_with_key`] does, without waiting for a plan.
///
/// Each node listens on ports the system picks and dials every node started before it (the
/// connections work both ways), so no two tests can race for a port.
pub fn spawn_nodes(n: usize, memory_limit: &str, key: &str, extra: &[&str]) -> Vec<NodeProc> {
    let mut nodes: Vec<NodeProc> = Vec::new();
    for _ in 0..n {
        let node = spawn_node(memory_limit, key, extra, &nodes);
        nodes.push(node);
    }
    nodes
}

/// Starts one node on the default model (or the `--model` in `extra`) with cluster key `key`, offering `memory_limit`, that
/// dials `peers` (no mDNS), and waits until it listens.
pub fn spawn_node(memory_limit: &str, key: &str, extra: &[&str], peers: &[NodeProc]) -> NodeProc {
    let home = tempfile::tempdir().unwrap();
    let peers: Vec<&str> = peers.iter().map(|p| p.membership.as_str()).collect();
    let (proc, grpc, api, membership) = launch(home.path(), memory_limit, key, extra, &peers);
    NodeProc {
        proc,
        grpc,
        api,
        membership,
        memory_limit: memory_limit.to_owned(),
        key: key.to_owned(),
        extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        home,
    }
}

/// Starts `exo-node serve` with home `home`; returns it with its gRPC, API and membership
/// addresses once it listens.
fn launch(
    home: &std::path::Path,
    memory_limit: &str,
    key: &str,
    extra: &[&str],
    peers: &[&str],
) -> (Proc, String, String, String) {
    // The default model unless the caller names another.
    let model = if extra.contains(&"--model") {
        None
    } else {
        Some(default_model())
    };
    let api_port = free_port();
    let mut cmd = exo_node();
    cmd.env("EXO_HOME", home)
        .env("EXO_LOG", "info")
        .args([
            "serve",
            "--no-mdns",
            "--cluster-key",
            key,
            "--memory-limit",
            memory_limit,
        ])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .args(["--api-addr", &format!("127.0.0.1:{api_port}")])
        .args(model.iter().flat_map(|m| ["--model", m.to_str().unwrap()]))
        .args(extra);
    for peer in peers {
        cmd.args(["--peer", peer]);
    }
    let proc = Proc::spawn(cmd);
    let membership = proc.wait_for_value("listening address=", Duration::from_secs(60));
    let grpc = proc.wait_for_value("shard service at ", Duration::from_secs(60));
    let api = format!("http://127.0.0.1:{api_port}/v1");
    (proc, grpc, api, membership)
}

pub fn start_cluster(n: usize, memory_limit: &str, extra: &[&str]) -> Cluster {
    start_cluster_with_key(n, memory_limit, KEY, extra)
}

/// One HTTP/1.1 request over a fresh connection; returns the status and the body.
pub fn http(api: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let host = api
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A Python interpreter that can import `requirements` (pinned `name==version` strings),
/// installed once with pip into a folder of their own under the target directory and reused
/// by later runs. A private package folder (`pip install --target`) rather than a virtual
/// environment: it needs only `python3` with pip (Debian's Python lacks the `venv` module
/// unless `python3-venv` is installed), and it works where the system's site-packages are
/// externally managed.
///
/// Fails the test with pip's own words when the packages cannot be had: a test that needs
/// them never skips silently.
pub fn python_with(requirements: &[&str]) -> Command {
    let mut name = String::from("python-");
    for r in requirements {
        name.extend(r.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        }));
        name.push('_');
    }
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let packages = root.join(&name);
    if !packages.join(".complete").exists() {
        std::fs::create_dir_all(&root).unwrap();
        // Install beside, then rename: tests running at once never see half a folder.
        let staging = tempfile::tempdir_in(&root).unwrap();
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-input", "--target"])
            .arg(staging.path())
            .args(requirements)
            .output()
            .unwrap_or_else(|e| panic!("python3 is needed to run this test: {e}"));
        assert!(
            out.status.success(),
            "could not install {requirements:?} with `python3 -m pip install --target` into {}: {}{}",
            packages.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(staging.path().join(".complete"), requirements.join("\n")).unwrap();
        let staged = staging.keep();
        if std::fs::rename(&staged, &packages).is_err() {
            // Another test got there first; its folder is as good as ours.
            let _ = std::fs::remove_dir_all(&staged);
        }
    }
    let mut python = Command::new("python3");
    python
        .env("PYTHONPATH", &packages)
        .env("PYTHONNOUSERSITE", "1");
    python
}

/// The path of `binary`, built by another package of the workspace (`package`), beside this
/// test's own binaries. `cargo test --workspace` builds it already (that package has
/// integration tests); running this package's tests alone builds it here, once.
pub fn sibling_binary(package: &str, binary: &str) -> PathBuf {
    let ours = std::path::Path::new(env!("CARGO_BIN_EXE_exo-node"));
    let path = ours.with_file_name(format!("{binary}{}", std::env::consts::EXE_SUFFIX));
    if path.exists() {
        return path;
    }
    let profile_dir = ours.parent().unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => "release",
    };
    let target = profile_dir.parent().unwrap();
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--profile",
            profile,
            "-p",
            package,
            "--bin",
            binary,
        ])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(
        status.success() && path.exists(),
        "building {binary} (cargo build -p {package}) failed; {} is missing",
        path.display()
    );
    path
}
