//! Conversions between the protobuf messages and the plain types (`exo-core`'s and this
//! crate's), and the checks every incoming message passes before a handler sees it.

use exo_core::{
    Activations, ChatMessage, Epoch, FailureKind, FinishReason, Finished, Fork, GenerationError,
    GenerationEvent, GenerationRequest, LayerRange, Logprob, NodeId, OutputConstraint, Penalties,
    Prompt, PromptLogprobs, RequestId, RequestStart, SamplingParams, Stage, StageFailure,
    StepEntry, StepFrame, StepInput, TokenLogprob, TokenOut, TokenText, ToolCall, ToolSpec,
};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::pb;
use crate::types::{AssignReport, Assignment, Limits, LinkOpen, NodeStatus, WireDtype};

/// Longest node id accepted (libp2p peer ids in base58 take about 52 bytes).
const MAX_NODE_ID: usize = 128;

/// Encodes activations as `dtype`; a frame with a value f16 (or a Q8 block's f16 scale)
/// cannot hold travels as f32.
pub(crate) fn encode_activations(a: &Activations, dtype: WireDtype) -> pb::Tensor {
    let f16_max = f16::MAX.to_f32();
    let dtype = match dtype {
        // (NaN too: the receiver refuses it, as it refuses any value that is not finite.)
        WireDtype::F16 if a.values.iter().any(|v| v.is_nan() || v.abs() > f16_max) => {
            WireDtype::F32
        }
        WireDtype::Q8
            if a.values
                .iter()
                .any(|v| v.is_nan() || v.abs() / 127.0 > f16_max) =>
        {
            WireDtype::F32
        }
        other => other,
    };
    let rows = a.values.len().checked_div(a.hidden).unwrap_or(0);
    let mut data = Vec::with_capacity(rows * dtype.row_bytes(a.hidden));
    match dtype {
        WireDtype::F32 => a
            .values
            .iter()
            .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
        WireDtype::F16 => a
            .values
            .iter()
            .for_each(|v| data.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        WireDtype::Bf16 => a
            .values
            .iter()
            .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        WireDtype::Q8 => {
            for row in a.values.chunks(a.hidden.max(1)) {
                for block in row.chunks(WireDtype::Q8_BLOCK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = f16::from_f32(amax / 127.0);
                    let inv = if d.to_f32() > 0.0 {
                        1.0 / d.to_f32()
                    } else {
                        0.0
                    };
                    data.extend_from_slice(&d.to_le_bytes());
                    data.extend(
                        block
                            .iter()
                            .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
            }
        }
    }
    pb::Tensor {
        dtype: match dtype {
            WireDtype::F32 => pb::DType::F32,
            WireDtype::F16 => pb::DType::F16,
            WireDtype::Bf16 => pb::DType::Bf16,
            WireDtype::Q8 => pb::DType::Q8,
        } as i32,
        shape: vec![a.rows as u32, a.hidden as u32],
        data,
    }
}

/// Checks a tensor (dtype known, shape `[positions, hidden]` with both non-zero, shape × dtype
/// = byte length, within the size limit, every value finite) and decodes it.
pub(crate) fn decode_activations(t: &pb::Tensor, limits: &Limits) -> Result<Activations> {
    let dtype = match pb::DType::try_from(t.dtype) {
        Ok(pb::DType::F32) => WireDtype::F32,
        Ok(pb::DType::F16) => WireDtype::F16,
        Ok(pb::DType::Bf16) => WireDtype::Bf16,
        Ok(pb::DType::Q8) => WireDtype::Q8,
        _ => {
            return Err(Error::invalid(format!(
                "activation dtype {} is not f32, f16, bf16 or q8",
                t.dtype
            )));
        }
    };
    let [positions, hidden] = match t.shape.as_slice() {
        &[p, h] if p > 0 && h > 0 => [p as usize, h as usize],
        other => {
            return Err(Error::invalid(format!(
                "activation shape {other:?} is not [positions, hidden] with both above zero"
            )));
        }
    };
    if t.data.len() > limits.max_frame_bytes {
        return Err(Error::service(
            crate::Code::ResourceExhausted,
            format!(
                "activation frame of {} bytes is over the limit of {} bytes",
                t.data.len(),
                limits.max_frame_bytes
            ),
        ));
    }
    let expected = positions.checked_mul(dtype.row_bytes(hidden));
    if expected != Some(t.data.len()) {
        return Err(Error::invalid(format!(
            "activation frame of shape [{positions}, {hidden}] in {dtype} needs {} bytes, got {}",
            expected.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
            t.data.len()
        )));
    }
    let values: Vec<f32> = match dtype {
        WireDtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        WireDtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        WireDtype::Bf16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        WireDtype::Q8 => {
            let mut values = Vec::with_capacity(positions * hidden);
            for row in t.data.chunks_exact(dtype.row_bytes(hidden)) {
                let mut rest = row;
                while let [d0, d1, tail @ ..] = rest {
                    let d = f16::from_le_bytes([*d0, *d1]).to_f32();
                    let n = WireDtype::Q8_BLOCK.min(tail.len());
                    values.extend(tail[..n].iter().map(|&q| d * f32::from(q as i8)));
                    rest = &tail[n..];
                }
            }
            values
        }
    };
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "activation value at index {at} is not finite"
        )));
    }
    Ok(Activations {
        rows: positions,
        hidden,
        values,
    })
}

pub(crate) fn sampling_to_pb(s: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        seed: s.seed,
        ..pb::Sampling::default()
    }
}

fn sampling_from_pb(s: &pb::Sampling) -> Result<SamplingParams> {
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        seed: s.seed,
    };
    params
        .validate()
        .map_err(|e| Error::invalid(e.to_string()))?;
    Ok(params)
}

fn node_from_pb(id: &str, what: &str) -> Result<NodeId> {
    if id.is_empty() || id.len() > MAX_NODE_ID {
        return Err(Error::invalid(format!(
            "{what} must have 1 to {MAX_NODE_ID} bytes, got {}",
            id.len()
        )));
    }
    Ok(NodeId::from(id))
}

fn epoch_from_pb(epoch: u64) -> Result<Epoch> {
    Epoch::new(epoch).ok_or_else(|| Error::invalid("plan epoch 0 is no epoch"))
}

