//! Helpers for tests that play a misbehaving peer: they send messages a correct node never
//! would. Not for production use.

use std::sync::Arc;

use exo_core::{Epoch, NodeId};

use crate::auth::Credential;
use crate::client::ShardClient;
use crate::error::Result;
use crate::pb;
use crate::types::{Limits, LinkOpen};

/// A hand-made activation frame of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct RawFrame {
    /// The request id.
    pub request_id: u64,
    /// The plan epoch of the link it is sent on.
    pub epoch: u64,
    /// `1`: f32, `2`: f16, `3`: bf16, `4`: q8; anything else is invalid.
    pub dtype: i32,
    /// The shape claimed.
    pub shape: Vec<u32>,
    /// The bytes sent.
    pub data: Vec<u8>,
}

/// Encodes activations as a frame would carry them (for benchmarks).
pub fn encode_frame(activations: &exo_core::Activations, dtype: crate::WireDtype) -> RawFrame {
    let t = crate::convert::encode_activations(activations, dtype);
    RawFrame {
        request_id: 0,
        epoch: 0,
        dtype: t.dtype,
        shape: t.shape,
        data: t.data,
    }
}

/// Checks and decodes a frame's activations as a node does (for benchmarks and tests).
pub fn decode_frame(frame: &RawFrame) -> Result<exo_core::Activations> {
    let t = pb::Tensor {
        dtype: frame.dtype,
        shape: frame.shape.clone(),
        data: frame.data.clone(),
    };
    crate::convert::decode_activations(&t, &Limits::default())
}

/// Opens a link to `endpoint` for the frame's epoch (as node `raw-peer`), sends `frame` as one
/// request's first step, closes the link, and returns how the node ended it.
pub async fn send_raw_frame(
    endpoint: &str,
    credential: Option<&Credential>,
    frame: RawFrame,
) -> Result<()> {
    let client = ShardClient::connect(endpoint, credential, Limits::default()).await?;
    let rows = frame.shape.first().copied().unwrap_or(0);
    let open = pb::LinkMessage {
        kind: Some(pb::link_message::Kind::Open(pb::LinkOpen {
            epoch: frame.epoch,
            from_node: "raw-peer".into(),
        })),
    };
    let frame = pb::LinkMessage {
        kind: Some(pb::link_message::Kind::Frame(pb::Frame {
            entries: vec![pb::Entry {
                request_id: frame.request_id,
                position: 0,
                rows,
                sample: true,
                start: Some(pb::RequestStart {
                    origin: "raw-peer".into(),
                    sampling: Some(crate::convert::sampling_to_pb(
                        &exo_core::SamplingParams::greedy(),
                    )),
                    positions: rows,
                    sampled: 0,
                    constraint: None,
                    generated: Vec::new(),
                    logprobs: false,
                    top_logprobs: 0,
                    embed: false,
                    prompt_logprobs: false,
                    prompt_top_logprobs: 0,
                    prompt: Vec::new(),
                    fork_parent: None,
                    fork_positions: 0,
                }),
                end: true,
            }],
            input: Some(pb::frame::Input::Hidden(pb::Tensor {
                dtype: frame.dtype,
                shape: frame.shape,
                data: frame.data,
            })),
        })),
    };
    let messages = tokio_stream::iter(vec![open, frame]);
    client
        .raw()
        .forward(messages)
        .await
        .map(|_| ())
        .map_err(|s| crate::Error::remote(endpoint, &s))
}

/// Opens a well-formed link as node `from` (for tests of what a stage does with it).
pub async fn open_link(
    endpoint: &str,
    credential: &Credential,
    epoch: Epoch,
    from: &str,
) -> Result<crate::LinkSender> {
    ShardClient::connect(endpoint, Some(credential), Limits::default())
        .await?
        .link(
            LinkOpen {
                epoch,
                from: NodeId::from(from),
            },
            crate::WireDtype::F32,
            Arc::default(),
        )
        .await
}

/// The kinds of message a peer can send this node, as a fuzzer names them.
pub const MESSAGE_KINDS: &[&str] = &[
    "link",
    "generate_request",
    "generate_event",
    "delivery",
    "assign_request",
    "assign_reply",
    "status_reply",
];

