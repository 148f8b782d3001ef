//! `exo-gateway` as a user starts it: alone (no node has joined yet) it serves the API and the
//! web page, says it is alive, and answers requests with 503 and the reason instead of hanging
//! or failing hard.
//!
//! Its end-to-end use in front of real nodes is tested by `exo-node`'s `openai_sdk` test; this
//! package having an integration test is also what makes `cargo test --workspace` build the
//! gateway's binary for that test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; the status and the body.
fn http(address: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

#[test]
fn a_gateway_without_nodes_is_alive_and_says_why_it_cannot_answer() {
    let home = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let _gateway = Gateway(
        Command::new(env!("CARGO_BIN_EXE_exo-gateway"))
            .env("EXO_HOME", home.path())
            .env("NO_COLOR", "1")
            .args(["--no-mdns", "--api-addr", &address])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        if let Some(answer) = http(&address, "GET", "/healthz", "") {
            break answer;
        }
        assert!(Instant::now() < deadline, "the gateway never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.0, 200, "{health:?}");

    let (status, body) = http(
        &address,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"any","messages":[{"role":"user","content":"Hi"}]}"#,
    )
    .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no node has joined"), "{body}");

    // The web page is served here too, and its cluster view says why nothing can answer.
    let (status, page) = http(&address, "GET", "/", "").unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("/ui/app.js"), "{page}");
    let (status, view) = http(&address, "GET", "/v1/cluster", "").unwrap();
    assert_eq!(status, 200, "{view}");
    assert!(view.contains("no node has joined"), "{view}");
    assert!(view.contains(r#""state":"observer""#), "{view}");
}

#[test]
fn help_explains_the_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_exo-gateway"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--cluster-key", "--peer", "--api-addr", "--api-key"] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}
