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
