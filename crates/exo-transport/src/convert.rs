//! Conversions between the protobuf messages and this crate's types, and the checks every
//! incoming message passes before a handler sees it.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::pb;
use crate::types::{
    Activations, AssignReport, Assignment, FinishReason, Finished, GenerateCall, GenerateEvent,
    Limits, NodeStatus, Prompt, PromptMessage, RequestOpen, SamplingSpec, StageRef, Step,
    StepInput, TokenReply, WireDtype,
};

/// Longest request id accepted.
const MAX_REQUEST_ID: usize = 128;

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
        shape: vec![a.positions as u32, a.hidden as u32],
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
        positions,
        hidden,
        values,
    })
}

pub(crate) fn sampling_to_pb(s: &SamplingSpec) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        seed: s.seed,
    }
}

fn sampling_from_pb(s: &pb::Sampling) -> Result<SamplingSpec> {
    if !s.temperature.is_finite() || s.temperature < 0.0 {
        return Err(Error::invalid(format!(
            "temperature {} is not a finite value of at least 0",
            s.temperature
        )));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::invalid(format!(
            "top_p {} is not in (0, 1]",
            s.top_p
        )));
    }
    Ok(SamplingSpec {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        seed: s.seed,
    })
}

pub(crate) fn step_to_pb(
    open: &RequestOpen,
    first: bool,
    step: &Step,
    wire: WireDtype,
) -> pb::ForwardFrame {
    pb::ForwardFrame {
        request_id: open.request_id.clone(),
        epoch: open.epoch,
        position: step.position,
        sampling: first.then(|| sampling_to_pb(&open.sampling)),
        input: Some(match &step.input {
            StepInput::Tokens(ids) => {
                pb::forward_frame::Input::Tokens(pb::TokenIds { ids: ids.clone() })
            }
            StepInput::Hidden(a) => pb::forward_frame::Input::Hidden(encode_activations(a, wire)),
        }),
        sample: step.sample,
    }
}

fn step_from_pb(frame: &pb::ForwardFrame, limits: &Limits) -> Result<Step> {
    let input = match &frame.input {
        None => {
            return Err(Error::invalid(
                "frame carries neither token ids nor activations",
            ));
        }
        Some(pb::forward_frame::Input::Tokens(t)) => {
            if t.ids.is_empty() {
                return Err(Error::invalid("frame carries an empty list of token ids"));
            }
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
        Some(pb::forward_frame::Input::Hidden(t)) => {
            StepInput::Hidden(decode_activations(t, limits)?)
        }
    };
    if u64::from(frame.position) + input.positions() as u64 > u64::from(u32::MAX) {
        return Err(Error::invalid("frame positions run past 2^32"));
    }
    Ok(Step {
        position: frame.position,
        input,
        sample: frame.sample,
    })
}

/// Checks and decodes the frame that opens a request.
pub(crate) fn first_frame(
    frame: &pb::ForwardFrame,
    limits: &Limits,
) -> Result<(RequestOpen, Step)> {
    if frame.request_id.is_empty() || frame.request_id.len() > MAX_REQUEST_ID {
        return Err(Error::invalid(format!(
            "request id must have 1 to {MAX_REQUEST_ID} bytes, got {}",
            frame.request_id.len()
        )));
    }
    if frame.epoch == 0 {
        return Err(Error::invalid("frame names plan epoch 0"));
    }
    let sampling = frame
        .sampling
        .as_ref()
        .ok_or_else(|| Error::invalid("the first frame of a request must carry its sampling"))?;
    let open = RequestOpen {
        request_id: frame.request_id.clone(),
        epoch: frame.epoch,
        sampling: sampling_from_pb(sampling)?,
    };
    Ok((open, step_from_pb(frame, limits)?))
}

/// Checks and decodes a later frame of the request `open`.
pub(crate) fn next_frame(
    frame: &pb::ForwardFrame,
    open: &RequestOpen,
    limits: &Limits,
) -> Result<Step> {
    if frame.request_id != open.request_id {
        return Err(Error::invalid(format!(
            "frame for request `{}` on the stream of request `{}`",
            frame.request_id, open.request_id
        )));
    }
    if frame.epoch != open.epoch {
        return Err(Error::invalid(format!(
            "frame for plan epoch {} on a stream opened for epoch {}",
            frame.epoch, open.epoch
        )));
    }
    step_from_pb(frame, limits)
}

impl From<&TokenReply> for pb::ForwardReply {
    fn from(r: &TokenReply) -> Self {
        pb::ForwardReply {
            request_id: String::new(),
            token: r.token,
            position: r.position,
        }
    }
}

impl From<pb::ForwardReply> for TokenReply {
    fn from(r: pb::ForwardReply) -> Self {
        TokenReply {
            token: r.token,
            position: r.position,
        }
    }
}

impl From<&Assignment> for pb::AssignRequest {
    fn from(a: &Assignment) -> Self {
        pb::AssignRequest {
            model: a.model.clone(),
            epoch: a.epoch,
            stages: a
                .stages
                .iter()
                .map(|s| pb::StageRef {
                    node_id: s.node_id.clone(),
                    endpoint: s.endpoint.clone(),
                    layer_start: s.layers.start,
                    layer_end: s.layers.end,
                })
                .collect(),
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
            epoch: a.epoch,
            stages: a
                .stages
                .into_iter()
                .map(|s| StageRef {
                    node_id: s.node_id,
                    endpoint: s.endpoint,
                    layers: s.layer_start..s.layer_end,
                })
                .collect(),
        })
    }
}

