//! What a passive observer of the network between the nodes sees: a packet capture of
//! loopback (a raw packet socket, as tcpdump opens) while two nodes answer chats, completions
//! given as token ids, and a `Generate` call from the command line. The shard service (TLS
//! 1.3) and membership (Noise under the pre-shared key) must show neither a prompt's text nor
//! its token ids nor any secret; the HTTP API on loopback, plain by design, shows the prompt,
//! which proves the capture sees what crosses.
//!
//! Then what the API and the web page show: no secret and no file path.
//!
//! Needs CAP_NET_RAW (CI runs as root); without it the test says so and checks nothing.
//! Runs the real default model: run with `--release` (as CI does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use exo_transport::Credential;
use exo_transport::testing::{contains, packed_varints};

mod common;

use common::{KEY, exo_node, http, start_cluster};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

const PROMPT: &str = "Remember the launch code tangerine-4471 and tell nobody.";

/// Token ids sent as a completion's prompt (each a 2-byte varint on the wire).
const IDS: [u32; 9] = [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000];

/// A TCP segment seen on loopback.
struct Segment {
    source: u16,
    destination: u16,
    payload: Vec<u8>,
}

/// A capture of IPv4 packets on `lo` until stopped.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Segment>>,
}

impl Capture {
    /// Starts capturing; `None` without the right to open a packet socket.
    fn start() -> Option<Capture> {
        let eth_p_ip = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket calls on a descriptor this function owns; every pointer passed
        // is to a live local of the size given.
        let fd = unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(eth_p_ip));
            if fd < 0 {
                return None;
            }
            let mut address: libc::sockaddr_ll = std::mem::zeroed();
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = eth_p_ip;
            address.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
            let bound = libc::bind(
                fd,
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(bound, 0, "binding the capture to lo");
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let buffer: i32 = 64 << 20;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const buffer).cast(),
                std::mem::size_of::<i32>() as u32,
            );
            fd
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut segments = Vec::new();
            let mut packet = vec![0u8; 1 << 17];
            // Bounded: stops when told, or after 10 minutes.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
            while !stopping.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                // SAFETY: reads at most `packet.len()` bytes into `packet`.
                let n = unsafe { libc::recv(fd, packet.as_mut_ptr().cast(), packet.len(), 0) };
                if n > 0
                    && let Some(segment) = tcp_segment(&packet[..n as usize])
                {
                    segments.push(segment);
                }
            }
            // SAFETY: the descriptor is this thread's and closed once.
            unsafe { libc::close(fd) };
            segments
        });
        Some(Capture { stop, thread })
    }

    fn finish(self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The TCP segment in an IPv4 packet, if it is one.
fn tcp_segment(packet: &[u8]) -> Option<Segment> {
    let ip_header = usize::from(packet.first()? & 0x0f) * 4;
    if *packet.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let tcp = packet.get(ip_header..total.min(packet.len()))?;
    let port = |at: usize| Some(u16::from_be_bytes([*tcp.get(at)?, *tcp.get(at + 1)?]));
    let tcp_header = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        source: port(0)?,
        destination: port(2)?,
        payload: tcp.get(tcp_header..)?.to_vec(),
    })
}

fn port_of(address: &str) -> u16 {
    let tail = address
        .trim_end_matches("/v1")
        .rsplit([':', '/'])
        .next()
        .unwrap();
    tail.parse()
        .unwrap_or_else(|_| panic!("no port in {address}"))
}

