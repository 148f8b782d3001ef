//! The CPU fast path: a shard whose weights stay in compact formats (quantized blocks, f16)
//! and whose layers run through `exo-kernels` directly, in host memory, with preallocated
//! scratch buffers. On the tiny matrices of decoding, burn's per-operation overhead would
//! dominate; here a decoded token costs one kernel call per projection group and no allocation.

use exo_kernels::{QuantMatrix, QuantizedActs, WeightFormat, matmul};
use exo_model::{Activation, Checkpoint, DType, LayerPart, ShardSpec, StoredTensor, TensorId};

use crate::error::{Error, Result};
use crate::layers::{RopeTables, rope_frequencies};

/// How weights are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Weights {
    /// Dequantized to f32 and run by burn on any backend (the reference path).
    #[default]
    F32,
    /// As the checkpoint stores them (quantized blocks stay quantized), on the CPU kernels.
    Stored,
    /// Converted at load to this format, on the CPU kernels (for safetensors checkpoints).
    Quantize(WeightFormat),
}

impl std::str::FromStr for Weights {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => Weights::F32,
            "stored" => Weights::Stored,
            "f16" => Weights::Quantize(WeightFormat::F16),
            "bf16" => Weights::Quantize(WeightFormat::BF16),
            "q8_0" => Weights::Quantize(WeightFormat::Q8_0),
            "q4_0" => Weights::Quantize(WeightFormat::Q4_0),
            "q4_1" => Weights::Quantize(WeightFormat::Q4_1),
            other => {
                return Err(Error::Backend(format!(
                    "unknown weight format `{other}` (choose f32, stored, f16, bf16, q8_0, q4_0 or q4_1)"
                )));
            }
        })
    }
}

fn kernel_error(e: exo_kernels::Error) -> Error {
    Error::Backend(format!("cpu kernel: {e}"))
}

/// Turns a stored tensor into a kernel matrix in the format `weights` asks for.
fn matrix(stored: StoredTensor, weights: Weights) -> Result<QuantMatrix> {
    let (rows, cols) = (stored.shape[0], stored.shape.get(1).copied().unwrap_or(1));
    let native = native_format(stored.dtype);
    match (weights, native) {
        (Weights::Stored, Some(format)) => {
            QuantMatrix::from_ggml(format, rows, cols, &stored.bytes).map_err(kernel_error)
        }
        (target, _) => {
            let format = match target {
                Weights::Quantize(f) => f,
                // Formats the kernels lack (none of the stored ones today) would be widened
                // to Q8_0, which keeps their precision.
                _ => WeightFormat::Q8_0,
            };
            let mut values = Vec::with_capacity(rows * cols);
            exo_model::dequantize(stored.dtype, &stored.bytes, &mut values);
            QuantMatrix::from_f32(format, rows, cols, &values).map_err(kernel_error)
        }
    }
}

/// The format the kernels keep a stored type in as it is, if they have one.
fn native_format(dtype: DType) -> Option<WeightFormat> {
    match dtype {
        DType::F32 => Some(WeightFormat::F32),
        DType::F16 => Some(WeightFormat::F16),
        DType::BF16 => Some(WeightFormat::BF16),
        DType::Q8_0 => Some(WeightFormat::Q8_0),
        DType::Q4_0 => Some(WeightFormat::Q4_0),
        DType::Q4_1 => Some(WeightFormat::Q4_1),
        DType::Q4K => Some(WeightFormat::Q4K),
        DType::Q5K => Some(WeightFormat::Q5K),
        DType::Q6K => Some(WeightFormat::Q6K),
        DType::Q5_0 => Some(WeightFormat::Q5_0),
        DType::Q5_1 => Some(WeightFormat::Q5_1),
    }
}

/// Matrices above this many stored bytes are read and converted in pieces of about
/// [`PIECE_BYTES`]: their raw bytes and their kernel form are never in memory together (a
/// 262k-token head is 160 MiB).
const PIECEWISE_ABOVE: u64 = 48 << 20;
const PIECE_BYTES: usize = 16 << 20;

