//! The clients agents are built with, against a real two-node cluster on the default model:
//! the openai SDK's `.parse` (Pydantic), `json_object`, required and named tool calls (whole
//! and streamed), a tool result going back in, a schema the engine cannot compile (400), and
//! LangChain's `with_structured_output` and `bind_tools` round trip, and the Anthropic SDK
//! against `/v1/messages` (text, its stream helper, a forced tool call streamed and its result
//! going back in, an error in Anthropic's shape), and the `llm` CLI's `--schema` through chat
//! completions and the Responses API, and litellm (plain, streamed, a forced call, a schema);
//! and embeddings through `/v1/embeddings` (the openai SDK and LangChain's OpenAIEmbeddings:
//! unit vectors, the same for one text alone or in a batch, two capitals closer to each other
//! than to a cat).
//! The two nodes split the
//! model, so every grammar is followed on the last stage of a real pipeline.
//!
//! Needs `python3` with pip: the test installs the pinned packages itself, once, into a folder
//! under the target directory. Run with `--release`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start_cluster;

/// The `llm` CLI and litellm, each in a package folder of its own (their dependencies pin
/// other versions).
const LLM_CLI: &str = "llm==0.36";
const LITELLM: &str = "litellm==1.110.2";

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
    assert!(results["required_call"]["arguments"]["city"].is_string());
    // SmolLM2-135M's hidden width.
    assert_eq!(results["embeddings"]["width"], 576);
    assert_eq!(results["langchain_structured"]["capital"], "Paris");
    assert!(
        results["anthropic_text"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );

    // The `llm` CLI with a schema, through chat completions and through the Responses API
    // (OpenAI-compatible models of its own `extra-openai-models.yaml`).
    let home = tempfile::tempdir().unwrap();
    let model = "SmolLM2-135M-Instruct.Q4_1";
    let api = &node.api;
    std::fs::write(
        home.path().join("extra-openai-models.yaml"),
        format!(
            "- model_id: exo\n  model_name: {model}\n  api_base: \"{api}\"\n  supports_schema: true\n\
             - model_id: exo-responses\n  model_name: {model}\n  api_base: \"{api}\"\n  supports_schema: true\n  responses: true\n"
        ),
    )
    .unwrap();
    for model in ["exo", "exo-responses"] {
        let out = common::python_with(&[LLM_CLI])
            .env("LLM_USER_PATH", home.path())
            .args([
                "-m",
                "llm",
                "--no-log",
                "-m",
                model,
                "--schema",
                "name, age int",
                // Greedy: a sampled answer of the 135M model can ramble inside a string until
                // the length limit cuts the JSON (seen in CI).
                "-o",
                "temperature",
                "0",
            ])
            .arg("Invent a person.")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "llm -m {model}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let person: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("llm -m {model} printed {stdout:?}: {e}"));
        assert!(person["name"].is_string(), "{person}");
        assert!(person["age"].is_i64(), "{person}");
        eprintln!("llm -m {model} --schema: {person}");
    }

    // litellm, as an OpenAI-compatible provider.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/litellm_e2e.py");
    let out = common::python_with(&[LITELLM])
        .arg(script)
        .args(["--base-url", &node.api, "--model", model])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "litellm: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("litellm: {stdout}");
}