impl From<&LinkOpen> for pb::LinkOpen {
    fn from(o: &LinkOpen) -> Self {
        pb::LinkOpen {
            epoch: o.epoch.get(),
            from_node: o.from.as_str().to_owned(),
        }
    }
}

impl TryFrom<&pb::LinkOpen> for LinkOpen {
    type Error = Error;

    fn try_from(o: &pb::LinkOpen) -> Result<Self> {
        Ok(LinkOpen {
            epoch: epoch_from_pb(o.epoch)?,
            from: node_from_pb(&o.from_node, "the sending node's id")?,
        })
    }
}

/// Encodes a frame; activations travel as `wire`.
pub(crate) fn frame_to_pb(frame: &StepFrame, wire: WireDtype) -> pb::Frame {
    let entries = frame
        .entries
        .iter()
        .map(|e| pb::Entry {
            request_id: e.request.0,
            position: e.position,
            rows: e.rows,
            sample: e.sample,
            start: e.start.as_ref().map(|s| pb::RequestStart {
                origin: s.origin.as_str().to_owned(),
                sampling: Some(penalties_to_pb(&s.penalties, sampling_to_pb(&s.sampling))),
                positions: s.positions,
                sampled: s.sampled,
                constraint: s.constraint.as_ref().map(constraint_to_pb),
                generated: s.generated.clone(),
                logprobs: s.logprobs.is_some(),
                top_logprobs: s.logprobs.unwrap_or(0),
                embed: s.embed,
                prompt_logprobs: s.prompt_logprobs.is_some(),
                prompt_top_logprobs: s.prompt_logprobs.unwrap_or(0),
                prompt: s.prompt.clone(),
                fork_parent: s.fork.map(|f| f.parent.0),
                fork_positions: s.fork.map_or(0, |f| f.positions),
            }),
            end: e.end,
        })
        .collect();
    let input = match &frame.input {
        StepInput::Tokens(ids) if ids.is_empty() => None,
        StepInput::Tokens(ids) => Some(pb::frame::Input::Tokens(pb::TokenIds { ids: ids.clone() })),
        StepInput::Hidden(a) if a.rows == 0 => None,
        StepInput::Hidden(a) => Some(pb::frame::Input::Hidden(encode_activations(a, wire))),
    };
    pb::Frame { entries, input }
}

