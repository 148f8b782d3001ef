//! The connection limits of `serve`: slow heads and bodies, idle connections and the
//! connection cap, over real sockets on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use exo_api::{ApiConfig, Engine, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::fake::{FakeEngine, PROMPTLY};
use crate::serve::read_until;
use crate::support::{chat_body, with};

/// A timeout short enough for a quick test.
const SHORT: Duration = Duration::from_millis(300);

/// Serves `engine` with `config` until the returned sender is dropped.
async fn start(engine: &Arc<FakeEngine>, config: ApiConfig) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let engine: Arc<dyn Engine> = engine.clone();
    tokio::spawn(serve(listener, engine, config, async {
        let _ = stopped.await;
    }));
    (address, stop)
}

/// A request's head and body as one HTTP/1.1 message on a kept-alive connection.
fn message(address: SocketAddr, method: &str, path: &str, body: &Value) -> String {
    let body = body.to_string();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads until the connection is closed (or fails); `None` if it is still open after
/// [`PROMPTLY`].
async fn read_to_close(stream: &mut TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(PROMPTLY, read).await.ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// A chat over a fresh connection; returns the response up to its answer.
async fn chat(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = message(address, "POST", "/v1/chat/completions", &chat_body());
    stream.write_all(request.as_bytes()).await.unwrap();
    read_until(&mut stream, "Hello, world!").await
}

#[tokio::test]
async fn a_client_that_stalls_in_the_middle_of_a_head_is_disconnected() {
    let engine = FakeEngine::new().build();
    let config = ApiConfig {
        header_timeout: SHORT,
        ..ApiConfig::default()
    };
    let (address, _stop) = start(&engine, config).await;

    // An idle connection is not held to the header timeout: it still serves a request sent
    // after several header timeouts.
    let mut idle = TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(SHORT * 3).await;
    let request = message(address, "POST", "/v1/chat/completions", &chat_body());
    idle.write_all(request.as_bytes()).await.unwrap();
    let response = read_until(&mut idle, "Hello, world!").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let mut slow = TcpStream::connect(address).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    let received = read_to_close(&mut slow)
        .await
        .expect("the slow client's connection was not closed");
    assert!(!received.contains("200 OK"), "{received}");
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_the_connection_closes() {
    let engine = FakeEngine::new().build();
    let config = ApiConfig {
        request_body_timeout: SHORT,
        ..ApiConfig::default()
    };
    let (address, _stop) = start(&engine, config).await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();

    let received = read_to_close(&mut stream)
        .await
        .expect("the connection stayed open after the body timed out");
    assert!(received.starts_with("HTTP/1.1 408"), "{received}");
    let (_, body) = received.split_once("\r\n\r\n").unwrap();
    let envelope: Value = serde_json::from_str(body).unwrap();
    assert_eq!(envelope["error"]["code"], "request_timeout", "{envelope}");
    assert_eq!(envelope["error"]["type"], "invalid_request_error");
    assert_eq!(
        engine.probe.requests().len(),
        0,
        "nothing reached the engine"
    );
}

#[tokio::test]
async fn idle_connections_close_but_a_slow_stream_runs_to_its_end() {
    // Each piece comes after more than the idle timeout: a stream is not an idle connection.
    let engine = FakeEngine::new().delay(SHORT * 2).build();
    let config = ApiConfig {
        idle_timeout: SHORT,
        ..ApiConfig::default()
    };
    let (address, _stop) = start(&engine, config).await;

    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = message(
        address,
        "POST",
        "/v1/chat/completions",
        &with(chat_body(), json!({"stream": true})),
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let received = read_until(&mut stream, "data: [DONE]").await;
    assert!(received.contains("\"content\":\"ld!\""), "{received}");

    // Once the response is done, the same connection is idle and is closed.
    let rest = read_to_close(&mut stream)
        .await
        .expect("an idle kept-alive connection stayed open");
    assert!(!rest.contains("HTTP/1.1"), "{rest}");

    let mut fresh = TcpStream::connect(address).await.unwrap();
    read_to_close(&mut fresh)
        .await
        .expect("a connection that never sent a request stayed open");
}

#[tokio::test]
async fn at_the_connection_cap_idle_connections_make_room_for_a_chat() {
    let engine = FakeEngine::new().build();
    let config = ApiConfig {
        max_connections: 50,
        ..ApiConfig::default()
    };
    let (address, _stop) = start(&engine, config).await;
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(TcpStream::connect(address).await.unwrap());
    }

    let response = chat(address).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // 60 idle connections and the chat's: at least 11 had to make room, the oldest first.
    let mut closed = 0;
    for stream in &mut idle[..11] {
        if read_to_close(stream).await.is_some() {
            closed += 1;
        }
    }
    assert_eq!(closed, 11, "the oldest idle connections were closed");
}

#[tokio::test]
async fn with_every_connection_busy_a_new_one_gets_503_at_once() {
    let engine = FakeEngine::new().hang_after(1).build();
    let config = ApiConfig {
        max_connections: 2,
        ..ApiConfig::default()
    };
    let (address, _stop) = start(&engine, config).await;
    let streaming = with(chat_body(), json!({"stream": true}));
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = message(address, "POST", "/v1/chat/completions", &streaming);
        stream.write_all(request.as_bytes()).await.unwrap();
        read_until(&mut stream, "Hello").await;
        busy.push(stream);
    }

    let mut refused = TcpStream::connect(address).await.unwrap();
    let request = message(address, "POST", "/v1/chat/completions", &chat_body());
    refused.write_all(request.as_bytes()).await.unwrap();
    let received = read_to_close(&mut refused)
        .await
        .expect("the refused connection was left open");
    assert!(received.starts_with("HTTP/1.1 503"), "{received}");
    assert!(received.contains("retry-after: 1"), "{received}");
    let (_, body) = received.split_once("\r\n\r\n").unwrap();
    let envelope: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        envelope["error"]["code"], "service_unavailable",
        "{envelope}"
    );

    // A stream that ends frees its connection's place. (The engine hangs every generation,
    // so the place is checked with a request that does not generate.)
    busy.pop();
    let mut tries = 0;
    loop {
        let response = health_or_refused(address).await;
        if response.starts_with("HTTP/1.1 200") {
            break;
        }
        tries += 1;
        assert!(tries < 50, "no place freed: {response}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /healthz` on a fresh connection, which may be refused: reads to the end of the
/// connection or of the response.
async fn health_or_refused(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        while !String::from_utf8_lossy(&received).ends_with('}') {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(PROMPTLY, read).await;
    String::from_utf8_lossy(&received).into_owned()
}
