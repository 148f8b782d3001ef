//! The shard service over loopback with a toy handler: credentials, frame checks, streaming,
//! and a server that keeps serving after bad calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use exo_transport::testing::{RawFrame, send_raw_frame};
use exo_transport::{
    Activations, AssignReport, Assignment, Code, Credential, Error, FinishReason, Finished,
    GenerateCall, GenerateEvent, Limits, NodeStatus, Prompt, RequestOpen, SamplingSpec,
    ShardClient, ShardHandler, StageSession, Step, StepInput, TokenReply, WireDtype,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// A "last stage" whose token is the number of positions it has seen times 10 plus the rounded
/// first value of the step.
#[derive(Default)]
struct Toy {
    open_sessions: Arc<AtomicUsize>,
}

struct ToySession {
    seen: u32,
    open: Arc<AtomicUsize>,
}

impl Drop for ToySession {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StageSession for ToySession {
    fn step(&mut self, step: Step) -> BoxFuture<'_, exo_transport::Result<Option<TokenReply>>> {
        Box::pin(async move {
            if step.position != self.seen {
                return Err(Error::invalid(format!(
                    "position {} but {} seen",
                    step.position, self.seen
                )));
            }
            let first = match &step.input {
                StepInput::Tokens(t) => t[0] as f32,
                StepInput::Hidden(a) => a.values[0],
            };
            self.seen += step.input.positions() as u32;
            Ok(step.sample.then(|| TokenReply {
                token: self.seen * 10 + first.round() as u32,
                position: self.seen,
            }))
        })
    }
}

impl ShardHandler for Toy {
    fn assign(&self, a: Assignment) -> BoxFuture<'_, exo_transport::Result<AssignReport>> {
        Box::pin(async move {
            Ok(AssignReport {
                epoch: a.epoch,
                layers: a.stages[0].layers.clone(),
                weight_bytes: 1,
                load_seconds: 0.0,
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, NodeStatus> {
        Box::pin(async move {
            NodeStatus {
                node_id: "toy".into(),
                active_requests: self.open_sessions.load(Ordering::SeqCst) as u32,
                ..NodeStatus::default()
            }
        })
    }

    fn open(
        &self,
        open: RequestOpen,
    ) -> BoxFuture<'_, exo_transport::Result<Box<dyn StageSession>>> {
        Box::pin(async move {
            if open.epoch != 7 {
                return Err(Error::service(Code::FailedPrecondition, "wrong epoch"));
            }
            self.open_sessions.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(ToySession {
                seen: 0,
                open: Arc::clone(&self.open_sessions),
            }) as Box<dyn StageSession>)
        })
    }

    fn generate(
        &self,
        call: GenerateCall,
    ) -> BoxFuture<'_, exo_transport::Result<mpsc::Receiver<exo_transport::Result<GenerateEvent>>>>
    {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            let Prompt::Text(text) = call.prompt else {
                return Err(Error::invalid("text only"));
            };
            tokio::spawn(async move {
                for word in text.split(' ') {
                    let _ = tx.send(Ok(GenerateEvent::Text(word.to_owned()))).await;
                }
                let _ = tx
                    .send(Ok(GenerateEvent::Finished(Finished {
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

fn open(id: &str) -> RequestOpen {
    RequestOpen {
        request_id: id.into(),
        epoch: 7,
        sampling: SamplingSpec::default(),
    }
}

#[tokio::test]
async fn steps_stream_through_and_sessions_end_with_their_stream() {
    let (endpoint, credential, toy, _stop) = start().await;
    let client = ShardClient::connect(&endpoint, Some(&credential), Limits::default())
        .await
        .unwrap();
    let counters = Arc::new(Default::default());
    let mut session = client
        .open(open("a"), WireDtype::F16, counters)
        .await
        .unwrap();
    session
        .send(&Step {
            position: 0,
            input: StepInput::Tokens(vec![3, 4, 5]),
            sample: false,
        })
        .await
        .unwrap();
    let hidden = Activations {
        positions: 1,
        hidden: 4,
        values: vec![2.0, 0.0, 0.0, 0.0],
    };
    session
        .send(&Step {
            position: 3,
            input: StepInput::Hidden(hidden),
            sample: true,
        })
        .await
        .unwrap();
    assert_eq!(
        session.next_token().await.unwrap(),
        TokenReply {
            token: 42,
            position: 4
        }
    );
    assert_eq!(client.status().await.unwrap().active_requests, 1);
    drop(session);
    for _ in 0..100 {
        if toy.open_sessions.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        toy.open_sessions.load(Ordering::SeqCst),
        0,
        "session freed when the stream closed"
    );

    let mut events = client
        .generate(&GenerateCall {
            model: String::new(),
            prompt: Prompt::Text("a b".into()),
            max_tokens: None,
            sampling: SamplingSpec::default(),
            stop: vec![],
            ignore_eos: false,
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(e) = events.next().await.unwrap() {
        got.push(e);
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], GenerateEvent::Text("a".into()));
}

#[tokio::test]
async fn calls_without_the_credential_are_refused() {
    let (endpoint, credential, _toy, _stop) = start().await;
    let frame = RawFrame {
        request_id: "r".into(),
        epoch: 7,
        dtype: 1,
        shape: vec![1, 1],
        data: 1f32.to_le_bytes().to_vec(),
    };
    let e = send_raw_frame(&endpoint, None, frame.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let other = Credential::new([8; 32]);
    let e = send_raw_frame(&endpoint, Some(&other), frame.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.to_string().contains("cluster"), "{e}");
    let client = ShardClient::connect(&endpoint, None, Limits::default())
        .await
        .unwrap();
    assert_eq!(
        client.status().await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // The right credential still works.
    assert_eq!(
        send_raw_frame(&endpoint, Some(&credential), frame)
            .await
            .unwrap(),
        11
    );
}

#[tokio::test]
async fn malformed_frames_get_invalid_argument_and_the_server_keeps_serving() {
    let (endpoint, credential, _toy, _stop) = start().await;
    let bad = [
        RawFrame {
            request_id: "r".into(),
            epoch: 7,
            dtype: 2,
            shape: vec![1, 4],
            data: vec![0; 7],
        },
        RawFrame {
            request_id: "r".into(),
            epoch: 7,
            dtype: 9,
            shape: vec![1, 4],
            data: vec![0; 8],
        },
        RawFrame {
            request_id: "r".into(),
            epoch: 7,
            dtype: 1,
            shape: vec![4],
            data: vec![0; 16],
        },
        RawFrame {
            request_id: String::new(),
            epoch: 7,
            dtype: 1,
            shape: vec![1, 1],
            data: vec![0; 4],
        },
        RawFrame {
            request_id: "r".into(),
            epoch: 0,
            dtype: 1,
            shape: vec![1, 1],
            data: vec![0; 4],
        },
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
        RawFrame {
            request_id: "r".into(),
            epoch: 3,
            dtype: 1,
            shape: vec![1, 1],
            data: vec![0; 4],
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let good = RawFrame {
        request_id: "r".into(),
        epoch: 7,
        dtype: 1,
        shape: vec![1, 1],
        data: 5f32.to_le_bytes().to_vec(),
    };
    assert_eq!(
        send_raw_frame(&endpoint, Some(&credential), good)
            .await
            .unwrap(),
        15
    );
}

#[tokio::test]
async fn a_server_that_goes_away_fails_the_stream() {
    let (endpoint, credential, _toy, stop) = start().await;
    let client = ShardClient::connect(&endpoint, Some(&credential), Limits::default())
        .await
        .unwrap();
    let mut session = client
        .open(open("a"), WireDtype::F16, Arc::new(Default::default()))
        .await
        .unwrap();
    session
        .send(&Step {
            position: 0,
            input: StepInput::Tokens(vec![1]),
            sample: true,
        })
        .await
        .unwrap();
    session.next_token().await.unwrap();
    drop(stop);
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        session
            .send(&Step {
                position: 1,
                input: StepInput::Tokens(vec![1]),
                sample: true,
            })
            .await?;
        session.next_token().await
    })
    .await
    .expect("no hang");
    // Graceful shutdown lets the open stream finish its step or fails it; either way no hang.
    let _ = outcome;
    let e = ShardClient::connect(&endpoint, Some(&credential), Limits::default()).await;
    if let Ok(c) = e {
        assert!(c.status().await.is_err());
    }
}
