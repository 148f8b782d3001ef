//! `GET /metrics`: what the counters, gauges and histograms say after some traffic.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use exo_api::{ApiConfig, GenerationError};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use crate::fake::FakeEngine;
use crate::support::{Reply, app, app_with, chat_body, get, json_request, post, send, with};

/// Scrapes `/metrics`, checking the format's content type.
async fn scrape(app: &Router) -> String {
    let reply = get(app, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    reply.text()
}

/// The value of the series `name` with exactly these labels, if the exposition has it.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}=\"{value}\""))
        .collect();
    wanted.sort();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, mut series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (
                    series_name,
                    rest.trim_end_matches('}')
                        .split(',')
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            series_labels.sort();
            (series_name == name && series_labels == wanted).then(|| value.parse().unwrap())
        })
}

#[track_caller]
fn assert_sample(text: &str, name: &str, labels: &[(&str, &str)], expected: f64) {
    assert_eq!(
        sample(text, name, labels),
        Some(expected),
        "{name}{labels:?} in:\n{text}"
    );
}

#[tokio::test]
async fn counters_gauges_and_histograms_follow_the_traffic() {
    let engine = FakeEngine::new().build();
    let app = app_with(
        &engine,
        ApiConfig {
            max_concurrent: 1,
            max_queued: 0,
            ..ApiConfig::default()
        },
    );

    // A streamed chat whose body is not read yet holds the only slot...
    let streamed = app
        .clone()
        .oneshot(json_request(
            Method::POST,
            "/v1/chat/completions",
            &with(chat_body(), json!({"stream": true})),
        ))
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let text = scrape(&app).await;
    assert_sample(&text, "exo_generations_running", &[], 1.0);
    assert_sample(&text, "exo_generations_queued", &[], 0.0);

    // ... so the next one is refused.
    let refused = post(&app, "/v1/chat/completions", chat_body()).await;
    refused.assert_error(429, None, Some("rate_limit_exceeded"));

    let body = streamed.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));

    let whole = post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let unknown = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"model": "nope"})),
    )
    .await;
    unknown.assert_error(404, Some("model"), Some("model_not_found"));
    assert_eq!(get(&app, "/v1/nowhere/42").await.status, 404);

    let text = scrape(&app).await;
    let requests = "exo_http_requests_total";
    let chat = "/v1/chat/completions";
    assert_sample(&text, requests, &[("path", chat), ("status", "200")], 2.0);
    assert_sample(&text, requests, &[("path", chat), ("status", "429")], 1.0);
    assert_sample(&text, requests, &[("path", chat), ("status", "404")], 1.0);
    // Unrouted paths share one label, whatever a client makes up.
    assert_sample(
        &text,
        requests,
        &[("path", "unmatched"), ("status", "404")],
        1.0,
    );
    assert_sample(
        &text,
        requests,
        &[("path", "/metrics"), ("status", "200")],
        1.0,
    );

    // Two finished generations of 7 prompt tokens and 3 generated ones each.
    assert_sample(&text, "exo_prompt_tokens_total", &[], 14.0);
    assert_sample(&text, "exo_completion_tokens_total", &[], 6.0);
    assert_sample(&text, "exo_time_to_first_token_seconds_count", &[], 2.0);
    // One sample per gap between tokens: two per generation.
    assert_sample(&text, "exo_inter_token_latency_seconds_count", &[], 4.0);
    // Real histograms, with buckets, not summaries.
    assert_sample(
        &text,
        "exo_time_to_first_token_seconds_bucket",
        &[("le", "+Inf")],
        2.0,
    );

    assert_sample(
        &text,
        "exo_generations_refused_total",
        &[("reason", "queue_full")],
        1.0,
    );
    assert_sample(
        &text,
        "exo_generations_failed_total",
        &[("kind", "unknown_model")],
        1.0,
    );
    assert_sample(&text, "exo_generations_running", &[], 0.0);
    assert_sample(&text, "exo_generations_queued", &[], 0.0);

    // The plan's stage, from the engine's cluster view, without its node's id.
    let stage = [("stage", "0"), ("layers", "0..16")];
    assert_sample(&text, "exo_stage_step_seconds", &stage, 0.0215);
    assert_sample(&text, "exo_stage_tokens_per_second", &stage, 46.5);
    assert_sample(&text, "exo_stage_requests", &stage, 0.0);
    assert_sample(&text, "exo_stage_sent_bytes_total", &stage, 4096.0);
    assert!(!text.contains("12D3KooW"), "{text}");
    assert!(text.contains("# HELP exo_http_requests_total "), "{text}");
}

#[tokio::test]
async fn engine_refusals_and_failures_are_counted_by_kind() {
    let busy = FakeEngine::new().start_error(GenerationError::Busy).build();
    let refusing = app(&busy);
    post(
        &refusing,
        "/v1/completions",
        json!({"model": "llama-3.2-1b", "prompt": "hi"}),
    )
    .await
    .assert_error(429, None, Some("rate_limit_exceeded"));
    let text = scrape(&refusing).await;
    assert_sample(
        &text,
        "exo_generations_refused_total",
        &[("reason", "engine_busy")],
        1.0,
    );

    // A failure after the stream started is counted too, though the response was a 200.
    let failing = FakeEngine::new()
        .error_at(1, GenerationError::Unavailable("layers are loading".into()))
        .build();
    let app = app(&failing);
    let reply = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"stream": true})),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().contains("layers are loading"),
        "{}",
        reply.text()
    );
    let text = scrape(&app).await;
    assert_sample(
        &text,
        "exo_generations_failed_total",
        &[("kind", "unavailable")],
        1.0,
    );
    assert_eq!(sample(&text, "exo_completion_tokens_total", &[]), None);
}

#[tokio::test]
async fn each_router_counts_its_own_requests() {
    let engine = FakeEngine::new().build();
    let busy = app(&engine);
    let idle = app(&engine);
    let reply = post(&busy, "/v1/chat/completions", chat_body()).await;
    assert_eq!(reply.status, 200);

    let text = scrape(&idle).await;
    assert_eq!(
        sample(&text, "exo_prompt_tokens_total", &[]),
        None,
        "{text}"
    );
    let text = scrape(&busy).await;
    assert_sample(&text, "exo_prompt_tokens_total", &[], 7.0);
}

#[tokio::test]
async fn metrics_need_the_key_when_one_is_configured() {
    let engine = FakeEngine::new().build();
    let app = app_with(
        &engine,
        ApiConfig {
            api_key: Some("sk-test-123".into()),
            ..ApiConfig::default()
        },
    );
    get(&app, "/metrics")
        .await
        .assert_error(401, None, Some("invalid_api_key"));
    let keyed = Request::get("/metrics")
        .header(header::AUTHORIZATION, "Bearer sk-test-123")
        .body(Body::empty())
        .unwrap();
    let reply: Reply = send(&app, keyed).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The refused scrape was counted.
    assert_sample(
        &reply.text(),
        "exo_http_requests_total",
        &[("path", "/metrics"), ("status", "401")],
        1.0,
    );
}
