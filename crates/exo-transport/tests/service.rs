//! The shard service over loopback with a toy handler: TLS with the cluster's certificates (a
//! device without the key calls nothing, a recording shows nothing and replays to nothing),
//! links carrying frames of
//! several requests, deliveries straight to the subscribed origin, typed generation errors,
//! message checks, and a server that keeps serving after bad calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exo_core::{
    Activations, Epoch, FinishReason, Finished, GenerationError, GenerationEvent,
    GenerationRequest, NodeId, Prompt, RequestId, RequestStart, SamplingParams, StepEntry,
    StepFrame, StepInput, TokenOut,
};
use exo_transport::testing::{RawFrame, contains, open_link, packed_varints, send_raw_frame};
use exo_transport::{
    AssignReport, Assignment, Code, Credential, Error, FrameSink, GenerationItems, Limits,
    LinkOpen, NodeStatus, ShardClient, ShardHandler, WireDtype,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

const EPOCH: u64 = 7;

/// A "last stage": after each sampled entry it delivers, to the request's origin, the token
/// `position_after * 10 + round(first value)`.
#[derive(Default)]
struct Toy {
    /// Calls that reached the handler.
    calls: AtomicUsize,
    open_links: Arc<AtomicUsize>,
    origins: Arc<Mutex<HashMap<NodeId, mpsc::UnboundedSender<Vec<TokenOut>>>>>,
}

struct ToySink {
    open: Arc<AtomicUsize>,
    origins: Arc<Mutex<HashMap<NodeId, mpsc::UnboundedSender<Vec<TokenOut>>>>>,
    request_origin: HashMap<RequestId, NodeId>,
}

impl Drop for ToySink {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FrameSink for ToySink {
    fn send(&mut self, frame: StepFrame) -> BoxFuture<'_, exo_transport::Result<()>> {
        Box::pin(async move {
            let mut row = 0usize;
            for e in &frame.entries {
                if let Some(start) = &e.start {
                    self.request_origin.insert(e.request, start.origin.clone());
                }
                let first = match &frame.input {
                    StepInput::Tokens(t) => t.get(row).map_or(0.0, |&t| t as f32),
                    StepInput::Hidden(a) => a.values.get(row * a.hidden).copied().unwrap_or(0.0),
                };
                row += e.rows as usize;
                if !e.sample {
                    continue;
                }
                let origin = self
                    .request_origin
                    .get(&e.request)
                    .cloned()
                    .ok_or_else(|| {
                        Error::invalid(format!("request {} never started", e.request))
                    })?;
                let sink = self.origins.lock().unwrap().get(&origin).cloned();
                let position = e.position + e.rows;
                let out = TokenOut::Token {
                    logprob: None,
                    request: e.request,
                    token: position * 10 + first.round() as u32,
                    position,
                };
                if let Some(sink) = sink {
                    let _ = sink.send(vec![out]);
                }
            }
            Ok(())
        })
    }
}

impl ShardHandler for Toy {
    fn assign(&self, a: Assignment) -> BoxFuture<'_, exo_transport::Result<AssignReport>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(AssignReport {
                epoch: a.epoch,
                layers: a.stages[0].layers,
                weight_bytes: 1,
                load_seconds: 0.0,
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, NodeStatus> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            NodeStatus {
                node_id: "toy".into(),
                active_requests: self.open_links.load(Ordering::SeqCst) as u32,
                ..NodeStatus::default()
            }
        })
    }

    fn open_link(
        &self,
        open: LinkOpen,
    ) -> BoxFuture<'_, exo_transport::Result<Box<dyn FrameSink>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if open.epoch.get() != EPOCH {
                return Err(Error::service(Code::FailedPrecondition, "wrong epoch"));
            }
            self.open_links.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(ToySink {
                open: Arc::clone(&self.open_links),
                origins: Arc::clone(&self.origins),
                request_origin: HashMap::new(),
            }) as Box<dyn FrameSink>)
        })
    }

    fn deliveries(
        &self,
        epoch: Epoch,
        origin: NodeId,
    ) -> BoxFuture<'_, exo_transport::Result<mpsc::UnboundedReceiver<Vec<TokenOut>>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if epoch.get() != EPOCH {
                return Err(Error::service(Code::FailedPrecondition, "wrong epoch"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            self.origins.lock().unwrap().insert(origin, tx);
            Ok(rx)
        })
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<GenerationItems, GenerationError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let Prompt::Text(text) = request.prompt else {
                return Err(GenerationError::invalid("messages", "text only"));
            };
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                for word in text.split(' ') {
                    if word == "fail" {
                        let _ = tx.send(Err(GenerationError::Busy)).await;
                        return;
                    }
                    let _ = tx.send(Ok(GenerationEvent::Text(word.to_owned()))).await;
                }
                let _ = tx
                    .send(Ok(GenerationEvent::Finished(Finished {
                        reason: FinishReason::Stop,
                        prompt_tokens: 1,
                        token_ids: vec![1, 2],
                        time_to_first_token_s: 0.0,
                        decode_s: 0.0,
                    })))
                    .await;
            });
            Ok(rx)
        })
    }
}