/// Loads the matrix `id` as `weights` asks, a large stored one piece by piece where the
/// checkpoint can read its rows alone.
fn load_matrix(checkpoint: &Checkpoint, id: TensorId, weights: Weights) -> Result<QuantMatrix> {
    let format = checkpoint.stored_dtype(id).and_then(native_format);
    let total = checkpoint.stored_bytes(id).unwrap_or(0);
    if let (Weights::Stored, Some(format), true) = (weights, format, total > PIECEWISE_ABOVE) {
        let shape = checkpoint.config().expected_shape(id);
        let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
        let row_bytes = total as usize / rows.max(1);
        let per_piece = (PIECE_BYTES / row_bytes.max(1)).max(1);
        let mut failed = None;
        let mut piecewise = true;
        let pieces = (0..rows).step_by(per_piece).map_while(|start| {
            let end = (start + per_piece).min(rows);
            match checkpoint.stored_rows(id, start..end) {
                Ok(Some(t)) => Some((end - start, t.bytes)),
                Ok(None) => {
                    piecewise = false;
                    None
                }
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        let built = QuantMatrix::from_ggml_pieces(format, cols, pieces);
        if let Some(e) = failed {
            return Err(e.into());
        }
        if piecewise {
            return built.map_err(kernel_error);
        }
    }
    matrix(checkpoint.stored_tensor(id)?, weights)
}

#[derive(Debug)]
struct NativeLayer {
    attn_norm: Vec<f32>,
    /// q, k and v stacked: one kernel call for all three.
    qkv: QuantMatrix,
    qkv_bias: Option<Vec<f32>>,
    o: QuantMatrix,
    mlp_norm: Vec<f32>,
    /// The MLP: one expert in a dense layer, every expert of a mixture of experts.
    experts: Vec<Expert>,
    /// The mixture of experts' router; `None` in a dense layer.
    router: Option<Router>,
    /// Per-head RMSNorm weights of queries and keys (`[head_dim]` each), when the family has them.
    qk_norm: Option<[Vec<f32>; 2]>,
    /// RMSNorm weights of the attention and MLP outputs, when the family has them.
    post_norms: Option<[Vec<f32>; 2]>,
    /// Positions a query sees in a sliding-window layer; `None` attends to all.
    window: Option<usize>,
    /// Whether the layer takes the local (sliding-window) rotary tables.
    local_rope: bool,
}

/// One gated MLP (a dense layer's, or one expert's).
#[derive(Debug)]
struct Expert {
    /// gate and up stacked: one kernel call for both.
    gate_up: QuantMatrix,
    down: QuantMatrix,
}

/// A mixture of experts' router.
#[derive(Debug)]
struct Router {
    /// `[experts, hidden]`: one logit per expert.
    matrix: QuantMatrix,
    per_token: usize,
    normalize: bool,
}

/// A shard on the CPU kernels.
#[derive(Debug)]
pub(crate) struct NativeShard {
    embedding: Option<QuantMatrix>,
    layers: Vec<NativeLayer>,
    final_norm: Option<Vec<f32>>,
    /// The head's own matrix; `None` with `tied` uses the embedding.
    head: Option<QuantMatrix>,
    tied: bool,
    /// Rotary frequencies of the global layers, and of the sliding-window layers where their
    /// base differs (each step computes the rows of its positions: a table of every position
    /// would take 64 MiB for Gemma 3's 32k context).
    rope: Vec<f32>,
    local_rope: Option<Vec<f32>>,
    activation: Activation,
    embedding_scale: Option<f32>,
    attention_scale: f32,
    logit_softcap: Option<f32>,
    pub(crate) first_layer: usize,
    pub(crate) vocab_size: usize,
    pub(crate) hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    eps: f32,
    pub(crate) max_positions: usize,
}

/// One request's part of a batched step: its cache, the position its rows start at, and how
/// many rows it has.
#[derive(Debug)]
pub(crate) struct Segment<'a> {
    pub(crate) cache: &'a mut NativeCache,
    pub(crate) start: usize,
    pub(crate) rows: usize,
}

/// The attention heads' shape.
#[derive(Clone, Copy)]
struct Heads {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    /// Scale of the scores.
    scale: f32,
    /// Positions a query sees (itself included) in a sliding-window layer.
    window: Option<usize>,
}

/// Per-request state of a native shard: the KV cache and scratch buffers.
#[derive(Debug, Clone, Default)]
pub(crate) struct NativeCache {
    /// Per layer, `[position][kv_heads * head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    scratch: Scratch,
}

/// Buffers one step reuses (a request's own, or lent to a batch).
#[derive(Debug, Clone, Default)]
pub(crate) struct Scratch {
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    h: Vec<f32>,
    acts: QuantizedActs,
    /// A mixture of experts' router logits, routes, and the rows of one expert's tokens in
    /// and out.
    router: Vec<f32>,
    routes: Vec<crate::moe::Route>,
    expert_in: Vec<f32>,
    expert_out: Vec<f32>,
    /// The rotary rows of this step's positions (global, and local where it differs).
    rope: RopeTables,
    local_rope: RopeTables,
}

impl NativeCache {
    pub(crate) fn new(layers: usize) -> Self {
        NativeCache {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            scratch: Scratch::default(),
        }
    }

    pub(crate) fn layers(&self) -> usize {
        self.k.len()
    }

    /// A cache with the first `positions` of this one's `len` positions (fresh scratch).
    pub(crate) fn prefix(&self, len: usize, positions: usize) -> NativeCache {
        let cut = |rows: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            rows.iter()
                .map(|layer| {
                    let width = layer.len().checked_div(len).unwrap_or(0);
                    layer[..(width * positions).min(layer.len())].to_vec()
                })
                .collect()
        };
        NativeCache {
            k: cut(&self.k),
            v: cut(&self.v),
            scratch: Scratch::default(),
        }
    }

    /// Takes the scratch buffers (to lend them to a batch), leaving empty ones.
    pub(crate) fn take_scratch(&mut self) -> Scratch {
        std::mem::take(&mut self.scratch)
    }

    /// Gives scratch buffers back.
    pub(crate) fn put_scratch(&mut self, scratch: Scratch) {
        self.scratch = scratch;
    }

    pub(crate) fn clear(&mut self) {
        self.k
            .iter_mut()
            .chain(self.v.iter_mut())
            .for_each(Vec::clear);
    }
}

impl NativeShard {
    pub(crate) fn load(
        checkpoint: &Checkpoint,
        spec: &ShardSpec,
        weights: Weights,
    ) -> Result<Self> {
        let config = checkpoint.config();
        let n = config.num_layers;
        if spec.layers.start > spec.layers.end || spec.layers.end > n {
            return Err(exo_model::Error::LayerRange {
                start: spec.layers.start,
                end: spec.layers.end,
                layers: n,
            }
            .into());
        }
        let load = |id| load_matrix(checkpoint, id, weights);
        let vector = |id| -> Result<Vec<f32>> { Ok(checkpoint.tensor(id)?.data) };
        let embedding = spec
            .embedding
            .then(|| load(TensorId::Embedding))
            .transpose()?;
        let local_rope = config
            .local_rope_theta()
            .map(|theta| rope_frequencies(config, theta, None));
        let mut layers = Vec::with_capacity(spec.layers.len());
        for layer in spec.layers.clone() {
            let id = |part| TensorId::Layer { layer, part };
            let stack = |parts: &[LayerPart]| -> Result<QuantMatrix> {
                let ms = parts
                    .iter()
                    .map(|&p| load(id(p)))
                    .collect::<Result<Vec<_>>>()?;
                QuantMatrix::stack(&ms).map_err(kernel_error)
            };
            let qkv_bias = if config.attention_bias {
                let mut b = vector(id(LayerPart::QBias))?;
                b.extend(vector(id(LayerPart::KBias))?);
                b.extend(vector(id(LayerPart::VBias))?);
                Some(b)
            } else {
                None
            };
            let pair = |a, b, present: bool| -> Result<Option<[Vec<f32>; 2]>> {
                Ok(if present {
                    Some([vector(id(a))?, vector(id(b))?])
                } else {
                    None
                })
            };
            let expert = |gate, up, down| -> Result<Expert> {
                Ok(Expert {
                    gate_up: stack(&[gate, up])?,
                    down: load(id(down))?,
                })
            };
            let (experts, router) = match config.variant.moe {
                None => (
                    vec![expert(LayerPart::Gate, LayerPart::Up, LayerPart::Down)?],
                    None,
                ),
                Some(moe) => {
                    let experts = (0..moe.experts as u32)
                        .map(|e| {
                            expert(
                                LayerPart::ExpertGate(e),
                                LayerPart::ExpertUp(e),
                                LayerPart::ExpertDown(e),
                            )
                        })
                        .collect::<Result<Vec<_>>>()?;
                    // The router picks the experts: it keeps its stored precision (f32 in
                    // llama.cpp's files) rather than a coarser format asked for the rest.
                    let keep = match weights {
                        Weights::Quantize(_) => Weights::Quantize(WeightFormat::F32),
                        other => other,
                    };
                    let router = Router {
                        matrix: load_matrix(checkpoint, id(LayerPart::Router), keep)?,
                        per_token: moe.experts_per_token,
                        normalize: moe.normalize,
                    };
                    (experts, Some(router))
                }
            };
            layers.push(NativeLayer {
                qk_norm: pair(LayerPart::QNorm, LayerPart::KNorm, config.variant.qk_norm)?,
                post_norms: pair(
                    LayerPart::PostAttnNorm,
                    LayerPart::PostMlpNorm,
                    config.variant.sandwich_norms,
                )?,
                window: config.window_of(layer),
                local_rope: config.uses_local_rope(layer),
                attn_norm: vector(id(LayerPart::AttnNorm))?,
                qkv: stack(&[LayerPart::Q, LayerPart::K, LayerPart::V])?,
                qkv_bias,
                o: load(id(LayerPart::O))?,
                mlp_norm: vector(id(LayerPart::MlpNorm))?,
                experts,
                router,
            });
        }
        let (final_norm, head, tied) = if spec.head {
            let norm = vector(TensorId::FinalNorm)?;
            if checkpoint.has_tensor(TensorId::Head) {
                (Some(norm), Some(load(TensorId::Head)?), false)
            } else if embedding.is_some() {
                (Some(norm), None, true)
            } else {
                (Some(norm), Some(load(TensorId::Embedding)?), false)
            }
        } else {
            (None, None, false)
        };
        let v = &config.variant;
        Ok(NativeShard {
            embedding,
            layers,
            final_norm,
            head,
            tied,
            rope: rope_frequencies(config, config.rope_theta, v.rope_linear_factor),
            local_rope,
            activation: v.activation,
            embedding_scale: v.embedding_scale.map(|s| s as f32),
            attention_scale: v
                .attention_scale
                .map_or(1.0 / (config.head_dim as f32).sqrt(), |s| s as f32),
            logit_softcap: v.final_logit_softcap.map(|c| c as f32),
            first_layer: spec.layers.start,
            vocab_size: config.vocab_size,
            hidden: config.hidden_size,
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            intermediate: v
                .moe
                .map_or(config.intermediate_size, |m| m.intermediate_size),
            eps: config.rms_norm_eps as f32,
            max_positions: config.max_position_embeddings.max(1),
        })
    }

    pub(crate) fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of keys and values one position takes in a cache of this shard (f32).
    pub(crate) fn kv_bytes_per_position(&self) -> usize {
        self.layers.len() * 2 * self.kv_heads * self.head_dim * 4
    }

    pub(crate) fn has_embedding(&self) -> bool {
        self.embedding.is_some()
    }

    pub(crate) fn has_head(&self) -> bool {
        self.head.is_some() || self.tied
    }

    /// Shapes: tokens [seq] -> `out` [seq * hidden]
    pub(crate) fn embed_into(&self, tokens: &[u32], out: &mut Vec<f32>) -> Option<Result<()>> {
        let table = self.embedding.as_ref()?;
        out.resize(tokens.len() * self.hidden, 0.0);
        for (row, &t) in out.chunks_exact_mut(self.hidden).zip(tokens) {
            if let Err(e) = table.dequantize_row(t as usize, row) {
                return Some(Err(kernel_error(e)));
            }
            if let Some(scale) = self.embedding_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Some(Ok(()))
    }

    /// Room for `positions` positions of keys and values in every layer of `cache`, as far as
    /// the allocator grants it (untouched pages cost no memory; a refusal only means the cache
    /// grows later, in steps).
    pub(crate) fn reserve(&self, cache: &mut NativeCache, positions: usize) {
        let kvd = self.kv_heads * self.head_dim;
        for kv in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            let want = positions.saturating_mul(kvd).saturating_sub(kv.len());
            if kv.try_reserve_exact(want).is_err() {
                return;
            }
        }
    }

    /// Runs the layers on `x` (`[seq, hidden]`) at positions `start..start + seq`, in place.
    pub(crate) fn forward(
        &self,
        x: &mut [f32],
        seq: usize,
        start: usize,
        cache: &mut NativeCache,
    ) -> Result<()> {
        let mut scratch = std::mem::take(&mut cache.scratch);
        let result = self.forward_batch(
            x,
            &mut [Segment {
                cache: &mut *cache,
                start,
                rows: seq,
            }],
            &mut scratch,
        );
        cache.scratch = scratch;
        result
    }

    /// Runs the layers once for several requests: `x` holds each segment's rows, one segment
    /// after another (`[Σ rows, hidden]`); each segment's rows go at the positions after
    /// `start` in its own cache. The weights are read once for all of them; attention runs per
    /// segment over its own keys and values.
    pub(crate) fn forward_batch(
        &self,
        x: &mut [f32],
        segments: &mut [Segment<'_>],
        s: &mut Scratch,
    ) -> Result<()> {
        let (hd, h, kvh) = (self.head_dim, self.heads, self.kv_heads);
        let (qd, kvd) = (h * hd, kvh * hd);
        let qkv_width = qd + 2 * kvd;
        let seq: usize = segments.iter().map(|g| g.rows).sum();
        let positions = || segments.iter().flat_map(|g| g.start..g.start + g.rows);
        s.rope.fill(&self.rope, positions());
        if let Some(local) = &self.local_rope {
            s.local_rope.fill(local, positions());
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(x, &layer.attn_norm, self.eps, &mut s.xn);
            s.qkv.resize(seq * qkv_width, 0.0);
            matmul(&layer.qkv, &s.xn, seq, &mut s.qkv, &mut s.acts).map_err(kernel_error)?;
            let mut first = 0;
            for g in segments.iter_mut() {
                let (kc, vc) = (&mut g.cache.k[l], &mut g.cache.v[l]);
                if kc.capacity() < (g.start + g.rows) * kvd {
                    // Grow in steps of 256 positions so that decoding rarely allocates.
                    let want = (g.start + g.rows).next_multiple_of(256) * kvd;
                    kc.reserve(want - kc.len());
                    vc.reserve(want - vc.len());
                }
                let rope = match (&self.local_rope, layer.local_rope) {
                    (Some(_), true) => &s.local_rope,
                    _ => &s.rope,
                };
                for t in 0..g.rows {
                    let row = &mut s.qkv[(first + t) * qkv_width..(first + t + 1) * qkv_width];
                    if let Some(bias) = &layer.qkv_bias {
                        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                    }
                    if let Some([qn, kn]) = &layer.qk_norm {
                        let (q, k) = row[..qd + kvd].split_at_mut(qd);
                        for head in q.chunks_exact_mut(hd) {
                            rms_norm_in_place(head, qn, self.eps);
                        }
                        for head in k.chunks_exact_mut(hd) {
                            rms_norm_in_place(head, kn, self.eps);
                        }
                    }
                    let (cos, sin) = rope.row(first + t);
                    for head in row[..qd + kvd].chunks_exact_mut(hd) {
                        rotate(head, cos, sin);
                    }
                    kc.extend_from_slice(&row[qd..qd + kvd]);
                    vc.extend_from_slice(&row[qd + kvd..]);
                }
                first += g.rows;
            }
            s.att.resize(seq * qd, 0.0);
            let heads = Heads {
                heads: h,
                kv_heads: kvh,
                hd,
                scale: self.attention_scale,
                window: layer.window,
            };
            attention(&s.qkv, qkv_width, segments, l, heads, &mut s.att).map_err(kernel_error)?;
            s.proj.resize(seq * self.hidden, 0.0);
            matmul(&layer.o, &s.att, seq, &mut s.proj, &mut s.acts).map_err(kernel_error)?;
            let post = layer.post_norms.as_ref();
            add_residual(x, &mut s.proj, post.map(|[a, _]| a.as_slice()), self.eps);

            rms_norm(x, &layer.mlp_norm, self.eps, &mut s.xn);
            match &layer.router {
                None => {
                    let expert = &layer.experts[0];
                    self.mlp(
                        expert,
                        &s.xn,
                        seq,
                        &mut s.proj,
                        &mut s.gate_up,
                        &mut s.h,
                        &mut s.acts,
                    )?;
                }
                Some(router) => self.mixture(layer, router, seq, s)?,
            }
            add_residual(x, &mut s.proj, post.map(|[_, b]| b.as_slice()), self.eps);
        }
        Ok(())
    }

    /// One gated MLP on `rows` rows of `xn` into `out` (`[rows, hidden]`); `gate_up` and `h`
    /// are scratch.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        expert: &Expert,
        xn: &[f32],
        rows: usize,
        out: &mut Vec<f32>,
        gate_up: &mut Vec<f32>,
        h: &mut Vec<f32>,
        acts: &mut QuantizedActs,
    ) -> Result<()> {
        let i = self.intermediate;
        gate_up.resize(rows * 2 * i, 0.0);
        matmul(&expert.gate_up, xn, rows, gate_up, acts).map_err(kernel_error)?;
        h.resize(rows * i, 0.0);
        let act = self.activation;
        for (hrow, gu) in h.chunks_exact_mut(i).zip(gate_up.chunks_exact(2 * i)) {
            let (gate, up) = gu.split_at(i);
            for ((o, g), u) in hrow.iter_mut().zip(gate).zip(up) {
                *o = act.apply(*g) * u;
            }
        }
        out.resize(rows * self.hidden, 0.0);
        matmul(&expert.down, h, rows, out, acts).map_err(kernel_error)
    }

    /// A mixture of experts on the `seq` rows of `s.xn` into `s.proj`: each token's chosen
    /// experts only, and each expert once for all the rows routed to it (a prompt's tokens
    /// share the experts' weights as a dense layer's do).
    fn mixture(
        &self,
        layer: &NativeLayer,
        router: &Router,
        seq: usize,
        s: &mut Scratch,
    ) -> Result<()> {
        let (hidden, experts) = (self.hidden, layer.experts.len());
        s.router.resize(seq * experts, 0.0);
        matmul(&router.matrix, &s.xn, seq, &mut s.router, &mut s.acts).map_err(kernel_error)?;
        crate::moe::route(
            &mut s.router,
            experts,
            router.per_token,
            router.normalize,
            &mut s.routes,
        );
        s.proj.clear();
        s.proj.resize(seq * hidden, 0.0);
        for (e, run) in crate::moe::runs(&s.routes) {
            let routes = &s.routes[run];
            s.expert_in.clear();
            for r in routes {
                let row = r.row as usize;
                s.expert_in
                    .extend_from_slice(&s.xn[row * hidden..(row + 1) * hidden]);
            }
            self.mlp(
                &layer.experts[e],
                &s.expert_in,
                routes.len(),
                &mut s.expert_out,
                &mut s.gate_up,
                &mut s.h,
                &mut s.acts,
            )?;
            for (r, out) in routes.iter().zip(s.expert_out.chunks_exact(hidden)) {
                let row = r.row as usize;
                for (p, o) in s.proj[row * hidden..(row + 1) * hidden].iter_mut().zip(out) {
                    *p += r.weight * o;
                }
            }
        }
        Ok(())
    }

    /// The logits of `n` rows (`[n * hidden]`) into `out` (`[n * vocab]`), the head read once.
    pub(crate) fn logits_rows(
        &self,
        rows: &[f32],
        n: usize,
        cache: &mut NativeCache,
        out: &mut Vec<f32>,
    ) -> Option<Result<()>> {
        let head = if self.tied {
            self.embedding.as_ref()?
        } else {
            self.head.as_ref()?
        };
        let norm = self.final_norm.as_ref()?;
        let s = &mut cache.scratch;
        rms_norm(rows, norm, self.eps, &mut s.xn);
        out.resize(n * self.vocab_size, 0.0);
        let result = matmul(head, &s.xn, n, out, &mut s.acts).map_err(kernel_error);
        self.soft_cap(out);
        Some(result)
    }

    /// Rows (`[n * hidden]`) through the final norm into `out`, the model's last hidden states
    /// as embeddings read them. `None` if this shard has no final norm.
    pub(crate) fn final_norm_rows(&self, rows: &[f32], out: &mut Vec<f32>) -> Option<()> {
        let norm = self.final_norm.as_ref()?;
        rms_norm(rows, norm, self.eps, out);
        Some(())
    }

    /// Final norm and head on the last row of `x`, into `out`. `None` if this shard has no head.
    pub(crate) fn logits_into(
        &self,
        x: &[f32],
        cache: &mut NativeCache,
        out: &mut Vec<f32>,
    ) -> Option<Result<()>> {
        let head = if self.tied {
            self.embedding.as_ref()?
        } else {
            self.head.as_ref()?
        };
        let norm = self.final_norm.as_ref()?;
        let last = &x[x.len() - self.hidden..];
        let s = &mut cache.scratch;
        rms_norm(last, norm, self.eps, &mut s.xn);
        out.resize(self.vocab_size, 0.0);
        let result = matmul(head, &s.xn, 1, out, &mut s.acts).map_err(kernel_error);
        self.soft_cap(out);
        Some(result)
    }

    /// Gemma 2's final soft-capping, where the family asks for it.
    fn soft_cap(&self, logits: &mut [f32]) {
        if let Some(cap) = self.logit_softcap {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
    }

    /// Bytes of weights held.
    pub(crate) fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let experts: usize = l
                    .experts
                    .iter()
                    .map(|e| e.gate_up.bytes() + e.down.bytes())
                    .sum();
                l.qkv.bytes()
                    + l.o.bytes()
                    + experts
                    + l.router.as_ref().map_or(0, |r| r.matrix.bytes())
            })
            .sum();
        layers
            + self.embedding.as_ref().map_or(0, QuantMatrix::bytes)
            + self.head.as_ref().map_or(0, QuantMatrix::bytes)
    }
}

