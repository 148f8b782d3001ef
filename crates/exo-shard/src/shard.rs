//! A shard of a Llama-family model: a contiguous range of decoder layers, plus the embedding on
//! the first stage and the final norm and head on the last. Its weights are either burn tensors
//! (any backend, f32) or compact matrices on the CPU kernels; the entry points are the same.

use burn::tensor::{Device, Tensor, TensorData};
use exo_model::{Checkpoint, ModelConfig, ShardSpec, ShardWeights};

use crate::burn_shard::BurnShard;
use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::native::{NativeShard, Segment, Weights};

// Shards are few and long-lived; boxing either variant would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Kind {
    Burn(BurnShard),
    Native(NativeShard),
}

/// One stage's part of the model, on one device.
#[derive(Debug)]
pub struct LlamaShard {
    kind: Kind,
    device: Device,
}

impl LlamaShard {
    /// Reads the shard's tensors from `checkpoint` (and only those) onto `device`, as f32.
    pub fn load(checkpoint: &Checkpoint, spec: &ShardSpec, device: &Device) -> Result<Self> {
        Self::load_with(checkpoint, spec, device, Weights::F32)
    }

    /// As [`LlamaShard::load`], keeping or converting weights as `weights` says. Anything but
    /// [`Weights::F32`] runs on the CPU kernels; `device` must then be a CPU device, and only
    /// carries the activations handed in and out.
    pub fn load_with(
        checkpoint: &Checkpoint,
        spec: &ShardSpec,
        device: &Device,
        weights: Weights,
    ) -> Result<Self> {
        let kind = match weights {
            Weights::F32 => Kind::Burn(BurnShard::load(checkpoint, spec, device)?),
            other => Kind::Native(NativeShard::load(checkpoint, spec, other)?),
        };
        Ok(LlamaShard {
            kind,
            device: device.clone(),
        })
    }

    /// Builds an f32 shard from weights already in host memory.
    pub fn from_weights(
        config: &ModelConfig,
        weights: &ShardWeights,
        device: &Device,
    ) -> Result<Self> {
        Ok(LlamaShard {
            kind: Kind::Burn(BurnShard::from_weights(config, weights, device)?),
            device: device.clone(),
        })
    }

    /// Whether the shard runs on the CPU kernels (compact weights) rather than burn.
    pub fn is_native(&self) -> bool {
        matches!(self.kind, Kind::Native(_))
    }

    /// Bytes of weights held by a shard on the CPU kernels (`None` for burn shards).
    pub fn native_weight_bytes(&self) -> Option<usize> {
        match &self.kind {
            Kind::Native(n) => Some(n.weight_bytes()),
            Kind::Burn(_) => None,
        }
    }

    /// The layers this shard holds, as a model-wide range.
    pub fn layer_range(&self) -> std::ops::Range<usize> {
        match &self.kind {
            Kind::Burn(b) => b.layer_range(),
            Kind::Native(n) => n.first_layer..n.first_layer + n.layer_count(),
        }
    }

    /// Whether this shard embeds tokens (it is the first stage).
    pub fn has_embedding(&self) -> bool {
        match &self.kind {
            Kind::Burn(b) => b.has_embedding(),
            Kind::Native(n) => n.has_embedding(),
        }
    }

    /// Whether this shard computes logits (it is the last stage).
    pub fn has_head(&self) -> bool {
        match &self.kind {
            Kind::Burn(b) => b.has_head(),
            Kind::Native(n) => n.has_head(),
        }
    }

    /// Width of the activations this shard takes and returns.
    pub fn hidden_size(&self) -> usize {
        match &self.kind {
            Kind::Burn(b) => b.hidden_size(),
            Kind::Native(n) => n.hidden,
        }
    }

    /// A fresh KV cache for one request on this shard.
    pub fn new_cache(&self) -> KvCache {
        match &self.kind {
            Kind::Burn(b) => b.new_cache(),
            Kind::Native(n) => KvCache::native(n.layer_count()),
        }
    }

