//! The building blocks of a Llama-family decoder: linear projections, RMSNorm, rotary
//! embeddings, attention with a KV cache, and the gated MLP, with what the configuration's
//! [`exo_model::Variant`] changes (query/key norms, sandwich norms, GELU, sliding windows).

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};

use exo_model::{Activation, HostTensor, ModelConfig};

/// Uploads a host tensor of shape `[rows, cols]`, transposed to `[cols, rows]` when asked.
pub(crate) fn tensor2(t: &HostTensor, transpose: bool, device: &Device) -> Tensor<2> {
    let (rows, cols) = (t.shape[0], t.shape.get(1).copied().unwrap_or(1));
    let tensor = Tensor::<2>::from_data(TensorData::new(t.data.clone(), [rows, cols]), device);
    if transpose {
        // Materialise the transposed layout once at load time, not on every token.
        let data = tensor.transpose().into_data();
        Tensor::<2>::from_data(data, device)
    } else {
        tensor
    }
}

pub(crate) fn tensor1(t: &HostTensor, device: &Device) -> Tensor<1> {
    Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device)
}

/// A linear projection `y = x W^T + b`. The weight is kept as `[in, out]` so that the forward
/// pass is one matmul. This is the layer a later quantized CPU kernel replaces.
#[derive(Module, Debug)]
pub struct Linear {
    weight: Param<Tensor<2>>,
    bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// From a Hugging Face `[out, in]` weight and an optional `[out]` bias.
    pub(crate) fn load(weight: &HostTensor, bias: Option<&HostTensor>, device: &Device) -> Self {
        Linear {
            weight: Param::from_tensor(tensor2(weight, true, device)),
            bias: bias.map(|b| Param::from_tensor(tensor1(b, device))),
        }
    }

    /// Shapes: x [batch, seq, in] -> [batch, seq, out]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        burn::tensor::module::linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Module, Debug)]
pub struct RmsNorm {
    weight: Param<Tensor<1>>,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(weight: &HostTensor, eps: f64, device: &Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(tensor1(weight, device)),
            eps,
        }
    }

    /// Shapes: x [batch, seq, hidden] -> [batch, seq, hidden]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_last(x)
    }

    /// Normalises over the last axis, of any rank (a head's values in `[batch, heads, seq,
    /// head_dim]`).
    pub fn forward_last<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt();
        let mut shape = [1; D];
        shape[D - 1] = self.weight.dims()[0];
        (x / rms) * self.weight.val().reshape(shape)
    }
}

/// Precomputed rotary-embedding tables (Hugging Face's "rotate half" layout).
#[derive(Module, Debug)]
pub struct Rope {
    /// `[max_positions, head_dim]`
    cos: Tensor<2>,
    /// `[max_positions, head_dim]`
    sin: Tensor<2>,
}

impl Rope {
    /// The tables of rotary base `theta`, with linear scaling by `linear` when given.
    pub(crate) fn new(
        config: &ModelConfig,
        theta: f64,
        linear: Option<f64>,
        device: &Device,
    ) -> Self {
        let RopeTables {
            cos: cos_half,
            sin: sin_half,
            ..
        } = rope_tables(config, theta, linear);
        let dim = config.head_dim;
        let half = dim / 2;
        let max = cos_half.len() / half.max(1);
        // Both halves of a head share the same frequencies.
        let widen = |t: &[f32]| -> Vec<f32> {
            t.chunks_exact(half)
                .flat_map(|r| r.iter().chain(r))
                .copied()
                .collect()
        };
        Rope {
            cos: Tensor::from_data(TensorData::new(widen(&cos_half), [max, dim]), device),
            sin: Tensor::from_data(TensorData::new(widen(&sin_half), [max, dim]), device),
        }
    }

