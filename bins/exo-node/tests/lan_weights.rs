//! Models over the LAN, as a user runs them: `exo-node serve --model NAME` on a device that has
//! no model file joins, learns the model from a peer that has it, fetches only its own layers,
//! and the cluster answers like one machine; killed mid-fetch and started again, it fetches
//! only what it did not have.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{KEY, NodeProc, exo_node, generate, node_id, spawn_node, wait_for_node_state};
use exo_store::{ChunkSet, Store};

/// The default model's name, as `/v1/models` lists it.
const NAME: &str = "SmolLM2-135M-Instruct.Q4_1";

/// The bytes a node's log says it received from peers (its "fetched from peers" lines).
fn received(node: &NodeProc) -> u64 {
    node.log_text()
        .lines()
        .filter(|l| l.contains("fetched from peers"))
        .map(|l| {
            let at = l.find("received_bytes=").unwrap() + "received_bytes=".len();
            l[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// The chunks node `node` holds on disk, and their bytes.
fn held(node: &NodeProc) -> (ChunkSet, u64) {
    let store = Store::open(&node.home().join("store"), None).unwrap();
    let entry = store.find(NAME).unwrap().expect("the model in the store");
    let held = entry.held();
    let bytes = entry.manifest().bytes_of(&held);
    (held, bytes)
}

fn ready(nodes: &[&NodeProc]) {
    for node in nodes {
        node.wait_for("2 stage(s)", Duration::from_secs(120));
        node.wait_for(
            "exo-node: ready: the cluster serves",
            Duration::from_secs(120),
        );
    }
}

#[test]
fn a_device_without_the_model_file_fetches_its_layers_and_the_cluster_answers_like_one() {
    let (single, single_text, _) = generate(&[]);
    // 120 MiB each: two nodes share the model.
    let with_file = spawn_node("120MiB", KEY, &[], &[]);
    let without = spawn_node(
        "120MiB",
        KEY,
        &["--model", NAME],
        std::slice::from_ref(&with_file),
    );
    ready(&[&with_file, &without]);
    without.wait_for(
        "learned the model's manifest from a peer",
        Duration::from_secs(5),
    );
    let (ids, text, stderr) = generate(&["--node", &without.grpc]);
    assert_eq!(ids, single, "{stderr}");
    assert_eq!(text, single_text);

    // It holds its layers only, and received exactly those bytes (and the header's).
    let (chunks, bytes) = held(&without);
    let store = Store::open(&with_file.home().join("store"), None).unwrap();
    let whole = store.find(NAME).unwrap().unwrap();
    assert!(whole.is_imported() && whole.is_complete());
    assert!(chunks.len() < u64::from(whole.manifest().chunk_count()));
    assert!(bytes < whole.manifest().bytes * 3 / 4, "{bytes} bytes held");
    assert_eq!(received(&without), bytes);

    // `exo-node models ls` shows it, fetched from peers, and the other node's file as its own.
    let ls = |node: &NodeProc| {
        let out = exo_node()
            .env("EXO_HOME", node.home())
            .args(["models", "ls"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = ls(&without);
    assert!(
        listed.contains(&format!("{NAME}.gguf")) && listed.contains("fetched from peers"),
        "{listed}"
    );
    assert!(ls(&with_file).contains("your file"), "{}", ls(&with_file));
}

#[test]
fn killed_mid_fetch_and_started_again_it_fetches_only_what_it_lacked() {
    let (single, _, _) = generate(&[]);
    // The source sends at 4 MiB/s, so the ~45 MiB fetch lasts long enough to be cut.
    let source = spawn_node("120MiB", KEY, &["--upload-limit", "4MiB"], &[]);
    let mut fetching = spawn_node(
        "120MiB",
        KEY,
        &["--model", NAME],
        std::slice::from_ref(&source),
    );
    // Progress is logged, and made durable, every 2 s; `/v1/cluster` shows it.
    fetching.wait_for("fetching from peers", Duration::from_secs(60));
    let id = node_id(&fetching.api);
    let view = wait_for_node_state(&fetching.api, &id, &["fetching"], Duration::from_secs(30));
    let me = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id.as_str())
        .unwrap();
    assert!(
        me["fetch"]["total_bytes"].as_u64().unwrap() > 1 << 20,
        "{me}"
    );
    assert!(me["progress"].as_f64().is_some(), "{me}");
    fetching.wait_for_count(0, "fetching model=", 2, Duration::from_secs(60));
    fetching.proc.child.kill().unwrap();
    let _ = fetching.proc.child.wait();
    let (kept, kept_bytes) = held(&fetching);
    assert!(!kept.is_empty());

    fetching.restart(std::slice::from_ref(&source.membership));
    ready(&[&source, &fetching]);
    let (ids, _, stderr) = generate(&["--node", &fetching.grpc]);
    assert_eq!(ids, single, "{stderr}");
    let (now, now_bytes) = held(&fetching);
    assert!(kept.iter().all(|i| now.contains(i)));
    // Only the chunks it did not keep crossed the link again.
    assert_eq!(received(&fetching), now_bytes - kept_bytes);
    assert!(kept_bytes > 0 && now_bytes > kept_bytes);
}