    /// The device activations live on.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    fn not_held(&self, part: &'static str) -> Error {
        Error::NotHeld {
            part,
            layers: format!("{:?}", self.layer_range()),
        }
    }

    /// Positions and width of a host buffer of activations: whole rows of the hidden width, at
    /// least one.
    fn host_rows(&self, x: &[f32]) -> Result<(usize, usize)> {
        let hidden = self.hidden_size();
        if hidden == 0 || x.is_empty() || !x.len().is_multiple_of(hidden) {
            return Err(Error::Shape {
                what: "activations".into(),
                expected: vec![x.len().div_ceil(hidden.max(1)).max(1), hidden],
                actual: vec![x.len()],
            });
        }
        Ok((x.len() / hidden, hidden))
    }

    fn to_tensor(&self, data: Vec<f32>, seq: usize, hidden: usize) -> Tensor<3> {
        Tensor::from_data(TensorData::new(data, [1, seq, hidden]), &self.device)
    }

    /// Looks up token embeddings (first stage only).
    ///
    /// Shapes: tokens [seq] -> [1, seq, hidden]
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor<3>> {
        match &self.kind {
            Kind::Burn(b) => b.embed(tokens),
            Kind::Native(n) => {
                let mut data = Vec::new();
                self.embed_into(tokens, &mut data)?;
                Ok(self.to_tensor(data, tokens.len(), n.hidden))
            }
        }
    }

    /// [`LlamaShard::embed`] into a host buffer the caller reuses (`[seq * hidden]`).
    pub fn embed_into(&self, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let n = match &self.kind {
            Kind::Burn(b) => return read_into(b.embed(tokens)?, out),
            Kind::Native(n) => n,
        };
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab: n.vocab_size,
            });
        }
        n.embed_into(tokens, out)
            .ok_or_else(|| self.not_held("embedding"))?
    }

    /// Runs this shard's layers on activations for the positions after those already in `cache`.
    ///
    /// Shapes: x [1, seq, hidden] -> [1, seq, hidden]
    pub fn forward(&self, x: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        let n = match &self.kind {
            Kind::Burn(b) => return b.forward(x, cache),
            Kind::Native(n) => n,
        };
        let [batch, seq, hidden] = x.dims();
        if batch != 1 || hidden != n.hidden {
            return Err(Error::Shape {
                what: "activations".into(),
                expected: vec![1, seq.max(1), n.hidden],
                actual: vec![batch, seq, hidden],
            });
        }
        let mut data = read(x)?;
        self.forward_in_place(&mut data, cache)?;
        Ok(self.to_tensor(data, seq, hidden))
    }

    /// [`LlamaShard::forward`] on a host buffer (`[seq * hidden]`), in place. On the CPU kernels
    /// it allocates nothing once `cache` has room (see [`LlamaShard::reserve`]).
    pub fn forward_in_place(&self, x: &mut [f32], cache: &mut KvCache) -> Result<()> {
        let (seq, hidden) = self.host_rows(x)?;
        let n = match &self.kind {
            Kind::Burn(b) => {
                let y = read(b.forward(self.to_tensor(x.to_vec(), seq, hidden), cache)?)?;
                x.copy_from_slice(&y);
                return Ok(());
            }
            Kind::Native(n) => n,
        };
        let native = match &mut cache.native {
            Some(c) if c.layers() == n.layer_count() => c,
            other => {
                return Err(Error::CacheMismatch {
                    expected: n.layer_count(),
                    actual: other.as_ref().map_or(cache.layers.len(), |c| c.layers()),
                });
            }
        };
        let start = cache.len;
        if start + seq > n.max_positions {
            return Err(Error::ContextFull {
                needed: start + seq,
                max: n.max_positions,
            });
        }
        n.forward(x, seq, start, native)?;
        cache.len = start + seq;
        Ok(())
    }

    /// Makes room in `cache` for `positions` positions in all (capped at the model's context),
    /// so that the steps up to there allocate nothing for keys and values.
    pub fn reserve(&self, cache: &mut KvCache, positions: usize) {
        if let (Kind::Native(n), Some(native)) = (&self.kind, &mut cache.native) {
            n.reserve(native, positions.min(n.max_positions));
        }
    }

    /// Final norm and head on the last position (last stage only).
    ///
    /// Shapes: x [1, seq, hidden] -> logits [1, vocab]
    pub fn logits(&self, x: Tensor<3>) -> Result<Tensor<2>> {
        match &self.kind {
            Kind::Burn(b) => b.logits(x),
            Kind::Native(n) => {
                let logits = self.logits_vec(x)?;
                Ok(Tensor::from_data(
                    TensorData::new(logits, [1, n.vocab_size]),
                    &self.device,
                ))
            }
        }
    }

    /// [`LlamaShard::logits`] read back to the host.
    pub fn logits_vec(&self, x: Tensor<3>) -> Result<Vec<f32>> {
        if let Kind::Burn(b) = &self.kind {
            return b.logits_vec(x);
        }
        let mut out = Vec::new();
        let mut scratch = self.new_cache();
        self.logits_into(&read(x)?, &mut scratch, &mut out)?;
        Ok(out)
    }

    /// The last position's logits from a host buffer of activations (`[seq * hidden]`) into
    /// `out` (`[vocab]`); `cache` lends its scratch buffers, so a decoding loop on the CPU
    /// kernels allocates nothing here.
    pub fn logits_into(&self, x: &[f32], cache: &mut KvCache, out: &mut Vec<f32>) -> Result<()> {
        let (seq, hidden) = self.host_rows(x)?;
        let n = match &self.kind {
            Kind::Burn(b) => {
                let logits = b.logits_vec(self.to_tensor(x.to_vec(), seq, hidden))?;
                out.clear();
                out.extend_from_slice(&logits);
                return Ok(());
            }
            Kind::Native(n) => n,
        };
        let scratch = match &mut cache.native {
            Some(c) => c,
            None => {
                return Err(Error::CacheMismatch {
                    expected: n.layer_count(),
                    actual: cache.layers.len(),
                });
            }
        };
        n.logits_into(x, scratch, out)
            .ok_or_else(|| self.not_held("head"))?
    }
}

