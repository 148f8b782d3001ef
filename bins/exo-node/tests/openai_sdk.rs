//! The official `openai` Python SDK against a real `exo-node` on the default model, and the
//! same streaming request through `exo-gateway` in front of a two-node cluster.
//!
//! Needs `python3` with pip: the test installs the pinned `openai` package itself, once, into a
//! folder under the target directory. Run with `--release`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Proc, free_port, start_cluster_with_key};

const SINGLE_KEY: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
/// The SDK version the test runs, pinned so that a new release cannot change the test.
const OPENAI_SDK: &str = "openai==3.54.0";
const PAIR_KEY: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

#[test]
fn the_openai_sdk_works_against_a_node_and_through_a_gateway() {
    // The SDK is installed by the test itself, once, under the target directory.
    let python = || common::python_with(&[OPENAI_SDK]);

    // One node with an API key.
    let single = start_cluster_with_key(1, "4GiB", SINGLE_KEY, &["--api-key", "node-key"]);
    // Two nodes that must split the model, and a gateway that knows them as static peers.
    let pair = start_cluster_with_key(2, "120MiB", PAIR_KEY, &["--no-api"]);
    let gateway_api = format!("127.0.0.1:{}", free_port());
    let gateway_bin = common::sibling_binary("exo-gateway", "exo-gateway");
    let mut gateway = Command::new(gateway_bin);
    let home = tempfile::tempdir().unwrap();
    gateway
        .env("EXO_HOME", home.path())
        .args([
            "--no-mdns",
            "--cluster-key",
            PAIR_KEY,
            "--api-key",
            "gw-key",
        ])
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", free_port())])
        .args(["--api-addr", &gateway_api]);
    for node in &pair.nodes {
        gateway.args(["--peer", &node.membership]);
    }
    let gateway = Proc::spawn(gateway);
    gateway.wait_for("gateway serving the API", Duration::from_secs(30));
    // Wait until the gateway sees both nodes.
    gateway.wait_for_count(0, "node joined", 2, Duration::from_secs(30));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_e2e.py");
    let out = python()
        .arg(script)
        .args(["--base-url", &single.nodes[0].api, "--api-key", "node-key"])
        .args([
            "--gateway-url",
            &format!("http://{gateway_api}/v1"),
            "--gateway-key",
            "gw-key",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\nnode log:\n{}\ngateway log:\n{}",
        single.nodes[0].log_text(),
        gateway.log_text()
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("Paris"), "{stdout}");
}
