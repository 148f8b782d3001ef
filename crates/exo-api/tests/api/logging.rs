//! One log line per request, written when its response is done.

use std::cell::RefCell;
use std::io::Write;
use std::sync::Once;

use axum::http::Method;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use crate::fake::FakeEngine;
use crate::support::{app, chat_body, get, json_request, post, with};

thread_local! {
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Writes into the current thread's capture buffer, if it has one. A global subscriber with
/// a per-thread sink, because a scoped one misses events when callsites are first hit by
/// tests running in parallel on other threads.
struct ThreadSink;

impl Write for ThreadSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with_borrow_mut(|captured| {
            if let Some(captured) = captured {
                captured.extend_from_slice(bytes);
            }
        });
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing this thread's log output.
fn capture() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| ThreadSink)
            .with_ansi(false)
            .init();
    });
    CAPTURED.set(Some(Vec::new()));
}

fn request_lines() -> Vec<String> {
    let text = CAPTURED.with_borrow(|captured| {
        String::from_utf8_lossy(captured.as_deref().unwrap_or_default()).into_owned()
    });
    text.lines()
        .filter(|line| line.contains(" request "))
        .map(str::to_owned)
        .collect()
}

// The test runtime is single-threaded, so every handler and the fake log on this thread.
#[tokio::test]
async fn each_request_logs_one_line_with_status_and_tokens() {
    capture();
    let app_ = app(&FakeEngine::new().build());
    post(&app_, "/v1/chat/completions", chat_body()).await;
    get(&app_, "/v1/nowhere").await;

    // A stream the client abandons after its first chunk.
    let engine = FakeEngine::new().hang_after(1).build();
    let stream = json_request(
        Method::POST,
        "/v1/chat/completions",
        &with(chat_body(), json!({"stream": true})),
    );
    let response = app(&engine).oneshot(stream).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(request_lines().len(), 2, "a stream logs when it ends");
    drop(body);

    let lines = request_lines();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let finished = &lines[0];
    for field in [
        "method=POST",
        "path=/v1/chat/completions",
        "status=200",
        "prompt_tokens=7",
        "completion_tokens=3",
        "complete=true",
        "duration_ms=",
    ] {
        assert!(finished.contains(field), "{field} in {finished}");
    }
    assert!(lines[1].contains("status=404"), "{}", lines[1]);
    assert!(lines[2].contains("status=200"), "{}", lines[2]);
    assert!(lines[2].contains("complete=false"), "{}", lines[2]);

    // A request of several generations logs their sums: two inputs of 7 prompt tokens each.
    post(
        &app_,
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": ["a", "b"]}),
    )
    .await;
    let lines = request_lines();
    let embedded = lines.last().unwrap();
    assert!(embedded.contains("path=/v1/embeddings"), "{embedded}");
    assert!(embedded.contains("prompt_tokens=14"), "{embedded}");
    assert!(embedded.contains("completion_tokens=0"), "{embedded}");
}
