//! The official `ollama` Python client against a real `exo-node` on the default model,
//! through the node's Ollama dialect (`/api/*`): chat (whole and streamed), generate, the
//! model list, show, and an unknown model's 404.
//!
//! Needs `python3` with pip: the test installs the pinned `ollama` package itself, once, into
//! a folder under the target directory. Run with `--release`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start_cluster;

/// The client version the test runs, pinned so that a new release cannot change the test.
const OLLAMA_CLIENT: &str = "ollama==0.6.3";

#[test]
fn the_ollama_python_client_works_against_a_node() {
    let mut python = common::python_with(&[OLLAMA_CLIENT]);
    let cluster = start_cluster(1, "400MiB", &[]);
    let node = &cluster.nodes[0];
    // The node's API is `http://127.0.0.1:PORT/v1`; Ollama's client wants the bare host.
    let host = node.api.trim_end_matches("/v1");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ollama_e2e.py");
    let out = python.arg(script).args(["--host", host]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\nnode log:\n{}",
        node.log_text()
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("Paris"), "{stdout}");
}