    /// How many positions the tables cover.
    pub(crate) fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Shapes: x [batch, heads, seq, head_dim] at positions `start..start+seq` -> same
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let [_, _, seq, dim] = x.dims();
        let cos = self
            .cos
            .clone()
            .narrow(0, start, seq)
            .reshape([1, 1, seq, dim]);
        let sin = self
            .sin
            .clone()
            .narrow(0, start, seq)
            .reshape([1, 1, seq, dim]);
        let half = dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

/// Rotary tables `[positions, head_dim / 2]`: cosines and sines of each position's angles.
#[derive(Clone, Debug, Default)]
pub(crate) struct RopeTables {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    half: usize,
}

impl RopeTables {
    /// The cosines and sines of position `pos`.
    pub(crate) fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let h = self.half;
        (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        )
    }
}

impl RopeTables {
    /// Replaces the rows with those of `positions`, in order (row `i` for the `i`-th position),
    /// from the frequencies of [`rope_frequencies`]: one step's rows, computed as the whole
    /// table would compute them.
    pub(crate) fn fill(&mut self, inv_freq: &[f32], positions: impl Iterator<Item = usize>) {
        self.half = inv_freq.len();
        self.cos.clear();
        self.sin.clear();
        for pos in positions {
            for f in inv_freq {
                let angle = pos as f32 * f;
                self.cos.push(angle.cos());
                self.sin.push(angle.sin());
            }
        }
    }
}

/// Rotary tables of base `theta` for every position the configuration allows (see
/// [`rope_frequencies`]). Angles are computed in f32, as the reference implementation does.
pub(crate) fn rope_tables(config: &ModelConfig, theta: f64, linear: Option<f64>) -> RopeTables {
    let max = config.max_position_embeddings.max(1);
    let mut tables = RopeTables::default();
    tables.fill(&rope_frequencies(config, theta, linear), 0..max);
    tables
}

/// The rotary frequencies of base `theta` (`head_dim / 2` of them), with llama3 frequency
/// scaling when the configuration asks for it, Llama 3.x GGUF's per-frequency divisors, and
/// linear scaling (positions divided by `linear`) when given.
pub(crate) fn rope_frequencies(config: &ModelConfig, theta: f64, linear: Option<f64>) -> Vec<f32> {
    let dim = config.head_dim;
    (0..dim / 2)
        .map(|i| {
            // Llama 3.x GGUF files divide each frequency by its own factor.
            let factor = config
                .variant
                .rope_freq_factors
                .as_ref()
                .and_then(|f| f.get(i))
                .copied()
                .unwrap_or(1.0);
            1.0 / theta.powf((2 * i) as f64 / dim as f64) / linear.unwrap_or(1.0) / factor
        })
        .map(|f| match &config.rope_scaling {
            None => f,
            Some(s) => {
                let original = s.original_max_position_embeddings as f64;
                let low_wavelen = original / s.low_freq_factor;
                let high_wavelen = original / s.high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (original / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            }
        })
        .map(|f| f as f32)
        .collect()
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Per-head norms of queries and keys (Qwen3, Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// Positions a query sees in a sliding-window layer.
    window: Option<usize>,
}

impl Attention {
    pub(crate) fn load(
        w: &exo_model::LayerWeights,
        config: &ModelConfig,
        window: Option<usize>,
        device: &Device,
    ) -> Self {
        let bias = w.qkv_bias.as_ref();
        let eps = config.rms_norm_eps;
        let norm = |i: usize| {
            w.qk_norm
                .as_ref()
                .map(|n| RmsNorm::load(&n[i], eps, device))
        };
        Attention {
            q: Linear::load(&w.q, bias.map(|b| &b[0]), device),
            k: Linear::load(&w.k, bias.map(|b| &b[1]), device),
            v: Linear::load(&w.v, bias.map(|b| &b[2]), device),
            o: Linear::load(&w.o, None, device),
            q_norm: norm(0),
            k_norm: norm(1),
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            scale: config
                .variant
                .attention_scale
                .unwrap_or(1.0 / (config.head_dim as f64).sqrt()),
            window,
        }
    }

    /// Shapes: x [batch, seq, hidden] at positions `start..start+seq` -> [batch, seq, hidden]
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: &mut LayerCache,
        start: usize,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q
            .forward(x.clone())
            .reshape([batch, seq, h, d])
            .swap_dims(1, 2);
        let k = self
            .k
            .forward(x.clone())
            .reshape([batch, seq, kvh, d])
            .swap_dims(1, 2);
        let v = self
            .v
            .forward(x)
            .reshape([batch, seq, kvh, d])
            .swap_dims(1, 2);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward_last(q), kn.forward_last(k)),
            _ => (q, k),
        };
        let q = rope.apply(q, start);
        let k = rope.apply(k, start);
        let (k, v) = cache.append(k, v);
        let total = k.dims()[2];

        // Query heads that share a key/value head are stacked along the sequence axis, so one
        // batched matmul per kv head serves them all without copying the cache.
        let group = h / kvh;
        let q = q.reshape([batch, kvh, group * seq, d]);
        let mut scores = q.matmul(k.swap_dims(2, 3)) * self.scale;
        let windowed = self.window.is_some_and(|w| total > w);
        if seq > 1 || windowed {
            let mask = causal_mask(seq, total, group, self.window, &scores.device());
            scores = scores + mask;
        }
        let probs = softmax(scores, 3);
        let out = probs.matmul(v); // [batch, kvh, group*seq, d]
        let out = out
            .reshape([batch, h, seq, d])
            .swap_dims(1, 2)
            .reshape([batch, seq, h * d]);
        self.o.forward(out)
    }
}

