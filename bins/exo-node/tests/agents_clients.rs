//! The clients agents are built with, against a real two-node cluster on the default model:
//! the openai SDK's `.parse` (Pydantic), `json_object`, required and named tool calls (whole
//! and streamed), a tool result going back in, a schema the engine cannot compile (400), and
//! LangChain's `with_structured_output` and `bind_tools` round trip, and the Anthropic SDK
//! against `/v1/messages` (text, its stream helper, a forced tool call streamed and its result
//! going back in, an error in Anthropic's shape). The two nodes split the
//! model, so every grammar is followed on the last stage of a real pipeline.
//!
//! Needs `python3` with pip: the test installs the pinned packages itself, once, into a folder
//! under the target directory. Run with `--release`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start_cluster;

/// The client versions the test runs, pinned so that a new release cannot change the test.
const CLIENTS: &[&str] = &[
    "openai==3.54.0",
    "langchain-openai==1.7.4",
    "anthropic==2.10.0",
];

#[test]
fn agent_clients_get_structured_output_and_tool_calls_from_a_pipeline() {
    let mut python = common::python_with(CLIENTS);
    // 120 MiB each cannot hold the default model alone: the plan has two stages.
    let cluster = start_cluster(2, "120MiB", &[]);
    let node = &cluster.nodes[0];
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agents_e2e.py");
    let out = python
        .arg(script)
        .args(["--base-url", &node.api])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\nnode log:\n{}\nother node:\n{}",
        node.log_text(),
        cluster.nodes[1].log_text()
    );
    eprintln!("{stdout}");
    let results: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(results["required_call"]["arguments"]["city"], "Paris");
    assert_eq!(results["langchain_structured"]["capital"], "Paris");
    assert!(
        results["anthropic_text"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
}