/// Decodes `bytes` as message kind `kind` (one of [`MESSAGE_KINDS`]) and runs every check and
/// conversion a handler's input passes, as a node does with what a peer sends. Returns whether
/// the message was accepted; it must never panic, whatever the bytes (for fuzzing).
pub fn accept_untrusted(kind: &str, bytes: &[u8]) -> bool {
    use prost::Message;
    let limits = Limits::default();
    match kind {
        "link" => match pb::LinkMessage::decode(bytes).map(|m| m.kind) {
            Ok(Some(pb::link_message::Kind::Open(open))) => LinkOpen::try_from(&open).is_ok(),
            Ok(Some(pb::link_message::Kind::Frame(frame))) => {
                crate::convert::frame_from_pb(&frame, &limits).is_ok()
            }
            _ => false,
        },
        "generate_request" => pb::GenerateRequest::decode(bytes)
            .ok()
            .is_some_and(|r| exo_core::GenerationRequest::try_from(r).is_ok()),
        "generate_event" => pb::GenerateEvent::decode(bytes)
            .ok()
            .is_some_and(|e| crate::convert::generation_item_from_pb(e).is_ok()),
        "delivery" => pb::Delivery::decode(bytes).ok().is_some_and(|d| {
            d.items
                .iter()
                .all(|item| exo_core::TokenOut::try_from(item).is_ok())
        }),
        "assign_request" => pb::AssignRequest::decode(bytes)
            .ok()
            .is_some_and(|a| crate::Assignment::try_from(a).is_ok()),
        "assign_reply" => pb::AssignReply::decode(bytes)
            .ok()
            .is_some_and(|a| crate::AssignReport::try_from(a).is_ok()),
        "status_reply" => pb::StatusReply::decode(bytes)
            .ok()
            .map(crate::NodeStatus::from)
            .is_some(),
        _ => false,
    }
}

