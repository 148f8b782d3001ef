//! The bounded generation queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::http::Method;
use exo_api::ApiConfig;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use crate::fake::{FakeEngine, PROMPTLY};
use crate::support::{app_with, chat_body, json_request, post, with};

fn limits(max_concurrent: usize, max_queued: usize) -> ApiConfig {
    ApiConfig {
        max_concurrent,
        max_queued,
        ..ApiConfig::default()
    }
}

/// Sends a chat request in the background and returns its status when it completes.
fn in_background(app: &Router) -> tokio::task::JoinHandle<u16> {
    let app = app.clone();
    tokio::spawn(async move {
        let reply = post(&app, "/v1/chat/completions", chat_body()).await;
        reply.status.as_u16()
    })
}

/// Sends a chat request in the background once the engine has stopped every generation and
/// the API has freed their slots (a departed client's slot frees shortly after its engine
/// stops), retrying while it is refused with 429; returns when the engine has started
/// `started` generations in all.
async fn in_background_once_free(
    app: &Router,
    engine: &FakeEngine,
    started: usize,
) -> tokio::task::JoinHandle<u16> {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let mut attempt = in_background(app);
        let began = async {
            engine
                .probe
                .wait_for("a generation to start", |p| {
                    p.started.load(Ordering::SeqCst) == started
                })
                .await;
        };
        tokio::select! {
            () = began => return attempt,
            refused = async { (&mut attempt).await } => {
                assert_eq!(refused.unwrap(), 429, "the request ended without starting");
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn full_queue_is_429_at_once() {
    let engine = FakeEngine::new().hang_after(0).build();
    let app = app_with(&engine, limits(1, 0));
    let first = in_background(&app);
    engine
        .probe
        .wait_for("the first generation to start", |p| {
            p.running.load(Ordering::SeqCst) == 1
        })
        .await;

    let reply = post(&app, "/v1/chat/completions", chat_body()).await;
    let message = reply.assert_error(429, None, Some("rate_limit_exceeded"));
    assert!(message.contains("queue"), "{message}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(engine.probe.started.load(Ordering::SeqCst), 1);

    // The client of the first request goes away: its slot frees and a new request starts.
    first.abort();
    engine
        .probe
        .wait_for("the first generation to be cancelled", |p| {
            p.cancelled.load(Ordering::SeqCst) == 1
        })
        .await;
    let third = in_background_once_free(&app, &engine, 2).await;
    third.abort();
}

#[tokio::test]
async fn queued_request_runs_when_a_slot_frees() {
    let engine = FakeEngine::new().hang_after(0).build();
    let app = app_with(&engine, limits(1, 1));
    let first = in_background(&app);
    engine
        .probe
        .wait_for("the first generation to start", |p| {
            p.started.load(Ordering::SeqCst) == 1
        })
        .await;
    // One of the next two waits in the queue, and the other finds it full.
    let mut second = in_background(&app);
    let mut third = in_background(&app);
    let decided = async {
        tokio::select! {
            status = &mut second => (status.unwrap(), third),
            status = &mut third => (status.unwrap(), second),
        }
    };
    let (status, waiting) = tokio::time::timeout(PROMPTLY, decided).await.unwrap();
    assert_eq!(status, 429);
    assert_eq!(engine.probe.started.load(Ordering::SeqCst), 1);

    first.abort();
    engine
        .probe
        .wait_for("the queued generation to start", |p| {
            p.started.load(Ordering::SeqCst) == 2
        })
        .await;
    waiting.abort();
}

#[tokio::test]
async fn no_more_than_max_concurrent_generations_run_at_once() {
    let engine = FakeEngine::new().delay(Duration::from_millis(5)).build();
    let app = app_with(&engine, limits(2, 16));
    let requests: Vec<_> = (0..6).map(|_| in_background(&app)).collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert!(engine.probe.peak.load(Ordering::SeqCst) <= 2);
    assert_eq!(engine.probe.started.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_stream_holds_its_slot_until_its_body_is_dropped() {
    let engine = Arc::new(FakeEngine::new().hang_after(1));
    let app = app_with(&engine, limits(1, 0));
    let request = json_request(
        Method::POST,
        "/v1/chat/completions",
        &with(chat_body(), json!({"stream": true})),
    );
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // The role chunk, then the first piece.
    body.frame().await.unwrap().unwrap();

    let reply = post(&app, "/v1/chat/completions", chat_body()).await;
    reply.assert_error(429, None, Some("rate_limit_exceeded"));

    drop(body);
    engine
        .probe
        .wait_for("the stream's generation to be cancelled", |p| {
            p.cancelled.load(Ordering::SeqCst) == 1
        })
        .await;
    let next = in_background_once_free(&app, &engine, 2).await;
    next.abort();
}

#[tokio::test]
async fn a_slot_stays_taken_until_the_work_of_a_client_that_left_has_stopped() {
    // The engine goes on for 400 ms after it notices its client left (a stage finishing its
    // step): the next request must not start before then, or `max_concurrent` would bound
    // connected clients rather than work.
    let stop_delay = Duration::from_millis(400);
    let engine = FakeEngine::new()
        .hang_after(0)
        .stop_delay(stop_delay)
        .build();
    let app = app_with(&engine, limits(1, 1));
    let first = in_background(&app);
    engine
        .probe
        .wait_for("the first generation to start", |p| {
            p.running.load(Ordering::SeqCst) == 1
        })
        .await;
    first.abort();
    engine
        .probe
        .wait_for("the first generation to notice its client left", |p| {
            p.cancelled.load(Ordering::SeqCst) == 1
        })
        .await;
    let noticed = std::time::Instant::now();
    let second = in_background(&app);
    engine
        .probe
        .wait_for("the second generation to start", |p| {
            p.started.load(Ordering::SeqCst) == 2
        })
        .await;
    assert!(
        noticed.elapsed() >= stop_delay - Duration::from_millis(50),
        "the second request started {:?} after the first was cancelled, before its work stopped",
        noticed.elapsed()
    );
    assert_eq!(
        engine.probe.peak.load(Ordering::SeqCst),
        1,
        "two generations ran at once with max_concurrent 1"
    );
    second.abort();
}
