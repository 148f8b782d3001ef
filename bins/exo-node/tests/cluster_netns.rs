//! Three `exo-node peers --watch --json` processes, each in its own network namespace on a
//! bridge this test builds, find each other by mDNS with no flags; the link to one of them is
//! capped with `tc tbf` and measured as such; a node whose link is cut and whose process is
//! killed is declared gone within 3 s; one stopped with SIGTERM is seen leaving at once; a
//! device started with another cluster key is seen by mDNS but kept out, and both ends say why.
//!
//! Needs root and iproute2 (CI has both); elsewhere it prints SKIP and passes. Everything it
//! creates lives in namespaces named after this process and is deleted on the way out, also
//! when the test fails. No traffic leaves those namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::netns::{Lab, remove_leftovers, run, unsupported};

/// The cap on the third node's link, bits per second.
const CAP_BITS: f64 = 20e6;
const NODES: usize = 3;
const CAPPED: usize = 2;

/// One line of a node's output, as the test thread received it.
struct Line {
    node: usize,
    at: Instant,
    json: Value,
}

/// What one node reported so far.
#[derive(Default)]
struct Seen {
    id: Option<String>,
    joined: HashMap<String, (Instant, String)>,
    left: HashMap<String, (Instant, String)>,
    bandwidth: HashMap<String, f64>,
    problems: Vec<String>,
}

struct Cluster {
    lab: Lab,
    lines: mpsc::Receiver<Line>,
    seen: Vec<Seen>,
    logs: tempfile::TempDir,
}