impl LlamaShard {
    /// Runs one step of several requests at once: `x` holds their rows one request after
    /// another, and `batch` lists, in the same order, each request's cache and row count.
    /// Each request's rows go at the positions after those its cache holds.
    ///
    /// Shapes: x [Σ rows * hidden] -> [Σ rows * hidden], in place
    pub fn forward_batch(&self, x: &mut [f32], batch: &mut [(&mut KvCache, usize)]) -> Result<()> {
        let (rows, hidden) = self.host_rows(x)?;
        let total: usize = batch.iter().map(|(_, r)| *r).sum();
        if total != rows {
            return Err(Error::Shape {
                what: "batched activations".into(),
                expected: vec![total, hidden],
                actual: vec![rows, hidden],
            });
        }
        let n = match &self.kind {
            Kind::Native(n) => n,
            Kind::Burn(_) => {
                // burn runs one request at a time.
                let mut rest = x;
                for (cache, rows) in batch.iter_mut() {
                    let (mine, tail) = rest.split_at_mut(*rows * hidden);
                    rest = tail;
                    if *rows > 0 {
                        self.forward_in_place(mine, cache)?;
                    }
                }
                return Ok(());
            }
        };
        // Every cache must be this shard's and have room, before anything runs.
        for (cache, rows) in batch.iter() {
            match &cache.native {
                Some(c) if c.layers() == n.layer_count() => {}
                other => {
                    return Err(Error::CacheMismatch {
                        expected: n.layer_count(),
                        actual: other.as_ref().map_or(cache.layers.len(), |c| c.layers()),
                    });
                }
            }
            if cache.len + rows > n.max_positions {
                return Err(Error::ContextFull {
                    needed: cache.len + rows,
                    max: n.max_positions,
                });
            }
        }
        let mut scratch = None;
        let result = {
            let mut segments: Vec<Segment<'_>> = Vec::with_capacity(batch.len());
            for (cache, rows) in batch.iter_mut().filter(|(_, rows)| *rows > 0) {
                let start = cache.len;
                if let Some(native) = cache.native.as_mut() {
                    if scratch.is_none() {
                        scratch = Some(native.take_scratch());
                    }
                    segments.push(Segment {
                        cache: native,
                        start,
                        rows: *rows,
                    });
                }
            }
            let mut lent = scratch.take().unwrap_or_default();
            let result = n.forward_batch(x, &mut segments, &mut lent);
            if let Some(first) = segments.first_mut() {
                first.cache.put_scratch(lent);
            }
            result
        };
        result?;
        for (cache, rows) in batch.iter_mut() {
            cache.len += *rows;
        }
        Ok(())
    }

    /// Logits of `n` rows at once (the last row of each of `n` requests), into `out`
    /// (`[n * vocab]`); `cache` lends its scratch buffers.
    ///
    /// Shapes: rows [n * hidden] -> out [n * vocab]
    pub fn logits_rows(&self, rows: &[f32], cache: &mut KvCache, out: &mut Vec<f32>) -> Result<()> {
        let (count, hidden) = self.host_rows(rows)?;
        if let (Kind::Native(n), Some(native)) = (&self.kind, cache.native.as_mut()) {
            return n
                .logits_rows(rows, count, native, out)
                .ok_or_else(|| self.not_held("head"))?;
        }
        out.clear();
        let mut one = Vec::new();
        for row in rows.chunks_exact(hidden).take(count) {
            self.logits_into(row, cache, &mut one)?;
            out.extend_from_slice(&one);
        }
        Ok(())
    }

    /// Rows of activations (`[n * hidden]`, from the last layer) through the final norm, into
    /// `out`: the last hidden states that embeddings pool (last stage only).
    ///
    /// Shapes: rows [n * hidden] -> out [n * hidden]
    pub fn final_norm_rows(&self, rows: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let (count, hidden) = self.host_rows(rows)?;
        match &self.kind {
            Kind::Native(n) => n
                .final_norm_rows(rows, out)
                .ok_or_else(|| self.not_held("final norm")),
            Kind::Burn(b) => {
                let normed = b.final_norm(self.to_tensor(rows.to_vec(), count, hidden))?;
                *out = read(normed)?;
                Ok(())
            }
        }
    }

    /// Positions a request may hold in all (the model's context).
    pub fn max_positions(&self) -> usize {
        match &self.kind {
            Kind::Burn(b) => b.max_positions(),
            Kind::Native(n) => n.max_positions,
        }
    }

    /// Bytes of keys and values one position takes in a cache of this shard.
    pub fn kv_bytes_per_position(&self) -> usize {
        match &self.kind {
            Kind::Burn(b) => b.kv_bytes_per_position(),
            Kind::Native(n) => n.kv_bytes_per_position(),
        }
    }
}

/// A tensor's values on the host.
fn read<const D: usize>(x: Tensor<D>) -> Result<Vec<f32>> {
    x.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Backend(format!("reading activations: {e:?}")))
}

/// A tensor's values into a host buffer the caller reuses.
fn read_into<const D: usize>(x: Tensor<D>, out: &mut Vec<f32>) -> Result<()> {
    let values = read(x)?;
    out.clear();
    out.extend_from_slice(&values);
    Ok(())
}
