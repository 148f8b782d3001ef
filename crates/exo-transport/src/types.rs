//! The service's own plain types (sizes, wire formats, assignments, status). Everything a
//! request carries is `exo-core`'s; protobuf types never leave this crate: `convert.rs` maps
//! both at the boundary.

use std::fmt;
use std::str::FromStr;

use exo_core::{Epoch, LayerRange, NodeId, Stage};

use crate::error::{Error, Result};

/// Sizes a node accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest activation payload in one frame, bytes (a longer prompt is sent in chunks).
    pub max_frame_bytes: usize,
    /// Most token ids in one frame.
    pub max_frame_tokens: usize,
    /// Most request entries in one frame.
    pub max_frame_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 << 20,
            max_frame_tokens: 1 << 16,
            max_frame_entries: 4096,
        }
    }
}

impl Limits {
    /// The largest encoded message the gRPC layer accepts: a frame plus its envelope.
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.max_frame_bytes
            .saturating_add(self.max_frame_tokens.saturating_mul(5))
            .saturating_add(self.max_frame_entries.saturating_mul(64))
            .saturating_add(64 << 10)
    }
}

/// How activations travel between stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WireDtype {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value (the default). A frame holding a value beyond f16's range travels as
    /// f32 instead.
    #[default]
    F16,
    /// 2 bytes per value, f32's range with 8 bits of mantissa.
    Bf16,
    /// 8-bit blocks as the quantized kernels use them: per 32 values, one f16 scale and 32
    /// signed bytes (1.0625 bytes per value; each value within half a step, `amax / 254` of its
    /// block). A frame holding a value beyond the scale's range travels as f32 instead.
    Q8,
}

impl WireDtype {
    /// Values per 8-bit block of [`WireDtype::Q8`].
    pub const Q8_BLOCK: usize = 32;

    /// Bytes one row of `width` values takes on the wire.
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            WireDtype::F32 => width.saturating_mul(4),
            WireDtype::F16 | WireDtype::Bf16 => width.saturating_mul(2),
            WireDtype::Q8 => width.saturating_add(width.div_ceil(Self::Q8_BLOCK) * 2),
        }
    }
}

impl fmt::Display for WireDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::F16 => "f16",
            WireDtype::Bf16 => "bf16",
            WireDtype::Q8 => "q8",
        })
    }
}

impl FromStr for WireDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WireDtype::F32),
            "f16" => Ok(WireDtype::F16),
            "bf16" => Ok(WireDtype::Bf16),
            "q8" => Ok(WireDtype::Q8),
            other => Err(Error::invalid(format!(
                "unknown activation wire type `{other}` (choose f32, f16, bf16 or q8)"
            ))),
        }
    }
}

/// What a node is asked to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The model's name.
    pub model: String,
    /// The plan epoch.
    pub epoch: Epoch,
    /// Every stage in order; the receiver finds itself by node id.
    pub stages: Vec<Stage>,
}

/// A node's answer to an [`Assignment`].
#[derive(Clone, Debug, PartialEq)]
pub struct AssignReport {
    /// The epoch now held.
    pub epoch: Epoch,
    /// The layers now held.
    pub layers: LayerRange,
    /// Bytes of weights held.
    pub weight_bytes: u64,
    /// How long loading took (0 when the shard was already held).
    pub load_seconds: f64,
}

/// What opens a link to a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkOpen {
    /// The plan epoch the link serves.
    pub epoch: Epoch,
    /// The node sending: a request's origin, or the previous stage.
    pub from: NodeId,
}

/// A node's report on itself.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct NodeStatus {
    /// Its identity.
    pub node_id: String,
    /// The model it serves.
    pub model: String,
    /// The plan epoch it holds, if any.
    pub epoch: Option<Epoch>,
    /// The layers it holds.
    pub layers: LayerRange,
    /// Whether its shard is loaded.
    pub ready: bool,
    /// Requests with state on it now.
    pub active_requests: u32,
    /// Bytes of weights held.
    pub weight_bytes: u64,
    /// Resident memory of the process.
    pub resident_bytes: u64,
    /// Activation payload bytes it sent to the next stage.
    pub activation_bytes_sent: u64,
    /// Activation frames it sent.
    pub activation_frames_sent: u64,
    /// Positions whose activations it sent.
    pub activation_positions_sent: u64,
    /// The layers it is loading now, if it is.
    pub loading: Option<LayerRange>,
    /// The part of those layers' bytes read so far, 0 to 1 (0 when not loading).
    pub loading_fraction: f64,
    /// Steps (frames of work) its stage workers computed since it started.
    pub steps_computed: u64,
    /// Positions (rows of those frames) they computed.
    pub positions_computed: u64,
    /// Time they spent computing, nanoseconds.
    pub compute_nanos: u64,
    /// Of those steps, the decode steps (every request in the frame advanced by one position).
    pub decode_steps: u64,
    /// Time the decode steps took, nanoseconds.
    pub decode_nanos: u64,
    /// The fetch of this node's shard from its peers, while one runs.
    pub fetch: Option<FetchStatus>,
}

/// How far a node's fetch of its shard's chunks has come.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FetchStatus {
    /// Bytes received and verified.
    pub done_bytes: u64,
    /// Bytes the shard needs that the node did not hold when the fetch began.
    pub total_bytes: u64,
    /// Bytes per second over the last seconds.
    pub bytes_per_s: f64,
}
