//! A small WebDriver client for the browser test: headless Chromium driven by chromedriver over
//! WebDriver's JSON-over-HTTP protocol (W3C), with the few commands the test needs. Written
//! here rather than taken from a crate: a dozen blocking HTTP calls on loopback, no TLS, and
//! nothing new to build for the rest of the workspace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::free_port;

/// How to get a browser when none is found.
const INSTALL: &str = "the browser test needs Chromium and its WebDriver: on Debian or Ubuntu \
    run `apt-get install chromium chromium-driver` (or point EXO_CHROMIUM and \
    EXO_CHROMEDRIVER at a Chromium and its chromedriver)";

/// A headless Chromium with a fresh profile, and the chromedriver that drives it.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    /// Console messages read so far (reading the browser's log empties it).
    console: Vec<Value>,
    _profile: tempfile::TempDir,
}

fn find(variable: &str, names: &[&str]) -> PathBuf {
    locate(variable, names).unwrap_or_else(|| panic!("{} not found; {INSTALL}", names.join(" or ")))
}

const CHROMIUM: &[&str] = &["chromium", "chromium-browser", "google-chrome"];

/// Where the program is: `variable` if set, else the first of `names` on `PATH` or in /usr/bin.
fn locate(variable: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "{variable}={} does not exist; {INSTALL}",
            path.display()
        );
        return Some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Whether the browser test can run here. Without Chromium and chromedriver it says so loudly