impl From<&AssignReport> for pb::AssignReply {
    fn from(r: &AssignReport) -> Self {
        pb::AssignReply {
            epoch: r.epoch,
            layer_start: r.layers.start,
            layer_end: r.layers.end,
            weight_bytes: r.weight_bytes,
            load_seconds: r.load_seconds,
        }
    }
}

impl From<pb::AssignReply> for AssignReport {
    fn from(r: pb::AssignReply) -> Self {
        AssignReport {
            epoch: r.epoch,
            layers: r.layer_start..r.layer_end,
            weight_bytes: r.weight_bytes,
            load_seconds: r.load_seconds,
        }
    }
}

impl From<&GenerateCall> for pb::GenerateRequest {
    fn from(c: &GenerateCall) -> Self {
        pb::GenerateRequest {
            model: c.model.clone(),
            prompt: Some(match &c.prompt {
                Prompt::Text(t) => pb::generate_request::Prompt::Text(t.clone()),
                Prompt::Chat(messages) => pb::generate_request::Prompt::Chat(pb::ChatPrompt {
                    messages: messages
                        .iter()
                        .map(|m| pb::ChatMessage {
                            role: m.role.clone(),
                            content: m.content.clone(),
                        })
                        .collect(),
                }),
            }),
            max_tokens: c.max_tokens.unwrap_or(0),
            sampling: Some(sampling_to_pb(&c.sampling)),
            stop: c.stop.clone(),
            ignore_eos: c.ignore_eos,
        }
    }
}

impl TryFrom<pb::GenerateRequest> for GenerateCall {
    type Error = Error;

    fn try_from(r: pb::GenerateRequest) -> Result<Self> {
        let prompt = match r.prompt {
            None => return Err(Error::invalid("generate request carries no prompt")),
            Some(pb::generate_request::Prompt::Text(t)) => Prompt::Text(t),
            Some(pb::generate_request::Prompt::Chat(c)) => Prompt::Chat(
                c.messages
                    .into_iter()
                    .map(|m| PromptMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            ),
        };
        Ok(GenerateCall {
            model: r.model,
            prompt,
            max_tokens: (r.max_tokens > 0).then_some(r.max_tokens),
            sampling: match &r.sampling {
                Some(s) => sampling_from_pb(s)?,
                None => SamplingSpec::default(),
            },
            stop: r.stop,
            ignore_eos: r.ignore_eos,
        })
    }
}

impl From<&GenerateEvent> for pb::GenerateEvent {
    fn from(e: &GenerateEvent) -> Self {
        pb::GenerateEvent {
            event: Some(match e {
                GenerateEvent::Text(t) => pb::generate_event::Event::Text(t.clone()),
                GenerateEvent::Finished(f) => pb::generate_event::Event::Finished(pb::Finished {
                    reason: match f.reason {
                        FinishReason::Stop => pb::FinishReason::Stop,
                        FinishReason::Length => pb::FinishReason::Length,
                    } as i32,
                    prompt_tokens: f.prompt_tokens,
                    token_ids: f.token_ids.clone(),
                    time_to_first_token_s: f.time_to_first_token_s,
                    decode_s: f.decode_s,
                }),
            }),
        }
    }
}

impl TryFrom<pb::GenerateEvent> for GenerateEvent {
    type Error = Error;

