//! The per-request key/value cache: explicit state owned by the request, passed to `forward`.

use burn::tensor::Tensor;

use crate::native::NativeCache;

/// Keys and values of one layer, `[batch, kv_heads, positions, head_dim]` each.
#[derive(Debug, Default, Clone)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
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

/// The cache of one request on one shard: a [`LayerCache`] per layer the shard holds, and the
/// number of positions already processed.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    /// The cache of a shard on the CPU kernels (then `layers` is empty).
    pub(crate) native: Option<NativeCache>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache for a shard of `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); layers],
            native: None,
            len: 0,
        }
    }

    /// Positions processed so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been processed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An empty cache for a shard of `layers` layers on the CPU kernels.
    pub(crate) fn native(layers: usize) -> Self {
        KvCache {
            layers: Vec::new(),
            native: Some(NativeCache::new(layers)),
            len: 0,
        }
    }

    /// Forgets everything, keeping the layer count.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| l.kv = None);
        if let Some(native) = &mut self.native {
            native.clear();
        }
        self.len = 0;
    }
}