async fn start() -> (
    String,
    Credential,
    Arc<Toy>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let credential = Credential::new([7; 32]);
    let toy = Arc::new(Toy::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handler: Arc<dyn ShardHandler> = toy.clone();
    tokio::spawn(exo_transport::serve(
        listener,
        handler,
        credential.clone(),
        Limits::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    (endpoint, credential, toy, stop)
}

fn epoch() -> Epoch {
    Epoch::new(EPOCH).unwrap()
}

fn started(request: u64, position: u32, rows: u32) -> StepEntry {
    let mut e = StepEntry::rows(RequestId(request), position, rows, true);
    e.start = Some(RequestStart {
        logprobs: None,
        penalties: Default::default(),
        constraint: None,
        generated: Vec::new(),
        embed: false,
        prompt_logprobs: None,
        prompt: Vec::new(),
        origin: NodeId::from("origin-a"),
        sampling: SamplingParams::greedy(),
        positions: 64,
        sampled: 0,
        fork: None,
    });
    e
}

async fn wait_for_links(toy: &Toy, n: usize) {
    for _ in 0..200 {
        if toy.open_links.load(Ordering::SeqCst) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} links open, expected {n}",
        toy.open_links.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn frames_of_several_requests_go_through_one_link_and_tokens_reach_the_origin() {
    let (endpoint, credential, toy, _stop) = start().await;
    let client = ShardClient::connect(&endpoint, Some(&credential), Limits::default())
        .await
        .unwrap();
    let mut deliveries = client
        .deliveries(epoch(), &NodeId::from("origin-a"))
        .await
        .unwrap();
    let counters = Arc::new(exo_transport::SentCounters::default());
    let mut link = client
        .link(
            LinkOpen {
                epoch: epoch(),
                from: NodeId::from("origin-a"),
            },
            WireDtype::F16,
            Arc::clone(&counters),
        )
        .await
        .unwrap();
    // Two requests in one frame of activations: rows 0-1 belong to request 1, row 2 to 2.
    let frame = StepFrame {
        entries: vec![started(1, 0, 2), started(2, 0, 1)],
        input: StepInput::Hidden(Activations {
            rows: 3,
            hidden: 2,
            values: vec![3.0, 0.0, 9.0, 0.0, 4.0, 0.0],
        }),
    };
    link.send(&frame).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(deliveries.next().await.unwrap().unwrap());
    }
    assert_eq!(
        got,
        vec![
            TokenOut::Token {
                logprob: None,
                request: RequestId(1),
                token: 23,
                position: 2
            },
            TokenOut::Token {
                logprob: None,
                request: RequestId(2),
                token: 14,
                position: 1
            },
        ]
    );
    // f16 on the wire: 2 bytes a value.
    assert_eq!(counters.bytes.load(Ordering::Relaxed), 12);
    assert_eq!(counters.positions.load(Ordering::Relaxed), 3);
    wait_for_links(&toy, 1).await;

    // Token ids work the same; a frame that only ends requests carries no rows.
    let frame = StepFrame {
        entries: vec![StepEntry::rows(RequestId(1), 2, 1, true)],
        input: StepInput::Tokens(vec![5]),
    };
    link.send(&frame).await.unwrap();
    let got = deliveries.next().await.unwrap().unwrap();
    assert_eq!(
        got,
        vec![TokenOut::Token {
            logprob: None,
            request: RequestId(1),
            token: 35,
            position: 3
        }]
    );
    link.send(&StepFrame {
        entries: vec![StepEntry::end(RequestId(1)), StepEntry::end(RequestId(2))],
        input: StepInput::Tokens(Vec::new()),
    })
    .await
    .unwrap();

    // Dropping the sender closes the link cleanly: the stage's sink is dropped.
    let ended = link.ended();
    drop(link);
    tokio::time::timeout(Duration::from_secs(5), ended.wait())
        .await
        .unwrap()
        .unwrap();
    wait_for_links(&toy, 0).await;
}

#[tokio::test]
async fn generation_failures_arrive_as_typed_data() {
    let (endpoint, credential, _toy, _stop) = start().await;
    let client = ShardClient::connect(&endpoint, Some(&credential), Limits::default())
        .await
        .unwrap();
    let mut events = client
        .generate(&GenerationRequest::new(Prompt::Text("a b".into())))
        .await
        .unwrap();
    let mut items = Vec::new();
    while let Some(item) = events.next().await.unwrap() {
        items.push(item);
    }
    assert_eq!(items.len(), 3);
    assert_eq!(items[0], Ok(GenerationEvent::Text("a".into())));
    assert!(matches!(items[2], Ok(GenerationEvent::Finished(_))));

    let mut events = client
        .generate(&GenerationRequest::new(Prompt::Text("a fail".into())))
        .await
        .unwrap();
    assert_eq!(
        events.next().await.unwrap(),
        Some(Ok(GenerationEvent::Text("a".into())))
    );
    assert_eq!(
        events.next().await.unwrap(),
        Some(Err(GenerationError::Busy))
    );
    assert_eq!(events.next().await.unwrap(), None);

    // A refusal before anything runs is the stream's only item.
    let mut events = client
        .generate(&GenerationRequest::new(Prompt::Chat(vec![])))
        .await
        .unwrap();
    assert_eq!(
        events.next().await.unwrap(),
        Some(Err(GenerationError::invalid("messages", "text only")))
    );
}

fn raw(epoch: u64, dtype: i32, shape: Vec<u32>, data: Vec<u8>) -> RawFrame {
    RawFrame {
        request_id: 1,
        epoch,
        dtype,
        shape,
        data,
    }
}

#[tokio::test]
async fn a_device_without_the_cluster_key_can_call_nothing() {
    let (endpoint, credential, toy, _stop) = start().await;
    let frame = raw(EPOCH, 1, vec![1, 1], 1f32.to_le_bytes().to_vec());
    // Plain HTTP/2, no TLS: the server closes the connection in its handshake.
    let e = send_raw_frame(&endpoint, None, frame.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    if let Ok(plain) = ShardClient::connect(&endpoint, None, Limits::default()).await {
        assert!(plain.status().await.is_err());
        assert!(plain.deliveries(epoch(), &NodeId::from("x")).await.is_err());
    }
    // TLS with another cluster's certificate: the client finds the node is not of its
    // cluster, and the node would have refused the client's certificate too.
    let other = Credential::new([8; 32]);
    let e = ShardClient::connect(&endpoint, Some(&other), Limits::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.to_string().contains("not of this cluster"), "{e}");
    let e = send_raw_frame(&endpoint, Some(&other), frame.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert_eq!(
        toy.calls.load(Ordering::SeqCst),
        0,
        "a call reached the node"
    );
    // The right credential still works.
    send_raw_frame(&endpoint, Some(&credential), frame)
        .await
        .unwrap();
    assert!(toy.calls.load(Ordering::SeqCst) > 0);
}

/// A TCP relay to `target` that records what each side sent: (endpoint, client to server,
/// server to client).
async fn recording_relay(target: &str) -> (String, Arc<Mutex<Vec<u8>>>, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = target.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (up, down) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let (up_log, down_log) = (Arc::clone(&up), Arc::clone(&down));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            let log = Arc::clone(&up_log);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if server_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let log = Arc::clone(&down_log);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n @ 1..) = server_rx.read(&mut buf).await {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (endpoint, up, down)
}

#[tokio::test]
async fn a_recorded_session_shows_nothing_and_replayed_it_calls_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (endpoint, credential, toy, _stop) = start().await;
    let (relayed, up, down) = recording_relay(&endpoint).await;
    const PROMPT: &str = "the launch code is tangerine-4471";
    let ids = [31337u32, 27182, 16180, 14142, 17320, 22360, 26457, 30000];

    // A session through the relay: a status call, a link carrying token ids, a generation.
    let client = ShardClient::connect(&relayed, Some(&credential), Limits::default())
        .await
        .unwrap();
    client.status().await.unwrap();
    let mut deliveries = client
        .deliveries(epoch(), &NodeId::from("origin-a"))
        .await
        .unwrap();
    let mut link = open_link(&relayed, &credential, epoch(), "origin-a")
        .await
        .unwrap();
    let frame = StepFrame {
        entries: vec![started(1, 0, ids.len() as u32)],
        input: StepInput::Tokens(ids.to_vec()),
    };
    link.send(&frame).await.unwrap();
    assert!(deliveries.next().await.unwrap().is_some());
    let mut events = client
        .generate(&GenerationRequest::new(Prompt::Text(PROMPT.into())))
        .await
        .unwrap();
    while events.next().await.unwrap().is_some() {}
    drop((link, deliveries, events, client));
    let calls = toy.calls.load(Ordering::SeqCst);
    assert!(calls >= 4, "{calls} calls");

    // What a passive observer of the link saw: neither the prompt, nor the token ids, nor the
    // credential (raw, or as the hex of the bearer header the service once sent).
    let recorded = [up.lock().unwrap().clone(), down.lock().unwrap().clone()];
    let secret_hex: String = [7u8; 32].iter().map(|b| format!("{b:02x}")).collect();
    for (side, bytes) in ["client to node", "node to client"].iter().zip(&recorded) {
        assert!(
            bytes.len() > 1000,
            "{side}: only {} bytes recorded",
            bytes.len()
        );
        assert!(
            !contains(bytes, PROMPT.as_bytes()),
            "{side}: the prompt in clear"
        );
        assert!(
            !contains(bytes, b"tangerine"),
            "{side}: the prompt in clear"
        );
        assert!(
            !contains(bytes, &packed_varints(&ids)),
            "{side}: the token ids in clear"
        );
        assert!(!contains(bytes, &[7u8; 32]), "{side}: the credential");
        assert!(
            !contains(bytes, secret_hex.as_bytes()),
            "{side}: the credential"
        );
        assert!(
            !contains(bytes, b"authorization"),
            "{side}: a bearer header"
        );
    }

    // The client's half replayed to the node: its handshake cannot complete (fresh keys on
    // the node's side), the connection closes, and no call reaches the node.
    let mut replay = tokio::net::TcpStream::connect(endpoint.trim_start_matches("http://"))
        .await
        .unwrap();
    let _ = replay.write_all(&recorded[0]).await;
    let mut buf = vec![0u8; 65536];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match replay.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the node kept a replayed session open");
    assert_eq!(
        toy.calls.load(Ordering::SeqCst),
        calls,
        "a replayed call ran"
    );
}

#[tokio::test]
async fn malformed_frames_get_invalid_argument_and_the_server_keeps_serving() {
    let (endpoint, credential, _toy, _stop) = start().await;
    let bad = [
        raw(EPOCH, 2, vec![1, 4], vec![0; 7]),
        raw(EPOCH, 9, vec![1, 4], vec![0; 8]),
        raw(EPOCH, 1, vec![4], vec![0; 16]),
        raw(EPOCH, 1, vec![1, 1], f32::NAN.to_le_bytes().to_vec()),
        raw(0, 1, vec![1, 1], vec![0; 4]),
    ];
    for frame in bad {
        let e = send_raw_frame(&endpoint, Some(&credential), frame.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{frame:?}: {e}");
    }
    let e = send_raw_frame(
        &endpoint,
        Some(&credential),
        raw(3, 1, vec![1, 1], vec![0; 4]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    send_raw_frame(
        &endpoint,
        Some(&credential),
        raw(EPOCH, 1, vec![1, 1], vec![0; 4]),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_server_that_goes_away_ends_links_and_deliveries_without_hanging() {
    let (endpoint, credential, _toy, stop) = start().await;
    let client = ShardClient::connect(&endpoint, Some(&credential), Limits::default())
        .await
        .unwrap();
    let mut deliveries = client
        .deliveries(epoch(), &NodeId::from("origin-a"))
        .await
        .unwrap();
    let link = open_link(&endpoint, &credential, epoch(), "origin-a")
        .await
        .unwrap();
    let ended = link.ended();
    drop(stop);
    tokio::time::timeout(Duration::from_secs(10), async {
        // Either the stream ends or fails; it must not hang.
        let _ = deliveries.next().await;
        drop(link);
        let _ = ended.wait().await;
    })
    .await
    .expect("no hang");
}