/// Valid encodings of `kind` (one of [`MESSAGE_KINDS`]): a fuzzer's seeds.
pub fn sample_messages(kind: &str) -> Vec<Vec<u8>> {
    use exo_core::{
        Activations, GenerationEvent, GenerationRequest, LayerRange, OutputConstraint, Prompt,
        RequestId, RequestStart, SamplingParams, Stage, StepEntry, StepFrame, StepInput,
        TokenLogprob, TokenOut,
    };
    use prost::Message;
    let start = RequestStart {
        origin: NodeId::from("origin"),
        sampling: SamplingParams::greedy(),
        positions: 64,
        sampled: 0,
        constraint: Some(OutputConstraint::json_object()),
        penalties: exo_core::Penalties {
            presence: 0.5,
            frequency: 0.0,
            logit_bias: vec![(3, -1.0)],
        },
        logprobs: Some(2),
        generated: vec![4, 5],
        embed: false,
        prompt_logprobs: Some(1),
        prompt: vec![1, 2, 3],
        fork: Some(exo_core::Fork {
            parent: RequestId(3),
            positions: 9,
        }),
    };
    let mut entry = StepEntry::rows(RequestId(7), 0, 2, true);
    entry.start = Some(start);
    let hidden = |dtype| {
        let frame = StepFrame {
            entries: vec![entry.clone(), StepEntry::rows(RequestId(9), 4, 1, true)],
            input: StepInput::Hidden(Activations {
                rows: 3,
                hidden: 4,
                values: (0..12).map(|i| i as f32 * 0.25 - 1.0).collect(),
            }),
        };
        let message = pb::LinkMessage {
            kind: Some(pb::link_message::Kind::Frame(crate::convert::frame_to_pb(
                &frame, dtype,
            ))),
        };
        message.encode_to_vec()
    };
    match kind {
        "link" => {
            let open = pb::LinkMessage {
                kind: Some(pb::link_message::Kind::Open(pb::LinkOpen::from(
                    &LinkOpen {
                        epoch: Epoch::from_hash(5),
                        from: NodeId::from("peer"),
                    },
                ))),
            };
            let tokens = StepFrame {
                entries: vec![entry.clone()],
                input: StepInput::Tokens(vec![10, 11]),
            };
            let tokens = pb::LinkMessage {
                kind: Some(pb::link_message::Kind::Frame(crate::convert::frame_to_pb(
                    &tokens,
                    crate::WireDtype::F32,
                ))),
            };
            vec![
                open.encode_to_vec(),
                tokens.encode_to_vec(),
                hidden(crate::WireDtype::F32),
                hidden(crate::WireDtype::F16),
                hidden(crate::WireDtype::Q8),
            ]
        }
        "generate_request" => {
            let mut chat = GenerationRequest::new(Prompt::Chat(vec![exo_core::ChatMessage::new(
                "user", "Hi",
            )]));
            chat.constraint = Some(OutputConstraint::json_object());
            chat.logprobs = Some(3);
            let tokens = GenerationRequest {
                prompt_logprobs: Some(2),
                ..GenerationRequest::new(Prompt::Tokens(vec![1, 2, 3]))
            };
            [chat, tokens, GenerationRequest::embedding("text")]
                .iter()
                .map(|r| pb::GenerateRequest::from(r).encode_to_vec())
                .collect()
        }
        "generate_event" => {
            let text = |t: &str| exo_core::TokenText {
                token: t.into(),
                bytes: t.as_bytes().to_vec(),
                logprob: -1.0,
            };
            [
                Ok(GenerationEvent::Text("piece".into())),
                Ok(GenerationEvent::Logprob(exo_core::Logprob {
                    chosen: text("a"),
                    top: vec![text("b")],
                })),
                Ok(GenerationEvent::Embedding(vec![0.6, 0.8])),
                Ok(GenerationEvent::PromptLogprobs(exo_core::PromptLogprobs {
                    first: text("x"),
                    rest: vec![exo_core::Logprob {
                        chosen: text("y"),
                        top: Vec::new(),
                    }],
                })),
                Ok(GenerationEvent::Finished(exo_core::Finished {
                    reason: exo_core::FinishReason::Stop,
                    prompt_tokens: 3,
                    token_ids: vec![1, 2],
                    time_to_first_token_s: 0.1,
                    decode_s: 0.2,
                })),
                Err(exo_core::GenerationError::ContextExceeded {
                    prompt_tokens: 9,
                    max_tokens: 2,
                    context_length: 10,
                }),
            ]
            .iter()
            .map(|item| crate::convert::generation_item_to_pb(item).encode_to_vec())
            .collect()
        }
        "delivery" => {
            let items = [
                TokenOut::Token {
                    request: RequestId(1),
                    token: 5,
                    position: 3,
                    logprob: Some(TokenLogprob {
                        logprob: -0.5,
                        top: vec![(5, -0.5), (6, -1.5)],
                    }),
                },
                TokenOut::Embedding {
                    request: RequestId(2),
                    values: vec![1.0, 0.0],
                },
                TokenOut::PromptLogprobs {
                    request: RequestId(3),
                    position: 1,
                    entries: vec![TokenLogprob {
                        logprob: -2.0,
                        top: vec![(1, -0.1)],
                    }],
                },
                TokenOut::Failed {
                    request: RequestId(4),
                    failure: exo_core::StageFailure {
                        node: NodeId::from("n"),
                        stage: 1,
                        layers: LayerRange::new(2, 4),
                        epoch: Epoch::from_hash(3),
                        kind: exo_core::FailureKind::Lost,
                        reason: "gone".into(),
                    },
                },
            ];
            let delivery = pb::Delivery {
                subscribed: false,
                items: items.iter().map(pb::TokenOut::from).collect(),
            };
            vec![delivery.encode_to_vec()]
        }
        "assign_request" => {
            let stage = |node: &str, start, end| Stage {
                node: NodeId::from(node),
                endpoint: format!("http://127.0.0.1:1{start}"),
                layers: LayerRange::new(start, end),
            };
            let assignment = crate::Assignment {
                model: "m.gguf".into(),
                epoch: Epoch::from_hash(9),
                stages: vec![stage("a", 0, 2), stage("b", 2, 4)],
            };
            vec![pb::AssignRequest::from(&assignment).encode_to_vec()]
        }
        "assign_reply" => {
            let report = crate::AssignReport {
                epoch: Epoch::from_hash(9),
                layers: LayerRange::new(0, 2),
                weight_bytes: 1 << 20,
                load_seconds: 0.5,
            };
            vec![pb::AssignReply::from(&report).encode_to_vec()]
        }
        "status_reply" => {
            let status = crate::NodeStatus {
                node_id: "n".into(),
                model: "m".into(),
                epoch: Some(Epoch::from_hash(2)),
                layers: LayerRange::new(0, 4),
                ready: true,
                active_requests: 2,
                ..Default::default()
            };
            vec![pb::StatusReply::from(&status).encode_to_vec()]
        }
        _ => Vec::new(),
    }
}

/// Whether `haystack` holds `needle` anywhere (for tests that look for secrets in bytes).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `ids` as protobuf writes a packed repeated integer field's values (LEB128 varints): what a
/// frame of token ids carries on the wire.
pub fn packed_varints(ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &id in ids {
        let mut v = id;
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out
}
