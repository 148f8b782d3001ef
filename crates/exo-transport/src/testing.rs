//! Helpers for tests that play a misbehaving peer: they send frames a correct client never
//! would. Not for production use.

use crate::auth::Credential;
use crate::client::ShardClient;
use crate::error::Result;
use crate::pb;
use crate::types::{Limits, SamplingSpec};

/// A hand-made activation frame.
#[derive(Clone, Debug, PartialEq)]
pub struct RawFrame {
    /// The request id.
    pub request_id: String,
    /// The plan epoch.
    pub epoch: u64,
    /// `1`: f32, `2`: f16, `3`: bf16; anything else is invalid.
    pub dtype: i32,
    /// The shape claimed.
    pub shape: Vec<u32>,
    /// The bytes sent.
    pub data: Vec<u8>,
}

/// Encodes activations as a frame would carry them (for benchmarks).
pub fn encode_frame(activations: &crate::Activations, dtype: crate::WireDtype) -> RawFrame {
    let t = crate::convert::encode_activations(activations, dtype);
    RawFrame {
        request_id: String::new(),
        epoch: 0,
        dtype: t.dtype,
        shape: t.shape,
        data: t.data,
    }
}

/// Checks and decodes a frame's activations as a node does (for benchmarks and tests).
pub fn decode_frame(frame: &RawFrame) -> Result<crate::Activations> {
    let t = pb::Tensor {
        dtype: frame.dtype,
        shape: frame.shape.clone(),
        data: frame.data.clone(),
    };
    crate::convert::decode_activations(&t, &Limits::default())
}

/// Opens a forward stream to `endpoint`, sends `frame` as its first frame, and returns what
/// the node answers: its first reply's token, or its error.
pub async fn send_raw_frame(
    endpoint: &str,
    credential: Option<&Credential>,
    frame: RawFrame,
) -> Result<u32> {
    let client = ShardClient::connect(endpoint, credential, Limits::default()).await?;
    let frame = pb::ForwardFrame {
        request_id: frame.request_id,
        epoch: frame.epoch,
        position: 0,
        sampling: Some(crate::convert::sampling_to_pb(&SamplingSpec::default())),
        input: Some(pb::forward_frame::Input::Hidden(pb::Tensor {
            dtype: frame.dtype,
            shape: frame.shape,
            data: frame.data,
        })),
        sample: true,
    };
    client.forward_raw(frame).await
}

impl ShardClient {
    pub(crate) async fn forward_raw(&self, frame: pb::ForwardFrame) -> Result<u32> {
        let mut session = self
            .open(
                crate::RequestOpen {
                    request_id: frame.request_id.clone(),
                    epoch: frame.epoch,
                    sampling: SamplingSpec::default(),
                },
                crate::WireDtype::F32,
                Default::default(),
            )
            .await?;
        session.send_raw(frame).await?;
        Ok(session.next_token().await?.token)
    }
}