/// Everything sent to or from any of `ports`, in capture order.
fn bytes_of(segments: &[Segment], ports: &HashSet<u16>) -> Vec<u8> {
    segments
        .iter()
        .filter(|s| ports.contains(&s.source) || ports.contains(&s.destination))
        .flat_map(|s| s.payload.iter().copied())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_capture_between_the_nodes_shows_no_prompt_no_token_ids_and_no_secret() {
    let cluster = start_cluster(2, "120MiB", &[]);
    let Some(capture) = Capture::start() else {
        eprintln!("skipped: opening a packet socket needs CAP_NET_RAW (run as root, as CI does)");
        return;
    };

    // Through each node (one of them is not the first stage, so the prompt crosses to it): a
    // chat, a completion whose prompt is token ids, and a command-line Generate call.
    for node in &cluster.nodes {
        let chat = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8,
            "temperature": 0,
        });
        let (status, body) = http(
            &node.api,
            "POST",
            "/v1/chat/completions",
            Some(&chat.to_string()),
        );
        assert_eq!(status, 200, "{body}");
        let completion =
            serde_json::json!({"model": MODEL, "prompt": IDS, "max_tokens": 8, "temperature": 0});
        let (status, body) = http(
            &node.api,
            "POST",
            "/v1/completions",
            Some(&completion.to_string()),
        );
        assert_eq!(status, 200, "{body}");
        let out = exo_node()
            .args(["generate", PROMPT, "--max-tokens", "8"])
            .args(["--cluster-key", KEY, "--node", &node.grpc])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let segments = capture.finish();

    let api: HashSet<u16> = cluster.nodes.iter().map(|n| port_of(&n.api)).collect();
    let between: HashSet<u16> = cluster
        .nodes
        .iter()
        .flat_map(|n| [port_of(&n.grpc), port_of(&n.membership)])
        .collect();
    let api_bytes = bytes_of(&segments, &api);
    let wire = bytes_of(&segments, &between);
    eprintln!(
        "captured {} segments: {} bytes to and from the APIs, {} between the nodes and the \
         command line",
        segments.len(),
        api_bytes.len(),
        wire.len()
    );
    // The capture sees what crosses in clear: the API's request bodies.
    assert!(
        contains(&api_bytes, PROMPT.as_bytes()),
        "the capture missed the API's plain text"
    );
    // Activations of every request crossed between the nodes (some 1.1 KiB per position).
    assert!(
        wire.len() > 50_000,
        "only {} bytes between the nodes",
        wire.len()
    );

    let key = exo_topology::ClusterKey::parse(KEY, "test").unwrap();
    let credential = key.derive(Credential::PURPOSE);
    let secrets: [(&str, Vec<u8>); 6] = [
        ("the prompt", PROMPT.as_bytes().to_vec()),
        ("a word of the prompt", b"tangerine".to_vec()),
        ("the prompt's token ids", packed_varints(&IDS)),
        ("the cluster key as typed", KEY.as_bytes().to_vec()),
        ("the credential", credential.to_vec()),
        ("the credential in hex", hex(&credential).into_bytes()),
    ];
    for (what, bytes) in &secrets {
        assert!(
            !contains(&wire, bytes),
            "{what} crossed between the nodes in clear"
        );
    }

    // What the API and the web page show anyone who can reach them: no secret, no file path
    // (the model's name, not where it lies; not the node's home with its keys).
    let model_dir = common::default_model()
        .parent()
        .unwrap()
        .display()
        .to_string();
    let show = serde_json::json!({"model": MODEL}).to_string();
    for node in &cluster.nodes {
        let home = node.home().display().to_string();
        for (method, path, body) in [
            ("GET", "/v1/cluster", None),
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("GET", "/health", None),
            ("GET", "/readyz", None),
            ("GET", "/openapi.json", None),
            ("GET", "/", None),
            ("GET", "/api/tags", None),
            ("GET", "/api/ps", None),
            ("POST", "/api/show", Some(show.as_str())),
        ] {
            let (status, text) = http(&node.api, method, path, body);
            assert!(status < 500, "{path}: {status} {text}");
            for (what, bytes) in &secrets[3..] {
                assert!(!contains(text.as_bytes(), bytes), "{path} shows {what}");
            }
            assert!(
                !text.contains(&home),
                "{path} shows the node's home {home}: {text}"
            );
            assert!(
                !text.contains(&model_dir),
                "{path} shows where the model lies: {text}"
            );
        }
    }
}
