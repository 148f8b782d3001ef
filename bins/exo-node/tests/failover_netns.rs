//! Three `exo-node serve` processes, each in its own network namespace (hosts of their own on
//! a bridge this test builds), run the default model; the link of the stage that is not the
//! origin is cut mid-answer (its switch port taken down: no goodbye, no reset, the process
//! still runs). The answer goes on on the other two and equals one machine's, as after a kill.
//!
//! Needs root and iproute2 (CI has both); elsewhere it prints SKIP and passes. Runs the real
//! default model: run with `--release` (as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::netns::{Lab, remove_leftovers, unsupported};
use common::{KEY, Proc, default_model, ids_in};

const NODES: usize = 3;
const PROMPT: &str = "Tell me a very long story about a dragon.";
const TOKENS: &str = "160";

fn address(i: usize) -> String {
    format!("10.213.0.{}", i + 1)
}

/// `generate` of the story (greedy, EOS ignored) with `extra` flags, run by `command`.
fn story(mut command: Command, extra: &[&str]) -> std::process::Child {
    command
        .arg(env!("CARGO_BIN_EXE_exo-node"))
        .args(["generate", PROMPT, "--max-tokens", TOKENS])
        .args(["--ignore-eos", "--show-token-ids", "--cluster-key", KEY])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn cutting_a_stage_link_mid_answer_loses_nothing_the_answer_goes_on_elsewhere() {
    if let Some(why) = unsupported() {
        eprintln!("SKIP cutting_a_stage_link: {why}");
        return;
    }
    remove_leftovers();
    let lab = match Lab::build("cut", NODES) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("SKIP cutting_a_stage_link: cannot build the namespaces: {e}");
            return;
        }
    };
    let model = default_model();

    // One machine's answer, outside the namespaces.
    let reference = story(Command::new("env"), &["--model", model.to_str().unwrap()])
        .wait_with_output()
        .unwrap();
    let reference_err = String::from_utf8_lossy(&reference.stderr).to_string();
    assert!(reference.status.success(), "{reference_err}");

    // Three hosts, any two of which hold the model: the plan uses two, the third waits. Each
    // dials the ones started before it at their default port.
    let homes = tempfile::tempdir().unwrap();
    let nodes: Vec<Proc> = (0..NODES)
        .map(|i| {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &lab.nodes[i]])
                .arg(env!("CARGO_BIN_EXE_exo-node"))
                .env("EXO_HOME", homes.path().join(format!("home{i}")))
                .env("EXO_LOG", "info")
                .args(["serve", "--no-mdns", "--no-api", "--cluster-key", KEY])
                .args(["--memory-limit", "120MiB"])
                .args(["--grpc-listen", &format!("{}:52417", address(i))])
                .args(["--model", model.to_str().unwrap()]);
            for earlier in 0..i {
                cmd.args(["--peer", &address(earlier)]);
            }
            Proc::spawn(cmd)
        })
        .collect();
    for node in &nodes {
        node.wait_for("2 stage(s)", Duration::from_secs(90));
        node.wait_for(
            "exo-node: ready: the cluster serves",
            Duration::from_secs(90),
        );
    }
    // The plan may move once more as the third node joins: wait until two nodes hold layers.
    let holds_layers = |i: usize| {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.nodes[i]])
            .arg(env!("CARGO_BIN_EXE_exo-node"))
            .args(["status", "--cluster-key", KEY])
            .args(["--node", &format!("http://{}:52417", address(i))])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["weight_bytes"].as_u64().unwrap_or(0) > 0
    };
    let settled = Instant::now() + Duration::from_secs(30);
    let holders = loop {
        let holders: Vec<usize> = (0..NODES).filter(|&i| holds_layers(i)).collect();
        if holders.len() == 2 {
            break holders;
        }
        assert!(Instant::now() < settled, "{holders:?} hold layers");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (origin, victim) = (holders[0], holders[1]);

    // The answer, asked of the origin from its own host.
    let mut client = Command::new("ip");
    client.args(["netns", "exec", &lab.nodes[origin]]);
    let endpoint = format!("http://{}:52417", address(origin));
    let mut request = story(client, &["--node", &endpoint]);
    let (pieces, reader) = common::timed_reader(request.stdout.take().unwrap());
    common::wait_for_text(&pieces, 40);

    // Cut the other stage's link: nothing tells anyone.
    let cut = Instant::now();
    lab.cut(victim);
    let status = common::wait_exit(&mut request, Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "the request still runs 60 s after the cut\n{}",
            nodes[origin].log_text()
        )
    });
    reader.join().unwrap();
    let pieces = std::mem::take(&mut *pieces.lock().unwrap());
    // The pause the client saw: the longest wait for text from the cut on.
    let pause = common::longest_wait(&pieces, cut);
    let text: Vec<u8> = pieces.into_iter().flat_map(|(_, p)| p).collect();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut request.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.success(),
        "the request failed after the cut: {stderr}\n{}",
        nodes[origin].log_text()
    );
    eprintln!("link cut: the longest wait for text after it {pause:?}");
    assert_eq!(ids_in(&stderr), ids_in(&reference_err), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&text),
        String::from_utf8_lossy(&reference.stdout)
    );
    // The origin noticed and replayed the request on a plan without the cut node.
    let origin_log = nodes[origin].log_text();
    assert!(
        origin_log.contains("replaying the request on the new plan"),
        "{origin_log}"
    );
    // The spare took the part over.
    let spare = (0..NODES).find(|i| !holders.contains(i)).unwrap();
    assert!(holds_layers(spare), "{}", nodes[spare].log_text());
    drop(nodes);
    drop(lab);
}
