//! `cargo xtask bench-failover`: kill -9 of the stage that is not the origin, at a random
//! point of a greedy answer, on a three-node loopback cluster whose plan uses two nodes (any
//! two hold the default model); the killed node is started again after each kill (it rejoins
//! with its identity) and the cluster settles before the next. Reports lost requests, answers
//! that differ from one machine's, and the pause the client saw from the kill to the next text.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{self, Layout, Node};

const PROMPT: &str = "Tell me a very long story about a dragon.";
const TOKENS: usize = 120;

/// One kill, as the client saw it.
struct Kill {
    /// From the kill to the next text.
    pause: Duration,
    /// The longest wait for text after the kill.
    longest: Duration,
    /// The answer ended with an error (a lost request).
    lost: bool,
    /// The answer's tokens differ from one machine's.
    differs: bool,
}

/// `generate` of the story through `node` (or locally when `None`), stdout piped.
fn story(exe: &Path, node: Option<&str>) -> Result<std::process::Child> {
    let mut cmd = Command::new(exe);
    cmd.args(["generate", PROMPT, "--ignore-eos", "--show-token-ids"])
        .args(["--max-tokens", &TOKENS.to_string()]);
    if let Some(node) = node {
        cmd.args(["--node", node, "--cluster-key", cluster::KEY]);
    }
    Ok(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
}

fn ids_in(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("token ids: "))
        .map(str::to_owned)
}

/// A small deterministic generator (xorshift), seeded from the clock: kill points differ from
/// run to run, and the seed is printed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let kills: usize = match args.iter().position(|a| a == "--kills") {
        Some(i) => args.get(i + 1).context("--kills needs a number")?.parse()?,
        None => 20,
    };
    let exe = match args.iter().position(|a| a == "--exe") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--exe needs a path")?),
        None => {
            crate::cargo(&["build", "--release", "-p", "exo-node"])?;
            crate::target_dir().join("release").join("exo-node")
        }
    };
    let model = Command::new(&exe).args(["models", "fetch"]).output()?;
    let model = PathBuf::from(String::from_utf8_lossy(&model.stdout).trim());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);

    let reference = story(&exe, None)?.wait_with_output()?;
    let reference_ids = ids_in(&String::from_utf8_lossy(&reference.stderr))
        .context("no token ids from one machine's answer")?;
    let layout = Layout {
        name: "failover",
        nodes: 3,
        memory_limit: Some("120MiB"),
        threads: 1,
        pin: true,
        wire: "f16",
    };
    let mut nodes = cluster::start_nodes(&exe, &model, &layout, &[])?;
    cluster::wait_for_plan(&nodes, layout.name, 2)?;
    eprintln!("bench-failover: {kills} kills, seed {seed}");
    let mut done = Vec::new();
    for round in 0..kills {
        settle(&nodes)?;
        let holders: Vec<usize> = (0..nodes.len())
            .filter(|&i| {
                cluster::status(&exe, &nodes[i])
                    .is_ok_and(|s| s["weight_bytes"].as_u64().unwrap_or(0) > 0)
            })
            .collect();
        if holders.len() != 2 {
            bail!("round {round}: {} nodes hold layers, not 2", holders.len());
        }
        let pick = rng.below(2);
        let (origin, victim) = (holders[pick], holders[1 - pick]);
        let kill = one_kill(&exe, &mut nodes, origin, victim, &reference_ids, &mut rng)?;
        eprintln!(
            "kill {}: node {victim} (origin {origin}): next text after {:.0} ms, longest wait {:.0} ms{}{}",
            round + 1,
            kill.pause.as_secs_f64() * 1e3,
            kill.longest.as_secs_f64() * 1e3,
            if kill.lost { ", LOST" } else { "" },
            if kill.differs { ", DIFFERS" } else { "" },
        );
        done.push(kill);
        nodes[victim].restart()?;
    }
    let ms = |f: fn(&Kill) -> Duration| -> Vec<f64> {
        done.iter()
            .filter(|k| !k.lost)
            .map(|k| f(k).as_secs_f64() * 1e3)
            .collect()
    };
    let (pauses, longest) = (ms(|k| k.pause), ms(|k| k.longest));
    let p = cluster::percentile;
    let md = format!(
        "| kills | lost | differ from one machine | next text after the kill p50 / p95 / max (ms) | longest wait p50 / p95 / max (ms) |\n\
         |---|---|---|---|---|\n\
         | {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} |\n",
        done.len(),
        done.iter().filter(|k| k.lost).count(),
        done.iter().filter(|k| k.differs).count(),
        p(&pauses, 50.0),
        p(&pauses, 95.0),
        p(&pauses, 100.0),
        p(&longest, 50.0),
        p(&longest, 95.0),
        p(&longest, 100.0),
    );
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("failover.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// Waits (at most 90 s) until every node is in the cluster again and the plan in force is
/// loaded: the API of each says it is ready and no node is joining or loading.
fn settle(nodes: &[Node]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    for node in nodes {
        cluster::wait_ready(&node.api)?;
    }
    loop {
        let view: serde_json::Value = cluster::get_json(&nodes[0].api, "/v1/cluster")?;
        let states: Vec<&str> = view["nodes"]
            .as_array()
            .map(|n| n.iter().filter_map(|n| n["state"].as_str()).collect())
            .unwrap_or_default();
        let present = states.iter().filter(|s| **s != "gone").count();
        let busy = states
            .iter()
            .any(|s| matches!(*s, "joining" | "loading" | "waiting"));
        if view["ready"] == true && present == nodes.len() && !busy {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not settle within 90 s: {view:#}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One answer through `origin`, `victim` killed after a random share of its text.
fn one_kill(
    exe: &Path,
    nodes: &mut [Node],
    origin: usize,
    victim: usize,
    reference_ids: &str,
    rng: &mut Rng,
) -> Result<Kill> {
    let mut request = story(exe, Some(&nodes[origin].grpc))?;
    let mut stdout = request.stdout.take().context("no stdout")?;
    let pieces: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let sink = Arc::clone(&pieces);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if let Ok(mut p) = sink.lock() {
                p.push((Instant::now(), n));
            }
        }
    });
    // The story's text is some 500 bytes: kill somewhere in its first four fifths.
    let at_bytes = 8 + rng.below(400);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: usize = pieces
            .lock()
            .map(|p| p.iter().map(|(_, n)| n).sum())
            .unwrap_or(0);
        if got >= at_bytes || request.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("no {at_bytes} bytes of text within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    nodes[victim].kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = request.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = request.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = request.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    let after: Vec<Instant> = pieces
        .lock()
        .map(|p| {
            p.iter()
                .map(|(at, _)| *at)
                .filter(|at| *at >= killed)
                .collect()
        })
        .unwrap_or_default();
    let pause = after.first().map_or(Duration::ZERO, |at| *at - killed);
    let mut longest = Duration::ZERO;
    let mut last = killed;
    for at in &after {
        longest = longest.max(*at - last);
        last = *at;
    }
    let lost = !status.is_some_and(|s| s.success());
    if lost {
        eprintln!(
            "a request was lost ({}): {stderr}",
            if status.is_none() {
                "no end within 60 s"
            } else {
                "it ended with an error"
            }
        );
        for (i, node) in nodes.iter().enumerate() {
            let log = node.log();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("readyz") && !l.contains(" plan: "))
                .rev()
                .take(25)
                .collect();
            eprintln!(
                "--- node {i}'s log (origin {origin}, victim {victim}), last lines ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    Ok(Kill {
        pause,
        longest,
        lost,
        differs: !lost && ids_in(&stderr).as_deref() != Some(reference_ids),
    })
}
