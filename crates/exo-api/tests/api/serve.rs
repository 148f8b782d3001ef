//! The API over a real socket: client disconnects reach the engine, and shutdown drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use exo_api::{ApiConfig, Engine, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::fake::{FakeEngine, PROMPTLY};
use crate::support::{chat_body, with};

pub(crate) struct Server {
    pub(crate) address: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

pub(crate) async fn start(engine: &Arc<FakeEngine>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown, stop) = oneshot::channel::<()>();
    let engine: Arc<dyn Engine> = engine.clone();
    let task = tokio::spawn(serve(listener, engine, ApiConfig::default(), async {
        let _ = stop.await;
    }));
    Server {
        address,
        shutdown,
        task,
    }
}

/// Writes one HTTP/1.1 request and returns the open connection.
pub(crate) async fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream
}

/// Reads until `needle` has arrived; returns everything read so far.
pub(crate) async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        while !String::from_utf8_lossy(&received).contains(needle) {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(
                n > 0,
                "connection closed before {needle:?}: {}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(PROMPTLY, read).await.unwrap();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn dropping_a_stream_connection_cancels_the_generation() {
    // The engine sends one piece and then produces nothing until it is cancelled, so only the
    // disconnect itself (not a failed write of a later chunk) can stop it.
    let engine = FakeEngine::new().hang_after(1).build();
    let server = start(&engine).await;
    let mut stream = request(
        server.address,
        "POST",
        "/v1/chat/completions",
        Some(&with(chat_body(), json!({"stream": true}))),
    )
    .await;
    let received = read_until(&mut stream, "Hello").await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(received.contains("text/event-stream"), "{received}");
    assert_eq!(engine.probe.cancelled.load(Ordering::SeqCst), 0);

    drop(stream);
    engine
        .probe
        .wait_for("the engine to notice the client left", |p| {
            p.cancelled.load(Ordering::SeqCst) == 1 && p.running.load(Ordering::SeqCst) == 0
        })
        .await;
    assert!(!engine.probe.finished.load(Ordering::SeqCst));
}

#[tokio::test]
async fn dropping_a_waiting_connection_cancels_the_generation() {
    let engine = FakeEngine::new().hang_after(0).build();
    let server = start(&engine).await;
    let stream = request(
        server.address,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body()),
    )
    .await;
    engine
        .probe
        .wait_for("the generation to start", |p| {
            p.started.load(Ordering::SeqCst) == 1
        })
        .await;
    drop(stream);
    engine
        .probe
        .wait_for("the engine to notice the client left", |p| {
            p.cancelled.load(Ordering::SeqCst) == 1
        })
        .await;
}

#[tokio::test]
async fn serves_over_tcp_and_stops_on_shutdown() {
    let engine = FakeEngine::new().build();
    let server = start(&engine).await;
    let mut stream = request(
        server.address,
        "POST",
        "/v1/chat/completions",
        Some(&with(chat_body(), json!({"stream": true}))),
    )
    .await;
    let received = read_until(&mut stream, "data: [DONE]").await;
    assert!(received.contains("\"content\":\"ld!\""), "{received}");

    let mut stream = request(server.address, "GET", "/healthz", None).await;
    let received = read_until(&mut stream, "\"ok\"").await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");

    server.shutdown.send(()).unwrap();
    let stopped = tokio::time::timeout(PROMPTLY, server.task).await;
    stopped.unwrap().unwrap().unwrap();
    assert!(
        TcpStream::connect(server.address).await.is_err(),
        "listener is closed"
    );
}
