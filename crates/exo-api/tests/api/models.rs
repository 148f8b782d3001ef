//! `GET /v1/models`, `GET /v1/models/{model}`, `GET /v1/cluster`, `GET /healthz` and
//! `GET /readyz`.

use serde_json::json;

use crate::fake::{FakeEngine, sample_cluster};
use crate::support::{app, get};

#[tokio::test]
async fn models_are_listed_in_openai_shape() {
    let engine = FakeEngine::new().build();
    let reply = get(&app(&engine), "/v1/models").await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], "llama-3.2-1b");
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["created"], 1_700_000_000);
    assert_eq!(data[0]["owned_by"], "exo");
    assert_eq!(data[1]["id"], "meta-llama/Llama-3.2-1B");
}

#[tokio::test]
async fn an_empty_model_list_is_still_a_list() {
    let engine = FakeEngine::new().no_models().build();
    let body = get(&app(&engine), "/v1/models").await.json();
    assert_eq!(body, json!({"object": "list", "data": []}));
}

#[tokio::test]
async fn one_model_is_found_by_id_even_with_a_slash() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let body = get(&app, "/v1/models/llama-3.2-1b").await.json();
    assert_eq!(body["id"], "llama-3.2-1b");
    assert_eq!(body["object"], "model");
    assert_eq!(body["context_length"], 8192);
    let body = get(&app, "/v1/models/meta-llama/Llama-3.2-1B").await.json();
    assert_eq!(body["id"], "meta-llama/Llama-3.2-1B");
}

#[tokio::test]
async fn unknown_model_is_404_listing_available_ids() {
    let engine = FakeEngine::new().build();
    let reply = get(&app(&engine), "/v1/models/gpt-4o").await;
    let message = reply.assert_error(404, Some("model"), Some("model_not_found"));
    assert!(message.contains("gpt-4o"), "{message}");
    assert!(message.contains("llama-3.2-1b"), "{message}");
    assert!(message.contains("meta-llama/Llama-3.2-1B"), "{message}");

    let engine = FakeEngine::new().no_models().build();
    let reply = get(&app(&engine), "/v1/models/gpt-4o").await;
    let message = reply.assert_error(404, Some("model"), Some("model_not_found"));
    assert!(message.contains("no models are available"), "{message}");
}

#[tokio::test]
async fn cluster_view_is_served_as_snake_case_json() {
    let engine = FakeEngine::new().build();
    let reply = get(&app(&engine), "/v1/cluster").await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["nodes"][0]["offered_memory_bytes"], 48u64 << 30);
    assert_eq!(body["nodes"][0]["is_self"], true);
    assert_eq!(
        body["links"][0]["bandwidth_bytes_per_s"],
        serde_json::Value::Null
    );
    assert_eq!(body["plan"]["stages"][0]["has_head"], true);
    let parsed: exo_api::ClusterView = serde_json::from_value(body).unwrap();
    assert_eq!(parsed, sample_cluster());
}

#[tokio::test]
async fn healthz_and_its_alias_health_are_ok() {
    let engine = FakeEngine::new().build();
    for path in ["/healthz", "/health"] {
        let reply = get(&app(&engine), path).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.json(), json!({"status": "ok"}), "{path}");
    }
}

#[tokio::test]
async fn readyz_says_why_until_the_engine_can_serve_and_healthz_stays_ok() {
    let loading = FakeEngine::new()
        .not_ready("loading layers 0..15 of SmolLM2")
        .build();
    let app = app(&loading);
    let reply = get(&app, "/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.json(),
        json!({"status": "not_ready", "reason": "loading layers 0..15 of SmolLM2"})
    );
    assert_eq!(get(&app, "/healthz").await.status, 200);

    let ready = FakeEngine::new().build();
    let reply = get(&super::support::app(&ready), "/readyz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"status": "ready"}));
}