/// Row-wise RMSNorm of `x` (`[rows, w.len()]`) into `out`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// RMSNorm of one vector in place (a query or key head).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    x.iter_mut().zip(w).for_each(|(v, g)| *v *= inv * g);
}

/// Adds a block's output `y` to the residual stream `x`, through the output norm `post` (Gemma's
/// sandwich norms) when the layer has one; `y` is overwritten then.
fn add_residual(x: &mut [f32], y: &mut [f32], post: Option<&[f32]>, eps: f32) {
    if let Some(w) = post {
        for row in y.chunks_exact_mut(w.len()) {
            rms_norm_in_place(row, w, eps);
        }
    }
    x.iter_mut().zip(y.iter()).for_each(|(a, b)| *a += b);
}

/// Rotary embedding of one head in Hugging Face's rotate-half layout.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

/// Causal grouped-query attention of `seq` new queries over every cached position. Each
/// (query, head) pair is one task on the kernels' pool when there is enough work to share.
///
/// The segments' rows follow one another in `qkv`; each attends over layer `layer` of its own
/// cache. Nothing is allocated here (a decode step must not allocate).
fn attention(
    qkv: &[f32],
    qkv_width: usize,
    segments: &[Segment<'_>],
    layer: usize,
    shape: Heads,
    out: &mut [f32],
) -> std::result::Result<(), exo_kernels::Error> {
    let Heads {
        heads,
        kv_heads,
        hd,
        scale,
        window,
    } = shape;
    thread_local! {
        /// Attention scores of the head a thread is working on (grows, never shrinks).
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let kvd = kv_heads * hd;
    let group = heads / kv_heads;
    let seq: usize = segments.iter().map(|s| s.rows).sum();
    // The first error of any task (only a bug in the shapes above could cause one).
    let failed = std::sync::Mutex::new(None);
    let task = |i: usize, o: &mut [f32]| {
        let (t, h) = (i / heads, i % heads);
        // The segment holding row `t` (segments are few: a batch's requests).
        let mut first = 0;
        let Some(g) = segments.iter().find(|g| {
            let found = t < first + g.rows;
            if !found {
                first += g.rows;
            }
            found
        }) else {
            return;
        };
        let end = g.start + (t - first) + 1;
        // A sliding window hides the positions before its start.
        let from = window.map_or(0, |w| end.saturating_sub(w));
        let visible = end - from;
        let q = &qkv[t * qkv_width + h * hd..][..hd];
        let kvh = h / group;
        let at = from * kvd + kvh * hd;
        let (keys, values) = (&g.cache.k[layer][at..], &g.cache.v[layer][at..]);
        SCORES.with_borrow_mut(|scores| {
            if scores.len() < visible {
                // In steps of 1024 positions, so that decoding rarely allocates here.
                scores.resize(visible.next_multiple_of(1024), 0.0);
            }
            if let Err(e) = exo_kernels::attend(q, keys, values, kvd, visible, scale, scores, o) {
                let mut first = failed.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert(e);
            }
        });
    };
    let out = &mut out[..seq * heads * hd];
    let work: usize = segments
        .iter()
        .map(|s| s.rows * (s.start + s.rows))
        .sum::<usize>()
        * heads
        * hd;
    // Below this many multiply-adds a hand-off to the pool costs more than it saves.
    if work < 1 << 15 {
        out.chunks_exact_mut(hd)
            .enumerate()
            .for_each(|(i, o)| task(i, o));
    } else {
        exo_kernels::for_each_chunk(out, hd, task);
    }
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