/// Checks and decodes a frame: entries within the limits and accounting for exactly the
/// input's rows, positions that fit, every request start complete and valid.
pub(crate) fn frame_from_pb(frame: &pb::Frame, limits: &Limits) -> Result<StepFrame> {
    if frame.entries.is_empty() {
        return Err(Error::invalid("frame carries no request entries"));
    }
    if frame.entries.len() > limits.max_frame_entries {
        return Err(Error::service(
            crate::Code::ResourceExhausted,
            format!(
                "frame carries {} request entries, over the limit of {}",
                frame.entries.len(),
                limits.max_frame_entries
            ),
        ));
    }
    let input = match &frame.input {
        None => StepInput::Tokens(Vec::new()),
        Some(pb::frame::Input::Tokens(t)) => {
            if t.ids.len() > limits.max_frame_tokens {
                return Err(Error::service(
                    crate::Code::ResourceExhausted,
                    format!(
                        "frame carries {} token ids, over the limit of {}",
                        t.ids.len(),
                        limits.max_frame_tokens
                    ),
                ));
            }
            StepInput::Tokens(t.ids.clone())
        }
        Some(pb::frame::Input::Hidden(t)) => StepInput::Hidden(decode_activations(t, limits)?),
    };
    let entries = frame
        .entries
        .iter()
        .map(|e| {
            if u64::from(e.position) + u64::from(e.rows) > u64::from(u32::MAX) {
                return Err(Error::invalid(format!(
                    "request {} runs past position 2^32",
                    RequestId(e.request_id)
                )));
            }
            if e.sample && e.rows == 0 {
                return Err(Error::invalid(format!(
                    "request {} asks for a token after no rows",
                    RequestId(e.request_id)
                )));
            }
            let start = match &e.start {
                None => None,
                Some(s) => Some(RequestStart {
                    origin: node_from_pb(&s.origin, "a request's origin")?,
                    sampling: sampling_from_pb(s.sampling.as_ref().ok_or_else(|| {
                        Error::invalid("a request's start must carry its sampling")
                    })?)?,
                    penalties: penalties_from_pb(s.sampling.as_ref())?,
                    positions: s.positions,
                    sampled: s.sampled,
                    constraint: constraint_from_pb(s.constraint.as_ref())?,
                    generated: s.generated.clone(),
                    logprobs: logprobs_from_pb(s.logprobs, s.top_logprobs)?,
                    embed: s.embed,
                    prompt_logprobs: logprobs_from_pb(s.prompt_logprobs, s.prompt_top_logprobs)?,
                    prompt: s.prompt.clone(),
                    fork: s.fork_parent.map(|parent| Fork {
                        parent: RequestId(parent),
                        positions: s.fork_positions,
                    }),
                }),
            };
            Ok(StepEntry {
                request: RequestId(e.request_id),
                position: e.position,
                rows: e.rows,
                sample: e.sample,
                start,
                end: e.end,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let frame = StepFrame { entries, input };
    if !frame.rows_match() {
        let rows: u64 = frame.entries.iter().map(|e| u64::from(e.rows)).sum();
        return Err(Error::invalid(format!(
            "frame entries account for {rows} rows but its input has {}",
            frame.input.rows()
        )));
    }
    Ok(frame)
}

impl From<&StageFailure> for pb::StageFailure {
    fn from(f: &StageFailure) -> Self {
        pb::StageFailure {
            node: f.node.as_str().to_owned(),
            stage: f.stage,
            layer_start: f.layers.start,
            layer_end: f.layers.end,
            epoch: f.epoch.get(),
            kind: match f.kind {
                FailureKind::Lost => pb::FailureKind::Lost,
                FailureKind::Unresponsive => pb::FailureKind::Unresponsive,
                FailureKind::Refused => pb::FailureKind::Refused,
                _ => pb::FailureKind::Failed,
            } as i32,
            reason: f.reason.clone(),
        }
    }
}

impl TryFrom<&pb::StageFailure> for StageFailure {
    type Error = Error;

    fn try_from(f: &pb::StageFailure) -> Result<Self> {
        Ok(StageFailure {
            node: node_from_pb(&f.node, "a failed stage's node")?,
            stage: f.stage,
            layers: LayerRange::new(f.layer_start, f.layer_end),
            epoch: epoch_from_pb(f.epoch)?,
            kind: match pb::FailureKind::try_from(f.kind) {
                Ok(pb::FailureKind::Lost) => FailureKind::Lost,
                Ok(pb::FailureKind::Unresponsive) => FailureKind::Unresponsive,
                Ok(pb::FailureKind::Refused) => FailureKind::Refused,
                _ => FailureKind::Failed,
            },
            reason: f.reason.clone(),
        })
    }
}

impl From<&TokenOut> for pb::TokenOut {
    fn from(t: &TokenOut) -> Self {
        match t {
            TokenOut::Token {
                request,
                token,
                position,
                logprob,
            } => pb::TokenOut {
                request_id: request.0,
                kind: Some(pb::token_out::Kind::Token(pb::SampledToken {
                    token: *token,
                    position: *position,
                    has_logprob: logprob.is_some(),
                    logprob: logprob.as_ref().map_or(0.0, |l| l.logprob),
                    top_tokens: logprob
                        .as_ref()
                        .map(|l| l.top.iter().map(|t| t.0).collect())
                        .unwrap_or_default(),
                    top_logprobs: logprob
                        .as_ref()
                        .map(|l| l.top.iter().map(|t| t.1).collect())
                        .unwrap_or_default(),
                })),
            },
            TokenOut::Embedding { request, values } => pb::TokenOut {
                request_id: request.0,
                kind: Some(pb::token_out::Kind::Embedding(pb::Embedding {
                    values: values.clone(),
                })),
            },
            TokenOut::PromptLogprobs {
                request,
                position,
                entries,
            } => pb::TokenOut {
                request_id: request.0,
                kind: Some(pb::token_out::Kind::PromptLogprobs(pb::PromptScores {
                    position: *position,
                    logprobs: entries.iter().map(|e| e.logprob).collect(),
                    top: entries.first().map_or(0, |e| e.top.len() as u32),
                    top_tokens: entries
                        .iter()
                        .flat_map(|e| e.top.iter().map(|t| t.0))
                        .collect(),
                    top_logprobs: entries
                        .iter()
                        .flat_map(|e| e.top.iter().map(|t| t.1))
                        .collect(),
                })),
            },
            TokenOut::Failed { request, failure } => pb::TokenOut {
                request_id: request.0,
                kind: Some(pb::token_out::Kind::Failed(failure.into())),
            },
        }
    }
}

impl TryFrom<&pb::TokenOut> for TokenOut {
    type Error = Error;

    fn try_from(t: &pb::TokenOut) -> Result<Self> {
        let request = RequestId(t.request_id);
        match &t.kind {
            Some(pb::token_out::Kind::Token(s)) => {
                if s.top_tokens.len() != s.top_logprobs.len() {
                    return Err(Error::invalid(format!(
                        "{} likeliest tokens with {} log-probabilities",
                        s.top_tokens.len(),
                        s.top_logprobs.len()
                    )));
                }
                Ok(TokenOut::Token {
                    request,
                    token: s.token,
                    position: s.position,
                    logprob: s.has_logprob.then(|| TokenLogprob {
                        logprob: s.logprob,
                        top: s
                            .top_tokens
                            .iter()
                            .copied()
                            .zip(s.top_logprobs.iter().copied())
                            .collect(),
                    }),
                })
            }
            Some(pb::token_out::Kind::Embedding(e)) => Ok(TokenOut::Embedding {
                request,
                values: embedding_from_pb(&e.values)?,
            }),
            Some(pb::token_out::Kind::PromptLogprobs(p)) => Ok(TokenOut::PromptLogprobs {
                request,
                position: p.position,
                entries: prompt_scores_from_pb(p)?,
            }),
            Some(pb::token_out::Kind::Failed(f)) => Ok(TokenOut::Failed {
                request,
                failure: f.try_into()?,
            }),
            None => Err(Error::invalid(format!(
                "delivery for request {request} carries nothing"
            ))),
        }
    }
}

fn stage_to_pb(s: &Stage) -> pb::StageRef {
    pb::StageRef {
        node_id: s.node.as_str().to_owned(),
        endpoint: s.endpoint.clone(),
        layer_start: s.layers.start,
        layer_end: s.layers.end,
    }
}

impl From<&Assignment> for pb::AssignRequest {
    fn from(a: &Assignment) -> Self {
        pb::AssignRequest {
            model: a.model.clone(),
            epoch: a.epoch.get(),
            stages: a.stages.iter().map(stage_to_pb).collect(),
        }
    }
}

impl TryFrom<pb::AssignRequest> for Assignment {
    type Error = Error;

    fn try_from(a: pb::AssignRequest) -> Result<Self> {
        if a.stages.is_empty() {
            return Err(Error::invalid("assignment lists no stages"));
        }
        let mut next = 0;
        for s in &a.stages {
            if s.layer_start != next || s.layer_end <= s.layer_start {
                return Err(Error::invalid(format!(
                    "assignment stages must cover the layers in order: stage of `{}` has {}..{}, expected to start at {next}",
                    s.node_id, s.layer_start, s.layer_end
                )));
            }
            next = s.layer_end;
        }
        Ok(Assignment {
            model: a.model,
            epoch: epoch_from_pb(a.epoch)?,
            stages: a
                .stages
                .into_iter()
                .map(|s| {
                    Ok(Stage {
                        node: node_from_pb(&s.node_id, "a stage's node")?,
                        endpoint: s.endpoint,
                        layers: LayerRange::new(s.layer_start, s.layer_end),
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

impl From<&AssignReport> for pb::AssignReply {
    fn from(r: &AssignReport) -> Self {
        pb::AssignReply {
            epoch: r.epoch.get(),
            layer_start: r.layers.start,
            layer_end: r.layers.end,
            weight_bytes: r.weight_bytes,
            load_seconds: r.load_seconds,
        }
    }
}

impl TryFrom<pb::AssignReply> for AssignReport {
    type Error = Error;

    fn try_from(r: pb::AssignReply) -> Result<Self> {
        Ok(AssignReport {
            epoch: epoch_from_pb(r.epoch)?,
            layers: LayerRange::new(r.layer_start, r.layer_end),
            weight_bytes: r.weight_bytes,
            load_seconds: r.load_seconds,
        })
    }
}

impl From<&GenerationRequest> for pb::GenerateRequest {
    fn from(r: &GenerationRequest) -> Self {
        pb::GenerateRequest {
            model: r.model.clone(),
            prompt: Some(match &r.prompt {
                Prompt::Text(t) => pb::generate_request::Prompt::Text(t.clone()),
                Prompt::Raw(t) => pb::generate_request::Prompt::RawText(t.clone()),
                Prompt::Tokens(ids) => {
                    pb::generate_request::Prompt::Tokens(pb::TokenIds { ids: ids.clone() })
                }
                Prompt::Chat(messages) => pb::generate_request::Prompt::Chat(pb::ChatPrompt {
                    messages: messages
                        .iter()
                        .map(|m| pb::ChatMessage {
                            role: m.role.clone(),
                            content: m.content.clone(),
                            tool_calls: m
                                .tool_calls
                                .iter()
                                .map(|c| pb::ToolCall {
                                    id: c.id.clone(),
                                    name: c.name.clone(),
                                    arguments: c.arguments.clone(),
                                })
                                .collect(),
                            tool_call_id: m.tool_call_id.clone(),
                        })
                        .collect(),
                }),
            }),
            max_tokens: r.max_tokens.unwrap_or(0),
            sampling: Some(penalties_to_pb(&r.penalties, sampling_to_pb(&r.sampling))),
            stop: r.stop.clone(),
            ignore_eos: r.ignore_eos,
            constraint: r.constraint.as_ref().map(constraint_to_pb),
            logprobs: r.logprobs.is_some(),
            top_logprobs: r.logprobs.unwrap_or(0),
            embed: r.embed,
            prompt_logprobs: r.prompt_logprobs.is_some(),
            prompt_top_logprobs: r.prompt_logprobs.unwrap_or(0),
            tools: r
                .tools
                .iter()
                .map(|t| pb::ToolSpec {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    parameters: t.parameters.clone(),
                })
                .collect(),
            share_prefill: r.share_prefill,
        }
    }
}

impl TryFrom<pb::GenerateRequest> for GenerationRequest {
    type Error = Error;

    fn try_from(r: pb::GenerateRequest) -> Result<Self> {
        let prompt = match r.prompt {
            None => return Err(Error::invalid("generate request carries no prompt")),
            Some(pb::generate_request::Prompt::Text(t)) => Prompt::Text(t),
            Some(pb::generate_request::Prompt::RawText(t)) => Prompt::Raw(t),
            Some(pb::generate_request::Prompt::Tokens(t)) => Prompt::Tokens(t.ids),
            Some(pb::generate_request::Prompt::Chat(c)) => Prompt::Chat(
                c.messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                        tool_calls: m
                            .tool_calls
                            .into_iter()
                            .map(|c| ToolCall {
                                id: c.id,
                                name: c.name,
                                arguments: c.arguments,
                            })
                            .collect(),
                        tool_call_id: m.tool_call_id,
                    })
                    .collect(),
            ),
        };
        Ok(GenerationRequest {
            penalties: penalties_from_pb(r.sampling.as_ref())?,
            model: r.model,
            prompt,
            max_tokens: (r.max_tokens > 0).then_some(r.max_tokens),
            sampling: match &r.sampling {
                Some(s) => sampling_from_pb(s)?,
                None => SamplingParams::greedy(),
            },
            stop: r.stop,
            ignore_eos: r.ignore_eos,
            constraint: constraint_from_pb(r.constraint.as_ref())?,
            logprobs: logprobs_from_pb(r.logprobs, r.top_logprobs)?,
            embed: r.embed,
            prompt_logprobs: logprobs_from_pb(r.prompt_logprobs, r.prompt_top_logprobs)?,
            tools: r
                .tools
                .into_iter()
                .map(|t| ToolSpec {
                    name: t.name,
                    description: t.description,
                    parameters: t.parameters,
                })
                .collect(),
            share_prefill: r.share_prefill,
        })
    }
}

/// A peer's prompt scores, checked: `top` alternatives per position (at most the most a
/// request may ask for), as many as the lists hold.
fn prompt_scores_from_pb(p: &pb::PromptScores) -> Result<Vec<TokenLogprob>> {
    let top = p.top as usize;
    if p.top > GenerationRequest::MAX_TOP_LOGPROBS
        || p.top_tokens.len() != p.logprobs.len() * top
        || p.top_logprobs.len() != p.top_tokens.len()
    {
        return Err(Error::invalid(format!(
            "prompt scores: {} positions with {} alternatives each do not fit {} tokens and {} \
             log-probabilities",
            p.logprobs.len(),
            p.top,
            p.top_tokens.len(),
            p.top_logprobs.len()
        )));
    }
    Ok(p.logprobs
        .iter()
        .enumerate()
        .map(|(i, &logprob)| TokenLogprob {
            logprob,
            top: (i * top..(i + 1) * top)
                .map(|j| (p.top_tokens[j], p.top_logprobs[j]))
                .collect(),
        })
        .collect())
}

/// An embedding from a peer: values, all finite.
fn embedding_from_pb(values: &[f32]) -> Result<Vec<f32>> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "an embedding must hold at least one value, all finite",
        ));
    }
    Ok(values.to_vec())
}

fn logprobs_from_pb(wanted: bool, top: u32) -> Result<Option<u32>> {
    if top > GenerationRequest::MAX_TOP_LOGPROBS {
        return Err(Error::invalid(format!(
            "at most {} alternatives per token, asked for {top}",
            GenerationRequest::MAX_TOP_LOGPROBS
        )));
    }
    Ok(wanted.then_some(top))
}

fn token_text_to_pb(t: &TokenText) -> pb::TokenText {
    pb::TokenText {
        token: t.token.clone(),
        bytes: t.bytes.clone(),
        logprob: t.logprob,
    }
}

fn logprob_from_pb(l: pb::Logprob) -> Result<Logprob> {
    Ok(Logprob {
        chosen: token_text_from_pb(
            l.chosen
                .ok_or_else(|| Error::invalid("a log-probability without its token"))?,
        ),
        top: l.top.into_iter().map(token_text_from_pb).collect(),
    })
}

fn token_text_from_pb(t: pb::TokenText) -> TokenText {
    TokenText {
        token: t.token,
        bytes: t.bytes,
        logprob: t.logprob,
    }
}

fn penalties_to_pb(p: &Penalties, mut s: pb::Sampling) -> pb::Sampling {
    s.presence_penalty = p.presence;
    s.frequency_penalty = p.frequency;
    (s.bias_tokens, s.bias_values) = p.logit_bias.iter().copied().unzip();
    s
}

fn penalties_from_pb(s: Option<&pb::Sampling>) -> Result<Penalties> {
    let Some(s) = s else {
        return Ok(Penalties::default());
    };
    if s.bias_tokens.len() != s.bias_values.len() {
        return Err(Error::invalid(format!(
            "{} biased tokens with {} biases",
            s.bias_tokens.len(),
            s.bias_values.len()
        )));
    }
    let penalties = Penalties {
        presence: s.presence_penalty,
        frequency: s.frequency_penalty,
        logit_bias: s
            .bias_tokens
            .iter()
            .copied()
            .zip(s.bias_values.iter().copied())
            .collect(),
    };
    penalties
        .validate()
        .map_err(|e| Error::invalid(e.to_string()))?;
    Ok(penalties)
}

fn constraint_to_pb(c: &OutputConstraint) -> pb::Constraint {
    use pb::constraint::Kind;
    pb::Constraint {
        kind: Some(match c {
            OutputConstraint::JsonSchema(schema) => Kind::JsonSchema(schema.clone()),
            OutputConstraint::Lark(grammar) => Kind::Lark(grammar.clone()),
        }),
    }
}

fn constraint_from_pb(c: Option<&pb::Constraint>) -> Result<Option<OutputConstraint>> {
    use pb::constraint::Kind;
    match c.map(|c| &c.kind) {
        None => Ok(None),
        Some(Some(Kind::JsonSchema(schema))) => {
            Ok(Some(OutputConstraint::JsonSchema(schema.clone())))
        }
        Some(Some(Kind::Lark(grammar))) => Ok(Some(OutputConstraint::Lark(grammar.clone()))),
        Some(None) => Err(Error::invalid(
            "a constraint must carry a schema or a grammar",
        )),
    }
}

impl From<&GenerationError> for pb::GenerationError {
    fn from(e: &GenerationError) -> Self {
        use pb::generation_error::Kind;
        let kind = match e {
            GenerationError::UnknownModel { model, available } => {
                Kind::UnknownModel(pb::UnknownModel {
                    model: model.clone(),
                    available: available.clone(),
                })
            }
            GenerationError::ContextExceeded {
                prompt_tokens,
                max_tokens,
                context_length,
            } => Kind::ContextExceeded(pb::ContextExceeded {
                prompt_tokens: *prompt_tokens as u64,
                max_tokens: *max_tokens as u64,
                context_length: *context_length as u64,
            }),
            GenerationError::Invalid { param, message } => Kind::Invalid(pb::Invalid {
                param: param.clone().unwrap_or_default(),
                message: message.clone(),
            }),
            GenerationError::Unavailable(m) => Kind::Unavailable(m.clone()),
            GenerationError::Busy => Kind::Busy(true),
            GenerationError::StageFailed(f) => Kind::StageFailed(f.into()),
            GenerationError::Cancelled => Kind::Cancelled(true),
            other => Kind::Internal(other.to_string()),
        };
        pb::GenerationError { kind: Some(kind) }
    }
}

impl From<&pb::GenerationError> for GenerationError {
    fn from(e: &pb::GenerationError) -> Self {
        use pb::generation_error::Kind;
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        match &e.kind {
            Some(Kind::UnknownModel(u)) => GenerationError::UnknownModel {
                model: u.model.clone(),
                available: u.available.clone(),
            },
            Some(Kind::ContextExceeded(c)) => GenerationError::ContextExceeded {
                prompt_tokens: size(c.prompt_tokens),
                max_tokens: size(c.max_tokens),
                context_length: size(c.context_length),
            },
            Some(Kind::Invalid(i)) => GenerationError::Invalid {
                param: (!i.param.is_empty()).then(|| i.param.clone()),
                message: i.message.clone(),
            },
            Some(Kind::Unavailable(m)) => GenerationError::Unavailable(m.clone()),
            Some(Kind::Busy(_)) => GenerationError::Busy,
            Some(Kind::StageFailed(f)) => match StageFailure::try_from(f) {
                Ok(f) => GenerationError::StageFailed(f),
                Err(e) => GenerationError::Internal(format!("a malformed stage failure: {e}")),
            },
            Some(Kind::Cancelled(_)) => GenerationError::Cancelled,
            Some(Kind::Internal(m)) => GenerationError::Internal(m.clone()),
            None => GenerationError::Internal("an error without a kind".to_owned()),
        }
    }
}

/// One item of a generation's stream as its event.
pub(crate) fn generation_item_to_pb(
    item: &std::result::Result<GenerationEvent, GenerationError>,
) -> pb::GenerateEvent {
    use pb::generate_event::Event;
    let event = match item {
        Ok(GenerationEvent::Text(t)) => Event::Text(t.clone()),
        Ok(GenerationEvent::Logprob(l)) => Event::Logprob(pb::Logprob {
            chosen: Some(token_text_to_pb(&l.chosen)),
            top: l.top.iter().map(token_text_to_pb).collect(),
        }),
        Ok(GenerationEvent::Embedding(values)) => Event::Embedding(pb::Embedding {
            values: values.clone(),
        }),
        Ok(GenerationEvent::PromptLogprobs(p)) => Event::PromptLogprobs(pb::PromptLogprobs {
            first: Some(token_text_to_pb(&p.first)),
            rest: p
                .rest
                .iter()
                .map(|l| pb::Logprob {
                    chosen: Some(token_text_to_pb(&l.chosen)),
                    top: l.top.iter().map(token_text_to_pb).collect(),
                })
                .collect(),
        }),
        Ok(GenerationEvent::Finished(f)) => Event::Finished(pb::Finished {
            reason: match f.reason {
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Length => pb::FinishReason::Length,
            } as i32,
            prompt_tokens: f.prompt_tokens,
            token_ids: f.token_ids.clone(),
            time_to_first_token_s: f.time_to_first_token_s,
            decode_s: f.decode_s,
        }),
        Err(e) => Event::Error(e.into()),
    };
    pb::GenerateEvent { event: Some(event) }
}

/// A generation's event back as the item it was.
pub(crate) fn generation_item_from_pb(
    e: pb::GenerateEvent,
) -> Result<std::result::Result<GenerationEvent, GenerationError>> {
    use pb::generate_event::Event;
    match e.event {
        Some(Event::Text(t)) => Ok(Ok(GenerationEvent::Text(t))),
        Some(Event::Logprob(l)) => Ok(Ok(GenerationEvent::Logprob(logprob_from_pb(l)?))),
        Some(Event::Embedding(e)) => Ok(Ok(GenerationEvent::Embedding(embedding_from_pb(
            &e.values,
        )?))),
        Some(Event::PromptLogprobs(p)) => {
            Ok(Ok(GenerationEvent::PromptLogprobs(PromptLogprobs {
                first: token_text_from_pb(p.first.ok_or_else(|| {
                    Error::invalid("prompt log-probabilities without a first token")
                })?),
                rest: p
                    .rest
                    .into_iter()
                    .map(logprob_from_pb)
                    .collect::<Result<_>>()?,
            })))
        }
        Some(Event::Finished(f)) => Ok(Ok(GenerationEvent::Finished(Finished {
            reason: match pb::FinishReason::try_from(f.reason) {
                Ok(pb::FinishReason::Length) => FinishReason::Length,
                _ => FinishReason::Stop,
            },
            prompt_tokens: f.prompt_tokens,
            token_ids: f.token_ids,
            time_to_first_token_s: f.time_to_first_token_s,
            decode_s: f.decode_s,
        }))),
        Some(Event::Error(e)) => Ok(Err((&e).into())),
        None => Err(Error::invalid("generate event carries nothing")),
    }
}

impl From<&NodeStatus> for pb::StatusReply {
    fn from(s: &NodeStatus) -> Self {
        pb::StatusReply {
            node_id: s.node_id.clone(),
            model: s.model.clone(),
            epoch: s.epoch.map_or(0, Epoch::get),
            layer_start: s.layers.start,
            layer_end: s.layers.end,
            ready: s.ready,
            active_requests: s.active_requests,
            weight_bytes: s.weight_bytes,
            resident_bytes: s.resident_bytes,
            activation_bytes_sent: s.activation_bytes_sent,
            activation_frames_sent: s.activation_frames_sent,
            activation_positions_sent: s.activation_positions_sent,
            loading: s.loading.is_some(),
            loading_start: s.loading.map_or(0, |r| r.start),
            loading_end: s.loading.map_or(0, |r| r.end),
            loading_fraction: s.loading_fraction,
            steps_computed: s.steps_computed,
            positions_computed: s.positions_computed,
            compute_nanos: s.compute_nanos,
            decode_steps: s.decode_steps,
            decode_nanos: s.decode_nanos,
            fetching: s.fetch.is_some(),
            fetched_bytes: s.fetch.map_or(0, |f| f.done_bytes),
            fetch_bytes: s.fetch.map_or(0, |f| f.total_bytes),
            fetch_bytes_per_s: s.fetch.map_or(0.0, |f| f.bytes_per_s),
        }
    }
}

impl From<pb::StatusReply> for NodeStatus {
    fn from(s: pb::StatusReply) -> Self {
        NodeStatus {
            node_id: s.node_id,
            model: s.model,
            epoch: Epoch::new(s.epoch),
            layers: LayerRange::new(s.layer_start, s.layer_end),
            ready: s.ready,
            active_requests: s.active_requests,
            weight_bytes: s.weight_bytes,
            resident_bytes: s.resident_bytes,
            activation_bytes_sent: s.activation_bytes_sent,
            activation_frames_sent: s.activation_frames_sent,
            activation_positions_sent: s.activation_positions_sent,
            loading: s
                .loading
                .then(|| LayerRange::new(s.loading_start, s.loading_end)),
            // A figure for people: out-of-range or NaN values from a peer are clamped.
            loading_fraction: if s.loading_fraction.is_finite() {
                s.loading_fraction.clamp(0.0, 1.0)
            } else {
                0.0
            },
            steps_computed: s.steps_computed,
            positions_computed: s.positions_computed,
            compute_nanos: s.compute_nanos,
            decode_steps: s.decode_steps,
            decode_nanos: s.decode_nanos,
            // Figures for people: a peer's nonsense rate reads as 0.
            fetch: s.fetching.then(|| crate::FetchStatus {
                done_bytes: s.fetched_bytes,
                total_bytes: s.fetch_bytes,
                bytes_per_s: if s.fetch_bytes_per_s.is_finite() {
                    s.fetch_bytes_per_s.max(0.0)
                } else {
                    0.0
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;

    fn acts(rows: usize, hidden: usize, values: Vec<f32>) -> Activations {
        Activations {
            rows,
            hidden,
            values,
        }
    }

    proptest! {
        #[test]
        fn activations_round_trip_within_the_wire_precision(
            positions in 1usize..5,
            hidden in 1usize..40,
            seed in any::<u64>(),
            scale in prop_oneof![Just(1.0f32), Just(1e3), Just(1e6)],
        ) {
            let n = positions * hidden;
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    let x = (seed.wrapping_mul(6364136223846793005).wrapping_add((i as u64).wrapping_mul(1442695040888963407)) >> 33) as f32;
                    (x / (1u64 << 31) as f32 - 0.5) * scale
                })
                .collect();
            let a = acts(positions, hidden, values.clone());
            for (dtype, rel) in [(WireDtype::F32, 0.0f32), (WireDtype::F16, 1e-3), (WireDtype::Bf16, 8e-3)] {
                let t = encode_activations(&a, dtype);
                let back = decode_activations(&t, &Limits::default()).unwrap();
                prop_assert_eq!(back.rows, positions);
                prop_assert_eq!(back.hidden, hidden);
                for (x, y) in values.iter().zip(&back.values) {
                    prop_assert!((x - y).abs() <= rel * x.abs() + 1e-6 * scale, "{dtype}: {x} vs {y}");
                }
            }
            // 8-bit blocks: each value within half a step of its block, plus the f16 rounding
            // of the block's scale.
            let t = encode_activations(&a, WireDtype::Q8);
            prop_assert_eq!(t.data.len(), positions * WireDtype::Q8.row_bytes(hidden));
            let back = decode_activations(&t, &Limits::default()).unwrap();
            for (r, (row, got)) in values.chunks(hidden).zip(back.values.chunks(hidden)).enumerate() {
                for (b, (block, got)) in row.chunks(32).zip(got.chunks(32)).enumerate() {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let bound = amax * (1.0 / 254.0 + 1.0 / 1024.0) + 1e-30;
                    for (x, y) in block.iter().zip(got) {
                        prop_assert!((x - y).abs() <= bound, "q8 row {r} block {b}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_rows_take_one_byte_a_value_and_a_scale_per_32() {
        assert_eq!(WireDtype::Q8.row_bytes(576), 612);
        assert_eq!(WireDtype::Q8.row_bytes(33), 37);
        assert_eq!(WireDtype::F16.row_bytes(576), 1152);
        let t = encode_activations(&acts(1, 3, vec![1.0, -0.5, 0.0]), WireDtype::Q8);
        assert_eq!(t.dtype, pb::DType::Q8 as i32);
        // Scale 1/127 in f16, then 127, -64 (rounded from -63.5), 0.
        assert_eq!(&t.data[2..], &[127, (-64i8) as u8, 0]);
        let zeros = encode_activations(&acts(1, 4, vec![0.0; 4]), WireDtype::Q8);
        let back = decode_activations(&zeros, &Limits::default()).unwrap();
        assert_eq!(back.values, vec![0.0; 4]);
    }

    #[test]
    fn q8_falls_back_to_f32_where_its_scale_cannot_reach_and_bad_q8_frames_are_refused() {
        let t = encode_activations(&acts(1, 2, vec![1.0, 1e8]), WireDtype::Q8);
        assert_eq!(t.dtype, pb::DType::F32 as i32);
        let limits = Limits::default();
        let nan = encode_activations(&acts(1, 2, vec![1.0, f32::NAN]), WireDtype::Q8);
        assert!(decode_activations(&nan, &limits).is_err());
        let mut t = encode_activations(&acts(2, 40, vec![0.5; 80]), WireDtype::Q8);
        t.data.pop();
        let e = decode_activations(&t, &limits).unwrap_err();
        assert!(e.to_string().contains("needs 88 bytes, got 87"), "{e}");
        // An infinite scale makes infinite values: refused like any non-finite value.
        let mut t = encode_activations(&acts(1, 2, vec![1.0, 2.0]), WireDtype::Q8);
        t.data[..2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        assert!(decode_activations(&t, &limits).is_err());
    }

    #[test]
    fn f16_falls_back_to_f32_beyond_its_range() {
        let t = encode_activations(&acts(1, 2, vec![1.0, 1e6]), WireDtype::F16);
        assert_eq!(t.dtype, pb::DType::F32 as i32);
        assert_eq!(t.data.len(), 8);
        let t = encode_activations(&acts(1, 2, vec![1.0, 2.0]), WireDtype::F16);
        assert_eq!(t.data.len(), 4);
    }

    #[test]
    fn malformed_tensors_are_refused_with_the_reason() {
        let limits = Limits::default();
        let good = encode_activations(&acts(2, 3, vec![0.5; 6]), WireDtype::F16);
        let mut t = good.clone();
        t.data.pop();
        let e = decode_activations(&t, &limits).unwrap_err();
        assert_eq!(e.code(), crate::Code::InvalidArgument);
        assert!(e.to_string().contains("needs 12 bytes, got 11"), "{e}");

        let mut t = good.clone();
        t.shape = vec![6];
        assert!(
            decode_activations(&t, &limits)
                .unwrap_err()
                .to_string()
                .contains("shape")
        );
        let mut t = good.clone();
        t.shape = vec![0, 3];
        assert!(decode_activations(&t, &limits).is_err());
        let mut t = good.clone();
        t.dtype = 0;
        assert!(
            decode_activations(&t, &limits)
                .unwrap_err()
                .to_string()
                .contains("dtype")
        );
        let mut t = good.clone();
        t.shape = vec![u32::MAX, u32::MAX];
        assert!(decode_activations(&t, &limits).is_err());

        let small = Limits {
            max_frame_bytes: 8,
            ..Limits::default()
        };
        let e = decode_activations(&good, &small).unwrap_err();
        assert_eq!(e.code(), crate::Code::ResourceExhausted);

        let nan = encode_activations(&acts(1, 2, vec![1.0, f32::NAN]), WireDtype::F32);
        assert!(
            decode_activations(&nan, &limits)
                .unwrap_err()
                .to_string()
                .contains("finite")
        );
    }

    fn start() -> RequestStart {
        RequestStart {
            logprobs: None,
            penalties: Penalties {
                presence: 0.5,
                frequency: -0.25,
                logit_bias: vec![(3, -100.0), (9, 2.5)],
            },
            origin: NodeId::from("origin"),
            sampling: SamplingParams::greedy(),
            positions: 40,
            sampled: 3,
            constraint: Some(OutputConstraint::json_object()),
            generated: vec![5, 6, 7],
            embed: true,
            prompt_logprobs: Some(2),
            prompt: vec![1, 2, 3],
            fork: Some(Fork {
                parent: RequestId(11),
                positions: 30,
            }),
        }
    }

    #[test]
    fn frames_round_trip_and_entries_must_cover_the_rows() {
        let limits = Limits::default();
        let mut first = StepEntry::rows(RequestId(7), 0, 2, false);
        first.start = Some(start());
        let frame = StepFrame {
            entries: vec![first, StepEntry::rows(RequestId(9), 5, 1, true)],
            input: StepInput::Hidden(acts(3, 4, vec![0.5; 12])),
        };
        let back = frame_from_pb(&frame_to_pb(&frame, WireDtype::F32), &limits).unwrap();
        assert_eq!(back, frame);

        let ends = StepFrame {
            entries: vec![StepEntry::end(RequestId(7))],
            input: StepInput::Tokens(Vec::new()),
        };
        assert_eq!(
            frame_from_pb(&frame_to_pb(&ends, WireDtype::F16), &limits).unwrap(),
            ends
        );

        let mut short = frame_to_pb(&frame, WireDtype::F32);
        short.entries[1].rows = 2;
        let e = frame_from_pb(&short, &limits).unwrap_err();
        assert_eq!(e.code(), crate::Code::InvalidArgument);
        assert!(e.to_string().contains("4 rows but its input has 3"), "{e}");

        let mut no_sampling = frame_to_pb(&frame, WireDtype::F32);
        no_sampling.entries[0].start.as_mut().unwrap().sampling = None;
        assert!(
            frame_from_pb(&no_sampling, &limits)
                .unwrap_err()
                .to_string()
                .contains("sampling")
        );

        let mut hot = frame_to_pb(&frame, WireDtype::F32);
        hot.entries[0]
            .start
            .as_mut()
            .unwrap()
            .sampling
            .as_mut()
            .unwrap()
            .top_p = 0.0;
        assert!(
            frame_from_pb(&hot, &limits)
                .unwrap_err()
                .to_string()
                .contains("top_p")
        );

        let mut far = frame_to_pb(&frame, WireDtype::F32);
        far.entries[1].position = u32::MAX;
        assert!(
            frame_from_pb(&far, &limits)
                .unwrap_err()
                .to_string()
                .contains("2^32")
        );

        let empty = pb::Frame {
            entries: vec![],
            input: None,
        };
        assert!(frame_from_pb(&empty, &limits).is_err());

        let few = Limits {
            max_frame_entries: 1,
            ..Limits::default()
        };
        assert_eq!(
            frame_from_pb(&frame_to_pb(&frame, WireDtype::F32), &few)
                .unwrap_err()
                .code(),
            crate::Code::ResourceExhausted
        );
    }

    #[test]
    fn typed_errors_cross_the_wire_as_data() {
        let failure = StageFailure {
            node: NodeId::from("n1"),
            stage: 2,
            layers: LayerRange::new(4, 8),
            epoch: Epoch::from_hash(99),
            kind: FailureKind::Unresponsive,
            reason: "silent for 5 s".into(),
        };
        let errors = [
            GenerationError::StageFailed(failure.clone()),
            GenerationError::ContextExceeded {
                prompt_tokens: 3,
                max_tokens: 9,
                context_length: 10,
            },
            GenerationError::invalid("stop", "too many"),
            GenerationError::UnknownModel {
                model: "m".into(),
                available: vec!["a".into()],
            },
            GenerationError::Unavailable("loading".into()),
            GenerationError::Busy,
            GenerationError::Cancelled,
        ];
        for e in errors {
            let back = generation_item_from_pb(generation_item_to_pb(&Err(e.clone()))).unwrap();
            assert_eq!(back, Err(e));
        }
        let out = TokenOut::Failed {
            request: RequestId(3),
            failure,
        };
        assert_eq!(TokenOut::try_from(&pb::TokenOut::from(&out)).unwrap(), out);
        let out = TokenOut::Embedding {
            request: RequestId(4),
            values: vec![0.6, -0.8],
        };
        assert_eq!(TokenOut::try_from(&pb::TokenOut::from(&out)).unwrap(), out);
        let out = TokenOut::PromptLogprobs {
            request: RequestId(5),
            position: 1,
            entries: vec![
                TokenLogprob {
                    logprob: -0.5,
                    top: vec![(3, -0.25), (4, -1.0)],
                },
                TokenLogprob {
                    logprob: -2.0,
                    top: vec![(5, -0.1), (6, -3.0)],
                },
            ],
        };
        assert_eq!(TokenOut::try_from(&pb::TokenOut::from(&out)).unwrap(), out);
        // Alternatives that do not fit the positions are refused.
        let bad = pb::TokenOut {
            request_id: 5,
            kind: Some(pb::token_out::Kind::PromptLogprobs(pb::PromptScores {
                position: 1,
                logprobs: vec![-0.5, -1.0],
                top: 2,
                top_tokens: vec![1, 2, 3],
                top_logprobs: vec![-1.0, -2.0, -3.0],
            })),
        };
        assert!(TokenOut::try_from(&bad).is_err());
        let text = |t: &str| TokenText {
            token: t.into(),
            bytes: t.as_bytes().to_vec(),
            logprob: -1.0,
        };
        let item = Ok(GenerationEvent::PromptLogprobs(PromptLogprobs {
            first: text("The"),
            rest: vec![Logprob {
                chosen: text(" cat"),
                top: vec![text(" dog")],
            }],
        }));
        assert_eq!(
            generation_item_from_pb(generation_item_to_pb(&item)).unwrap(),
            item
        );
        let item = Ok(GenerationEvent::Embedding(vec![1.0, 0.0]));
        assert_eq!(
            generation_item_from_pb(generation_item_to_pb(&item)).unwrap(),
            item
        );
        // A peer's embedding with a NaN (or none at all) is refused.
        for values in [vec![f32::NAN, 1.0], Vec::new()] {
            let bad = pb::TokenOut {
                request_id: 4,
                kind: Some(pb::token_out::Kind::Embedding(pb::Embedding { values })),
            };
            assert!(TokenOut::try_from(&bad).is_err());
        }
    }

    #[test]
    fn statuses_round_trip_with_loading_and_compute_figures() {
        let status = NodeStatus {
            node_id: "n1".into(),
            model: "m.gguf".into(),
            epoch: Some(Epoch::from_hash(7)),
            layers: LayerRange::new(0, 10),
            ready: false,
            loading: Some(LayerRange::new(10, 20)),
            loading_fraction: 0.25,
            steps_computed: 40,
            positions_computed: 90,
            compute_nanos: 1_000_000,
            decode_steps: 30,
            decode_nanos: 600_000,
            fetch: Some(crate::FetchStatus {
                done_bytes: 3 << 20,
                total_bytes: 9 << 20,
                bytes_per_s: 1e6,
            }),
            ..NodeStatus::default()
        };
        assert_eq!(NodeStatus::from(pb::StatusReply::from(&status)), status);
        let idle = NodeStatus::default();
        assert_eq!(NodeStatus::from(pb::StatusReply::from(&idle)), idle);
        // A peer's nonsense fraction is kept in range.
        let mut reply = pb::StatusReply::from(&status);
        reply.loading_fraction = f64::NAN;
        assert_eq!(NodeStatus::from(reply).loading_fraction, 0.0);
    }
}
