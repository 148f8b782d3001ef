//! Revoking a device as a user does it: three nodes serve (any two hold the model) behind a
//! gateway, and `exo-node revoke`, reaching only one node, locks out one of those holding
//! layers. The key travels on from node to node: the other two nodes and the gateway take it,
//! join again with it on the same addresses and answer as one machine does; the old key opens
//! neither the shard service nor membership.
//!
//! Runs the real default model: run with `--release` (as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use exo_transport::{Credential, Limits, ShardClient};

mod common;

use common::{KEY, exo_node};

const QUESTION: &str = "What is the capital of France?";

/// Greedy ids from `generate`, locally or through `--node` with `key`.
fn generate(key: &str, extra: &[&str]) -> String {
    let out = exo_node()
        .args(["generate", QUESTION, "--max-tokens", "24", "--ignore-eos"])
        .args(["--show-token-ids", "--cluster-key", key])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("token ids: "))
        .unwrap_or_else(|| panic!("no ids in: {stderr}"))
        .to_owned()
}

fn holds_layers(grpc: &str) -> bool {
    let key = exo_topology::ClusterKey::parse(KEY, "test").unwrap();
    let credential = Credential::new(key.derive(Credential::PURPOSE));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = ShardClient::connect(grpc, Some(&credential), Limits::default())
                .await
                .unwrap();
            !client.status().await.unwrap().layers.is_empty()
        })
}

#[test]
fn a_revoked_device_is_locked_out_and_the_others_serve_on_with_the_new_key() {
    let reference = generate(KEY, &[]);
    let nodes = common::spawn_nodes(3, "120MiB", KEY, &[]);
    for node in &nodes {
        node.wait_for("2 stage(s)", Duration::from_secs(90));
        node.wait_for("exo-node: ready", Duration::from_secs(90));
    }
    // Lock out a node that holds layers: the other two must plan without it.
    let victim = nodes.iter().position(|n| holds_layers(&n.grpc)).unwrap();
    let victim_id = common::node_id(&nodes[victim].api);
    let others: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let logged: Vec<usize> = nodes.iter().map(|n| n.proc.log_text().len()).collect();

    // A gateway in front of the three.
    let gateway_api = format!("127.0.0.1:{}", common::free_port());
    let gateway_home = tempfile::tempdir().unwrap();
    let mut gateway =
        std::process::Command::new(common::sibling_binary("exo-gateway", "exo-gateway"));
    gateway
        .env("EXO_HOME", gateway_home.path())
        .env("EXO_LOG", "info")
        .args([
            "--no-mdns",
            "--cluster-key",
            KEY,
            "--api-addr",
            &gateway_api,
        ])
        .args([
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{}", common::free_port()),
        ]);
    for node in &nodes {
        gateway.args(["--peer", &node.membership]);
    }
    let gateway = common::Proc::spawn(gateway);
    gateway.wait_for("gateway serving the API", Duration::from_secs(30));
    gateway.wait_for_count(0, "node joined", 3, Duration::from_secs(30));

    // Run on the device of a node that stays (its home, with that node's identity).
    let admin = nodes[others[0]].home().to_path_buf();
    let out = exo_node()
        .env("EXO_HOME", &admin)
        .args(["revoke", &victim_id, "--cluster-key", KEY, "--no-mdns"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--wait", "10"])
        .args(["--peer", &nodes[others[0]].membership])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("exo-node revoke said:\n{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 node(s) took it"), "{said}");
    let new_key = std::fs::read_to_string(admin.join("cluster.key"))
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(new_key, KEY);

    // The other two join again with the new key and serve; the answer is one machine's.
    for &i in &others {
        nodes[i].proc.wait_for_count(
            logged[i],
            "rotated the cluster key",
            1,
            Duration::from_secs(30),
        );
        nodes[i]
            .proc
            .wait_for_count(logged[i], "exo-node: ready", 1, Duration::from_secs(120));
    }
    // The gateway got it from a node, and serves through the new key too.
    gateway.wait_for("the gateway joins again with it", Duration::from_secs(30));
    let chat = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = common::http(
            &format!("http://{gateway_api}/v1"),
            "POST",
            "/v1/chat/completions",
            Some(&chat.to_string()),
        );
        if status == 200 {
            break;
        }
        // It answers 503 until it sees the cluster ready again.
        assert!(
            status == 503 && Instant::now() < deadline,
            "{status} {body}\n{}",
            gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let origin = &nodes[others[0]].grpc;
    let rejoined = nodes[others[0]].proc.log_text();
    eprintln!(
        "the first node after the rotation:\n{}",
        rejoined[logged[others[0]]..]
            .lines()
            .filter(|l| l.starts_with("exo-node:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(generate(&new_key, &["--node", origin]), reference);

    // The old key opens nothing: no shard service call...
    let refused = exo_node()
        .args(["status", "--node", origin, "--cluster-key", KEY])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("not of this cluster"), "{stderr}");
    // ...and no membership: a device with it sees none of the nodes that took the new key.
    let peers = exo_node()
        .args(["peers", "--json", "--no-mdns", "--wait", "3"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--cluster-key", KEY])
        .args(["--peer", &nodes[others[0]].membership])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&peers.stdout);
    for &i in &others {
        let id = common::node_id(&nodes[i].api);
        let view: serde_json::Value = serde_json::from_str(&listed).unwrap();
        let seen = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["profile"]["id"] == id.as_str());
        assert!(!seen, "a device with the old key still sees {id}: {listed}");
    }
    // The revoked node itself was told nothing.
    assert!(
        !nodes[victim].proc.log_text()[logged[victim]..].contains("rotated the cluster key"),
        "{}",
        nodes[victim].proc.log_text()
    );
}