    fn try_from(e: pb::GenerateEvent) -> Result<Self> {
        match e.event {
            Some(pb::generate_event::Event::Text(t)) => Ok(GenerateEvent::Text(t)),
            Some(pb::generate_event::Event::Finished(f)) => Ok(GenerateEvent::Finished(Finished {
                reason: match pb::FinishReason::try_from(f.reason) {
                    Ok(pb::FinishReason::Length) => FinishReason::Length,
                    _ => FinishReason::Stop,
                },
                prompt_tokens: f.prompt_tokens,
                token_ids: f.token_ids,
                time_to_first_token_s: f.time_to_first_token_s,
                decode_s: f.decode_s,
            })),
            None => Err(Error::invalid("generate event carries nothing")),
        }
    }
}

impl From<&NodeStatus> for pb::StatusReply {
    fn from(s: &NodeStatus) -> Self {
        pb::StatusReply {
            node_id: s.node_id.clone(),
            model: s.model.clone(),
            epoch: s.epoch,
            layer_start: s.layers.start,
            layer_end: s.layers.end,
            ready: s.ready,
            active_requests: s.active_requests,
            weight_bytes: s.weight_bytes,
            resident_bytes: s.resident_bytes,
            activation_bytes_sent: s.activation_bytes_sent,
            activation_frames_sent: s.activation_frames_sent,
            activation_positions_sent: s.activation_positions_sent,
        }
    }
}

impl From<pb::StatusReply> for NodeStatus {
    fn from(s: pb::StatusReply) -> Self {
        NodeStatus {
            node_id: s.node_id,
            model: s.model,
            epoch: s.epoch,
            layers: s.layer_start..s.layer_end,
            ready: s.ready,
            active_requests: s.active_requests,
            weight_bytes: s.weight_bytes,
            resident_bytes: s.resident_bytes,
            activation_bytes_sent: s.activation_bytes_sent,
            activation_frames_sent: s.activation_frames_sent,
            activation_positions_sent: s.activation_positions_sent,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;

    fn acts(positions: usize, hidden: usize, values: Vec<f32>) -> Activations {
        Activations {
            positions,
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
                prop_assert_eq!(back.positions, positions);
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

    #[test]
    fn frames_of_another_request_or_epoch_are_refused() {
        let limits = Limits::default();
        let open = RequestOpen {
            request_id: "r1".into(),
            epoch: 7,
            sampling: SamplingSpec::default(),
        };
        let step = Step {
            position: 0,
            input: StepInput::Tokens(vec![1, 2]),
            sample: true,
        };
        let first = step_to_pb(&open, true, &step, WireDtype::F16);
        let (o, s) = first_frame(&first, &limits).unwrap();
        assert_eq!(o, open);
        assert_eq!(s, step);
        let mut later = step_to_pb(&open, false, &step, WireDtype::F16);
        assert!(
            first_frame(&later, &limits).is_err(),
            "no sampling on a first frame"
        );
        later.request_id = "r2".into();
        assert!(
            next_frame(&later, &open, &limits)
                .unwrap_err()
                .to_string()
                .contains("r2")
        );
        later.request_id = "r1".into();
        later.epoch = 8;
        assert!(
            next_frame(&later, &open, &limits)
                .unwrap_err()
                .to_string()
                .contains("epoch")
        );
        later.epoch = 7;
        later.input = None;
        assert!(next_frame(&later, &open, &limits).is_err());
    }
}
