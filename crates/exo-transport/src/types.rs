//! The service's messages as plain Rust types. Protobuf types never leave this crate: these are
//! converted to and from them at the boundary (`convert.rs`).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Sizes a node accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest activation payload in one frame, bytes (a longer prompt is sent in chunks).
    pub max_frame_bytes: usize,
    /// Most token ids in one frame.
    pub max_frame_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 << 20,
            max_frame_tokens: 1 << 16,
        }
    }
}

impl Limits {
    /// The largest encoded message the gRPC layer accepts: a frame plus its envelope.
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.max_frame_bytes
            .saturating_add(self.max_frame_tokens.saturating_mul(5))
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

/// Hidden activations of consecutive positions: `positions × hidden` values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations {
    /// Number of positions (rows).
    pub positions: usize,
    /// Width of each row.
    pub hidden: usize,
    /// The values.
    pub values: Vec<f32>,
}

/// One stage of a plan, as the ring lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRef {
    /// The node that holds it.
    pub node_id: String,
    /// Where that node's shard service listens.
    pub endpoint: String,
    /// Its layers.
    pub layers: Range<u32>,
}

/// What a node is asked to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The model's name.
    pub model: String,
    /// The plan epoch.
    pub epoch: u64,
    /// Every stage in order; the receiver finds itself by node id.
    pub stages: Vec<StageRef>,
}

/// A node's answer to an [`Assignment`].
#[derive(Clone, Debug, PartialEq)]
pub struct AssignReport {
    /// The epoch now held.
    pub epoch: u64,
    /// The layers now held.
    pub layers: Range<u32>,
    /// Bytes of weights held.
    pub weight_bytes: u64,
    /// How long loading took (0 when the shard was already held).
    pub load_seconds: f64,
}

/// How the last stage picks tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSpec {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Nucleus sampling mass (1 keeps all).
    pub top_p: f32,
    /// Keep the k most likely (0 keeps all).
    pub top_k: u32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingSpec {
    fn default() -> Self {
        SamplingSpec {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// What the first frame of a request says about the whole request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOpen {
    /// Unique per request.
    pub request_id: String,
    /// The plan epoch the caller routes by.
    pub epoch: u64,
    /// How the last stage samples.
    pub sampling: SamplingSpec,
}

/// The input of one step.
#[derive(Clone, Debug, PartialEq)]
pub enum StepInput {
    /// Token ids, for the first stage.
    Tokens(Vec<u32>),
    /// Hidden activations, for the other stages.
    Hidden(Activations),
}

impl StepInput {
    /// Positions this input covers.
    pub fn positions(&self) -> usize {
        match self {
            StepInput::Tokens(t) => t.len(),
            StepInput::Hidden(a) => a.positions,
        }
    }
}

/// One step of a request at one stage: the next positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Position of the first of them.
    pub position: u32,
    /// Their tokens or activations.
    pub input: StepInput,
    /// Whether the last stage samples a token after this step.
    pub sample: bool,
}

/// A token sampled by the last stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenReply {
    /// The token id.
    pub token: u32,
    /// The position it will take.
    pub position: u32,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Messages, rendered with the model's chat template.
    Chat(Vec<PromptMessage>),
    /// Text sent as is.
    Text(String),
}

/// An end-to-end generation asked of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateCall {
    /// The model; empty for the one the cluster serves.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate; `None` for the node's default.
    pub max_tokens: Option<u32>,
    /// How to pick tokens.
    pub sampling: SamplingSpec,
    /// Stop before any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence or a stop string.
    Stop,
    /// The token limit or the context's end.
    Length,
}

/// The end of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Every generated id.
    pub token_ids: Vec<u32>,
    /// Seconds to the first token.
    pub time_to_first_token_s: f64,
    /// Seconds from the first token to the last.
    pub decode_s: f64,
}

/// What a generation streams back.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerateEvent {
    /// The next piece of text.
    Text(String),
    /// The end.
    Finished(Finished),
}

/// A node's report on itself.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct NodeStatus {
    /// Its identity.
    pub node_id: String,
    /// The model it serves.
    pub model: String,
    /// The plan epoch it holds (0: none).
    pub epoch: u64,
    /// The layers it holds.
    pub layers: Range<u32>,
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
}