/// and the test returns, so that a newcomer's `cargo test` passes with only Rust and Python;
/// with `EXO_BROWSER_TESTS=require` (CI sets it) a missing browser fails the test instead.
pub fn browser_present(test: &str) -> bool {
    let missing: Vec<&str> = [
        ("chromium", locate("EXO_CHROMIUM", CHROMIUM).is_none()),
        (
            "chromedriver",
            locate("EXO_CHROMEDRIVER", &["chromedriver"]).is_none(),
        ),
    ]
    .into_iter()
    .filter_map(|(name, gone)| gone.then_some(name))
    .collect();
    if missing.is_empty() {
        return true;
    }
    let required = std::env::var("EXO_BROWSER_TESTS").is_ok_and(|v| v == "require");
    assert!(!required, "{} not found; {INSTALL}", missing.join(" and "));
    eprintln!(
        "SKIPPED {test}: {} not found; {INSTALL}. (EXO_BROWSER_TESTS=require makes this a failure.)",
        missing.join(" and ")
    );
    false
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a session with headless Chromium
    /// (flags for a closed network: no sandbox, GPU, QUIC, sync or background fetches).
    pub fn start() -> Browser {
        let chromium = find("EXO_CHROMIUM", CHROMIUM);
        let chromedriver = find("EXO_CHROMEDRIVER", &["chromedriver"]);
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}; {INSTALL}", chromedriver.display()));
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            console: Vec::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !browser.driver_ready() {
            assert!(
                Instant::now() < deadline,
                "{} did not answer within 30 s",
                chromedriver.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            "--force-device-scale-factor=1",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let created = browser.request("POST", "/session", Some(&capabilities));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {created}; {INSTALL}"))
            .to_owned();
        browser
    }

    fn driver_ready(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let head = format!(
            "GET /status HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        );
        stream.write_all(head.as_bytes()).is_ok()
            && read_response(&mut stream).is_ok_and(|(_, body)| body.contains("\"ready\":true"))
    }

    /// One WebDriver call; returns its `value`, or fails the test with the driver's error.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
        let (head, payload) = read_response(&mut stream)
            .unwrap_or_else(|e| panic!("{method} {path}: reading chromedriver's answer: {e}"));
        let text = format!("{head}\r\n\r\n{payload}");
        let reply: Value = serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        let value = reply["value"].clone();
        if let Some(error) = value.get("error") {
            panic!("{method} {path}: {error}: {}", value["message"]);
        }
        value
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url`.
    pub fn goto(&mut self, url: &str) {
        let path = self.session_path("/url");
        self.request("POST", &path, Some(&json!({"url": url})));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; returns what it
    /// returns.
    pub fn run(&self, script: &str, args: &[Value]) -> Value {
        let path = self.session_path("/execute/sync");
        self.request(
            "POST",
            &path,
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// Runs `script` every 100 ms until it returns something truthy (at most `within`); returns
    /// that. On failure, says what was awaited and what the page showed.
    pub fn wait_for(&mut self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let value = self.run(script, &[]);
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                let page = self.run("return document.body.innerText", &[]);
                let console = self.console_messages();
                panic!(
                    "{what}: not seen within {within:?}\npage text:\n{}\nconsole: {console:#?}",
                    page.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn element(&self, css: &str) -> String {
        let path = self.session_path("/element");
        let found = self.request(
            "POST",
            &path,
            Some(&json!({"using": "css selector", "value": css})),
        );
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    /// Clicks the element `css` selects, as a user would.
    pub fn click(&self, css: &str) {
        let path = self.session_path(&format!("/element/{}/click", self.element(css)));
        self.request("POST", &path, Some(&json!({})));
    }

    /// Replaces the value of the field `css` selects by typing `text` into it.
    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        let clear = self.session_path(&format!("/element/{element}/clear"));
        self.request("POST", &clear, Some(&json!({})));
        let value = self.session_path(&format!("/element/{element}/value"));
        self.request("POST", &value, Some(&json!({"text": text})));
    }

    /// The browser console's messages so far, as `LEVEL message` lines.
    pub fn console_messages(&mut self) -> Vec<String> {
        let path = self.session_path("/se/log");
        if let Value::Array(entries) =
            self.request("POST", &path, Some(&json!({"type": "browser"})))
        {
            self.console.extend(entries);
        }
        self.console
            .iter()
            .map(|e| format!("{} {}", e["level"].as_str().unwrap_or("?"), e["message"]))
            .collect()
    }

    /// Console messages at error level (`SEVERE`): script errors, failed loads, `console.error`.
    pub fn console_errors(&mut self) -> Vec<String> {
        self.console_messages()
            .into_iter()
            .filter(|line| line.starts_with("SEVERE"))
            .collect()
    }

    /// Resizes the window (a screenshot shows only what the window holds).
    pub fn resize(&self, width: u32, height: u32) {
        let path = self.session_path("/window/rect");
        self.request(
            "POST",
            &path,
            Some(&json!({"width": width, "height": height})),
        );
    }

    /// A PNG of the element `css` selects, written to `path`.
    pub fn screenshot(&self, css: &str, path: &Path) {
        let shot = self.session_path(&format!("/element/{}/screenshot", self.element(css)));
        let encoded = self.request("GET", &shot, None);
        let png = base64_decode(encoded.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Closes the browser; a failure here must not hide the test's own.
            let path = self.session_path("");
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.request("DELETE", &path, None)
            }));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Reads one HTTP/1.1 response: its head, and its body by `Content-Length` or chunks
/// (chromedriver keeps connections open, so reading to the end would wait forever).
fn read_response(stream: &mut TcpStream) -> std::io::Result<(String, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut raw = Vec::new();
    let mut buffer = [0u8; 8192];
    let read_more = |stream: &mut TcpStream, raw: &mut Vec<u8>, buffer: &mut [u8]| {
        let n = stream.read(buffer)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-answer",
            ));
        }
        raw.extend_from_slice(&buffer[..n]);
        Ok(())
    };
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        read_more(stream, &mut raw, &mut buffer)?;
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let body_start = head_end + 4;
    if let Some(length) = length {
        while raw.len() < body_start + length {
            read_more(stream, &mut raw, &mut buffer)?;
        }
        let body = String::from_utf8_lossy(&raw[body_start..body_start + length]).into_owned();
        return Ok((head, body));
    }
    if lower.contains("transfer-encoding: chunked") {
        while !raw[body_start..].ends_with(b"0\r\n\r\n") {
            read_more(stream, &mut raw, &mut buffer)?;
        }
        return Ok((head, dechunk(&String::from_utf8_lossy(&raw[body_start..]))));
    }
    stream.read_to_end(&mut raw)?;
    Ok((
        head,
        String::from_utf8_lossy(&raw[body_start..]).into_owned(),
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

/// Standard base64 (WebDriver's screenshots).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut bits = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            bits |= value(c) << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_decodes_what_webdriver_sends() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}