/// Additive mask `[1, 1, group*seq, total]`: query `i` (at position `total - seq + i`) sees keys
/// up to its own position, and with a sliding `window` only the last `window` of them.
fn causal_mask(
    seq: usize,
    total: usize,
    group: usize,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4> {
    let past = total - seq;
    let mut data = Vec::with_capacity(group * seq * total);
    for _ in 0..group {
        for i in 0..seq {
            let pos = past + i;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            data.extend((0..total).map(|j| {
                if j > pos || j < first {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            }));
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 1, group * seq, total]), device)
}

/// One gated feed-forward network (SwiGLU, or GELU-gated for Gemma): a dense layer's MLP or
/// one expert of a mixture.
#[derive(Module, Debug)]
pub struct Ffn {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Ffn {
    /// Shapes: x [batch, seq, hidden] -> [batch, seq, hidden]
    fn forward(&self, x: Tensor<3>, gelu: bool) -> Tensor<3> {
        let g = self.gate.forward(x.clone());
        let gate = if gelu {
            // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            let inner =
                (g.clone() + g.clone().powi_scalar(3) * 0.044_715) * 0.797_884_560_802_865_4;
            g * (inner.tanh() + 1.0) * 0.5
        } else {
            silu(g)
        };
        self.down.forward(gate * self.up.forward(x))
    }
}

/// The MLP block: one feed-forward network, or a mixture of experts whose router sends each
/// token to a few of them.
#[derive(Module, Debug)]
pub struct Mlp {
    /// One network in a dense layer; every expert of a mixture.
    experts: Vec<Ffn>,
    /// The mixture's router (`[hidden] -> [experts]`); `None` in a dense layer.
    router: Option<Linear>,
    per_token: usize,
    normalize: bool,
    /// Whether the gate takes GELU (tanh approximation) instead of SiLU.
    gelu: bool,
}

impl Mlp {
    pub(crate) fn load(w: &exo_model::LayerWeights, config: &ModelConfig, device: &Device) -> Self {
        let moe = config.variant.moe;
        Mlp {
            experts: w
                .experts
                .iter()
                .map(|[gate, up, down]| Ffn {
                    gate: Linear::load(gate, None, device),
                    up: Linear::load(up, None, device),
                    down: Linear::load(down, None, device),
                })
                .collect(),
            router: w.router.as_ref().map(|r| Linear::load(r, None, device)),
            per_token: moe.map_or(1, |m| m.experts_per_token),
            normalize: moe.is_some_and(|m| m.normalize),
            gelu: config.variant.activation == Activation::GeluTanh,
        }
    }

    /// Shapes: x [batch, seq, hidden] -> [batch, seq, hidden]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let Some(router) = &self.router else {
            return self.experts[0].forward(x, self.gelu);
        };
        // A mixture: the routing is decided on the host (as the CPU kernels decide it), each
        // expert runs on the rows sent to it, and the weighted outputs are summed there too.
        let [batch, seq, hidden] = x.dims();
        let device = x.device();
        let rows = batch * seq;
        // An f32 tensor always reads back as f32.
        let host = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().unwrap_or_default();
        let mut logits = host(router.forward(x.clone()));
        let xs = host(x);
        let mut routes = Vec::new();
        let experts = self.experts.len();
        crate::moe::route(
            &mut logits,
            experts,
            self.per_token,
            self.normalize,
            &mut routes,
        );
        let mut out = vec![0f32; rows * hidden];
        for (e, run) in crate::moe::runs(&routes) {
            let routes = &routes[run];
            let input: Vec<f32> = routes
                .iter()
                .flat_map(|r| {
                    let row = r.row as usize;
                    xs[row * hidden..(row + 1) * hidden].iter().copied()
                })
                .collect();
            let input =
                Tensor::<3>::from_data(TensorData::new(input, [1, routes.len(), hidden]), &device);
            let y = host(self.experts[e].forward(input, self.gelu));
            for (r, y) in routes.iter().zip(y.chunks_exact(hidden)) {
                let row = r.row as usize;
                for (o, v) in out[row * hidden..(row + 1) * hidden].iter_mut().zip(y) {
                    *o += r.weight * v;
                }
            }
        }
        Tensor::<3>::from_data(TensorData::new(out, [batch, seq, hidden]), &device)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual connection
/// (through an output norm too, in Gemma's sandwich layout).
#[derive(Module, Debug)]
pub struct DecoderLayer {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
    post_attn_norm: Option<RmsNorm>,
    post_mlp_norm: Option<RmsNorm>,
    /// Whether the layer takes the local (sliding-window) rotary tables.
    pub(crate) local_rope: bool,
}

impl DecoderLayer {
    /// Layer number `layer` of the model, from its weights.
    pub(crate) fn load(
        w: &exo_model::LayerWeights,
        layer: usize,
        config: &ModelConfig,
        device: &Device,
    ) -> Self {
        let eps = config.rms_norm_eps;
        let window = config.window_of(layer);
        let post = |i: usize| {
            w.post_norms
                .as_ref()
                .map(|n| RmsNorm::load(&n[i], eps, device))
        };
        DecoderLayer {
            attn_norm: RmsNorm::load(&w.attn_norm, eps, device),
            attn: Attention::load(w, config, window, device),
            mlp_norm: RmsNorm::load(&w.mlp_norm, eps, device),
            mlp: Mlp::load(w, config, device),
            post_attn_norm: post(0),
            post_mlp_norm: post(1),
            local_rope: config.uses_local_rope(layer),
        }
    }

    /// Shapes: x [batch, seq, hidden] -> [batch, seq, hidden]
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: &mut LayerCache,
        start: usize,
    ) -> Tensor<3> {
        let post = |norm: &Option<RmsNorm>, y: Tensor<3>| match norm {
            Some(n) => n.forward(y),
            None => y,
        };
        let a = self
            .attn
            .forward(self.attn_norm.forward(x.clone()), rope, cache, start);
        let x = x + post(&self.post_attn_norm, a);
        let m = self.mlp.forward(self.mlp_norm.forward(x.clone()));
        x + post(&self.post_mlp_norm, m)
    }
}

/// Keys and values of one layer, `[batch, kv_heads, positions, head_dim]` each.
#[derive(Debug, Default, Clone)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Forgets what it holds.
    pub(crate) fn clear(&mut self) {
        self.kv = None;
    }

    /// The first `positions` keys and values (the cache must hold that many).
    pub(crate) fn prefix(&self, positions: usize) -> LayerCache {
        LayerCache {
            kv: self.kv.as_ref().filter(|_| positions > 0).map(|(k, v)| {
                (
                    k.clone().narrow(2, 0, positions),
                    v.clone().narrow(2, 0, positions),
                )
            }),
        }
    }

    /// Appends this step's keys and values and returns everything cached so far.
    pub(crate) fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}