impl Cluster {
    fn start(lab: Lab) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let key: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
        let (tx, lines) = mpsc::channel();
        let mut cluster = Self {
            lab,
            lines,
            seen: (0..NODES).map(|_| Seen::default()).collect(),
            logs,
        };
        for i in 0..NODES {
            // The same cluster key, shared the documented way: a copy of `cluster.key`.
            let home = cluster.logs.path().join(format!("home{i}"));
            std::fs::create_dir_all(&home).unwrap();
            std::fs::write(home.join("cluster.key"), format!("{key}\n")).unwrap();
            let stderr =
                std::fs::File::create(cluster.logs.path().join(format!("node{i}.log"))).unwrap();
            let mut child = Command::new("ip")
                .args(["netns", "exec", &cluster.lab.nodes[i]])
                .arg(env!("CARGO_BIN_EXE_exo-node"))
                .args(["peers", "--watch", "--json"])
                .env("EXO_HOME", &home)
                .env_remove("EXO_CLUSTER_KEY")
                .env("RUST_LOG", "exo_topology=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            cluster.lab.children.push(Some(child));
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let at = Instant::now();
                    if let Ok(json) = serde_json::from_str(&line) {
                        let _ = tx.send(Line { node: i, at, json });
                    }
                }
            });
        }
        cluster
    }

    /// Takes in lines until `done` holds or `within` passes; false on timeout.
    fn until(&mut self, within: Duration, mut done: impl FnMut(&[Seen]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(line) = self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                self.take(line);
            }
        }
        true
    }

    fn take(&mut self, line: Line) {
        let seen = &mut self.seen[line.node];
        let json = &line.json;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        match json["event"].as_str() {
            Some("snapshot") => seen.id = Some(text(&json["snapshot"]["local"]["id"])),
            Some("node_joined") => {
                let id = text(&json["profile"]["id"]);
                seen.joined.insert(id, (line.at, text(&json["via"])));
            }
            Some("node_left") => {
                let id = text(&json["id"]);
                seen.left
                    .insert(id, (line.at, json["reason"]["kind"].to_string()));
            }
            Some("peer_problem") => seen.problems.push(json["diagnostic"].to_string()),
            Some("link_measured") => {
                if let Some(bw) = json["link"]["bandwidth_bytes_per_s"].as_f64() {
                    seen.bandwidth.insert(text(&json["id"]), bw);
                }
            }
            _ => {}
        }
    }

    fn id(&self, i: usize) -> String {
        self.seen[i].id.clone().unwrap()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..NODES {
            let log = std::fs::read_to_string(self.logs.path().join(format!("node{i}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            out += &format!("--- node {i} log (last lines) ---\n");
            for l in tail.iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out
    }

    fn signal(&mut self, i: usize, signal: &str) {
        let pid = self.lab.children[i].as_ref().unwrap().id().to_string();
        run(&["kill", signal, &pid]).unwrap();
    }
}

fn rand_byte() -> u8 {
    // Good enough for a test key: the clock's low bits mixed with a counter.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let x = t ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x ^ (x >> 29) ^ (x >> 47)) as u8
}

#[test]
fn three_nodes_in_namespaces_discover_each_other_measure_links_and_see_departures() {
    if let Some(why) = unsupported() {
        eprintln!("SKIP three_nodes_in_namespaces: {why}");
        return;
    }
    remove_leftovers();
    let lab = match Lab::build("", NODES) {
        Ok(lab) => lab,
        Err(e) => {
            // Root without network namespaces (a restricted container): nothing to test here.
            eprintln!("SKIP three_nodes_in_namespaces: cannot build the namespaces: {e}");
            return;
        }
    };
    lab.cap(CAPPED, CAP_BITS).unwrap();
    assert!(Path::new(env!("CARGO_BIN_EXE_exo-node")).exists());

    let start = Instant::now();
    let mut cluster = Cluster::start(lab);

    // Discovery: every node sees the two others, found by mDNS, with no flags.
    let all_joined = cluster.until(Duration::from_secs(20), |seen| {
        seen.iter()
            .all(|s| s.id.is_some() && s.joined.len() == NODES - 1)
    });
    assert!(
        all_joined,
        "the nodes did not all find each other\n{}",
        cluster.logs()
    );
    let mut slowest = Duration::ZERO;
    for i in 0..NODES {
        for j in (0..NODES).filter(|&j| j != i) {
            let (at, via) = cluster.seen[i].joined[&cluster.id(j)].clone();
            slowest = slowest.max(at - start);
            let (_, back) = cluster.seen[j].joined[&cluster.id(i)].clone();
            assert!(
                via == "mdns" || back == "mdns",
                "nodes {i} and {j} were not connected by mDNS ({via}, {back})"
            );
        }
    }
    eprintln!("discovery: every node saw both others {slowest:.2?} after start");
    if slowest > Duration::from_secs(2) && std::env::var_os("EXO_DEBUG_SLOW").is_some() {
        eprintln!("{}", cluster.logs());
    }
    assert!(
        slowest <= Duration::from_secs(5),
        "discovery took {slowest:?}\n{}",
        cluster.logs()
    );

    // Bandwidth: to the capped node it is the cap; between the others, far more.
    let (capped, a, b) = (cluster.id(CAPPED), cluster.id(0), cluster.id(1));
    let measured = cluster.until(Duration::from_secs(30), |seen| {
        seen[0].bandwidth.contains_key(&capped)
            && seen[1].bandwidth.contains_key(&capped)
            && seen[0].bandwidth.contains_key(&b)
            && seen[1].bandwidth.contains_key(&a)
            && seen[CAPPED].bandwidth.contains_key(&a)
    });
    assert!(measured, "links were not measured\n{}", cluster.logs());
    let cap = CAP_BITS / 8.0;
    let mbit = |bytes: f64| bytes * 8e-6;
    let to_capped = [
        cluster.seen[0].bandwidth[&capped],
        cluster.seen[1].bandwidth[&capped],
    ];
    let between = [cluster.seen[0].bandwidth[&b], cluster.seen[1].bandwidth[&a]];
    let from_capped = cluster.seen[CAPPED].bandwidth[&a];
    eprintln!(
        "bandwidth: to the {} Mbit/s node {:.1} and {:.1} Mbit/s, from it {:.1} Mbit/s; between the others {:.0} and {:.0} Mbit/s",
        mbit(cap),
        mbit(to_capped[0]),
        mbit(to_capped[1]),
        mbit(from_capped),
        mbit(between[0]),
        mbit(between[1]),
    );
    for bw in to_capped.into_iter().chain([from_capped]) {
        assert!(
            (bw - cap).abs() <= 0.3 * cap,
            "{:.1} Mbit/s is not within 30 % of the cap",
            mbit(bw)
        );
    }
    // Unoptimised builds encrypt at about 50 Mbit/s, so "far higher" is only 1.5x there; it is
    // 3x in release builds (which CI runs, and where it is some 1.5 Gbit/s in practice).
    let far = if cfg!(debug_assertions) { 1.5 } else { 3.0 };
    for bw in between {
        assert!(
            bw >= far * cap,
            "{:.1} Mbit/s is not far above the cap",
            mbit(bw)
        );
    }

    // A node that vanishes (link cut, process killed: no goodbye reaches anyone) is declared
    // gone within 3 s by both others.
    let cut = Instant::now();
    cluster.lab.cut(CAPPED);
    cluster.signal(CAPPED, "-KILL");
    let gone = cluster.until(Duration::from_secs(10), |seen| {
        seen[0].left.contains_key(&capped) && seen[1].left.contains_key(&capped)
    });
    assert!(
        gone,
        "the killed node was not declared gone\n{}",
        cluster.logs()
    );
    for i in [0, 1] {
        let (at, reason) = cluster.seen[i].left[&capped].clone();
        eprintln!(
            "node {i} declared the killed node gone after {:.2?} ({reason})",
            at - cut
        );
        assert!(at - cut <= Duration::from_secs(3), "{:?}", at - cut);
        assert!(reason.contains("unresponsive"), "{reason}");
    }

    // A node stopped with SIGTERM leaves cleanly: the other sees it at once.
    let stop = Instant::now();
    cluster.signal(1, "-TERM");
    let left = cluster.until(Duration::from_secs(5), |seen| seen[0].left.contains_key(&b));
    assert!(
        left,
        "the stopped node was not seen leaving\n{}",
        cluster.logs()
    );
    let (at, reason) = cluster.seen[0].left[&b].clone();
    eprintln!(
        "the stopped node was seen leaving after {:.2?} ({reason})",
        at - stop
    );
    assert!(at - stop < Duration::from_secs(1), "{:?}", at - stop);
    assert!(reason.contains("closed"), "{reason}");
    let status = cluster.lab.children[1].as_mut().unwrap().wait().unwrap();
    assert!(
        status.success(),
        "exo-node peers exited with {status} on SIGTERM"
    );

    // A device started without the cluster's key (it generates its own) sees the node by mDNS
    // but cannot connect, and `exo-node peers` says why; so does the node it tried.
    let home = cluster.logs.path().join("stranger");
    let out = Command::new("ip")
        .args(["netns", "exec", &cluster.lab.nodes[1]])
        .arg(env!("CARGO_BIN_EXE_exo-node"))
        .args(["peers", "--wait", "3"])
        .env("EXO_HOME", &home)
        .env_remove("EXO_CLUSTER_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    eprintln!("exo-node peers with another key:\n{stdout}");
    assert!(stderr.contains("generated a new cluster key"), "{stderr}");
    assert!(stdout.contains("no other nodes"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains(&a))
        .unwrap_or_else(|| panic!("node 0 is not listed\n{stdout}"));
    assert!(
        line.contains("seen via mdns at /ip4/10.213.0.1/tcp/"),
        "{line}"
    );
    assert!(line.contains("the cluster key differs"), "{line}");
    let diagnosed = cluster.until(Duration::from_secs(5), |seen| {
        seen[0]
            .problems
            .iter()
            .any(|p| p.contains("cluster_key_mismatch"))
    });
    assert!(
        diagnosed,
        "node 0 did not report the stranger\n{}",
        cluster.logs()
    );
}
