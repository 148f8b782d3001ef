//! The per-request key/value cache: explicit state owned by the request, passed to `forward`.

use crate::layers::LayerCache;
use crate::native::NativeCache;

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

    /// A cache holding this one's first `positions` keys and values, for a request that starts
    /// from another's prompt; `None` when this one holds fewer.
    pub fn prefix(&self, positions: usize) -> Option<KvCache> {
        if positions > self.len {
            return None;
        }
        Some(KvCache {
            layers: self.layers.iter().map(|l| l.prefix(positions)).collect(),
            native: self.native.as_ref().map(|n| n.prefix(self.len, positions)),
            len: positions,
        })
    }

    /// Forgets everything, keeping the layer count.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(LayerCache::clear);
        if let Some(native) = &mut self.native {
            native.clear();
        }
        self.len = 0;
    }
}
