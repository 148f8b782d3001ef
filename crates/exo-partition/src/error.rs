//! Errors returned by the planner.

use std::fmt;

use crate::format::{bytes, plural};
use crate::node::NodeId;

/// Everything that can stop [`plan`](crate::plan) from producing a plan.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model profile field is zero, inconsistent or out of range.
    #[error("invalid model profile: {field} {problem}")]
    InvalidModel {
        /// The offending field of [`ModelProfile`](crate::ModelProfile) or
        /// [`LlamaShape`](crate::LlamaShape).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The cluster lists no nodes.
    #[error("cluster has no nodes")]
    NoNodes,
    /// Two nodes share an id.
    #[error("node id {id} is listed more than once")]
    DuplicateNode {
        /// The repeated id.
        id: NodeId,
    },
    /// A node's measured throughput is zero, negative, infinite or NaN.
    #[error("node {node}: {field} is {value}, expected a positive finite number")]
    InvalidNode {
        /// The node.
        node: NodeId,
        /// The offending field of [`NodeProfile`](crate::NodeProfile).
        field: &'static str,
        /// The value it had.
        value: f64,
    },
    /// A link names a node that is not in the cluster.
    #[error("link {from} -> {to} names unknown node {unknown}")]
    UnknownLinkNode {
        /// The link's source.
        from: NodeId,
        /// The link's destination.
        to: NodeId,
        /// Whichever of the two is not a cluster node.
        unknown: NodeId,
    },
    /// A link's measurement is unusable, or the link goes from a node to itself.
    #[error("link {from} -> {to}: {problem}")]
    InvalidLink {
        /// The link's source.
        from: NodeId,
        /// The link's destination.
        to: NodeId,
        /// What is wrong with it.
        problem: String,
    },
    /// The request profile cannot be planned for.
    #[error("invalid request profile: {problem}")]
    InvalidRequest {
        /// What is wrong with it.
        problem: String,
    },
    /// The cluster cannot hold the model's weights plus the KV cache the request reserves.
    #[error("{0}")]
    InsufficientMemory(Box<MemoryShortfall>),
}

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How far a cluster is from holding a model, and what would fit instead.
///
/// Carried by [`Error::InsufficientMemory`]; its `Display` is the error message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryShortfall {
    /// Weights plus reserved KV cache for the whole model.
    pub needed_bytes: u64,
    /// The memory all nodes offer together.
    pub available_bytes: u64,
    /// How much memory is missing. When the nodes offer enough in total but whole layers do
    /// not fit on them, this is what one node would need on top to take the layers left over.
    pub shortfall_bytes: u64,
    /// The model's weights: every layer, the embedding and the output head.
    pub weight_bytes: u64,
    /// The KV cache reserved for `context_len` tokens times `concurrent_requests`.
    pub kv_cache_bytes: u64,
    /// The context length the request asked to reserve.
    pub context_len: u64,
    /// The concurrent requests the request asked to reserve for.
    pub concurrent_requests: u32,
    /// The model's layer count.
    pub layers: u32,
    /// The largest context (same concurrency) for which the model fits, or `None` when even a
    /// one-token context does not.
    pub max_context_that_fits: Option<u64>,
    /// The most layers of this model that fit at the requested context.
    pub max_layers_that_fit: u32,
    /// Weights of the largest model of this shape that fits at the requested context: the
    /// embedding, the head and `max_layers_that_fit` layers (0 when not even one layer fits).
    pub max_model_bytes_that_fit: u64,
}

impl fmt::Display for MemoryShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cache = format!(
            "{} of KV cache for {} x {}",
            bytes(self.kv_cache_bytes),
            plural(self.context_len, "token"),
            plural(u64::from(self.concurrent_requests), "request"),
        );
        if self.needed_bytes > self.available_bytes {
            write!(
                f,
                "cluster offers {} but the model needs {} of weights plus {cache}: short by {}",
                bytes(self.available_bytes),
                bytes(self.weight_bytes),
                bytes(self.shortfall_bytes),
            )?;
        } else {
            write!(
                f,
                "cluster offers {}, enough in total for the {} of weights plus {cache}, but its \
                 nodes hold whole layers for only {} of {}: short by {} on one node",
                bytes(self.available_bytes),
                bytes(self.weight_bytes),
                self.max_layers_that_fit,
                self.layers,
                bytes(self.shortfall_bytes),
            )?;
        }
        match self.max_context_that_fits {
            Some(context) => write!(
                f,
                "; the largest context that fits is {}",
                plural(context, "token")
            ),
            None if self.max_layers_that_fit > 0 => write!(
                f,
                "; no context fits: the largest model of this shape that fits has {} of {} \
                 layers ({} of weights)",
                self.max_layers_that_fit,
                self.layers,
                bytes(self.max_model_bytes_that_fit),
            ),
            None => write!(
                f,
                "; no node can hold even the embedding or the head with one layer"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shortfall() -> MemoryShortfall {
        MemoryShortfall {
            needed_bytes: 5 << 30,
            available_bytes: 3 << 30,
            shortfall_bytes: 2 << 30,
            weight_bytes: 4 << 30,
            kv_cache_bytes: 1 << 30,
            context_len: 4096,
            concurrent_requests: 1,
            layers: 32,
            max_context_that_fits: Some(1024),
            max_layers_that_fit: 20,
            max_model_bytes_that_fit: 3 << 30,
        }
    }

    #[test]
    fn shortfall_message_names_bytes_and_largest_context() {
        let message = Error::InsufficientMemory(Box::new(shortfall())).to_string();
        assert_eq!(
            message,
            "cluster offers 3.0 GiB but the model needs 4.0 GiB of weights plus 1.0 GiB of KV \
             cache for 4096 tokens x 1 request: short by 2.0 GiB; the largest context that fits \
             is 1024 tokens"
        );
    }

    #[test]
    fn shortfall_message_names_largest_model_when_no_context_fits() {
        let mut s = shortfall();
        s.max_context_that_fits = None;
        let message = s.to_string();
        assert!(
            message.ends_with("has 20 of 32 layers (3.0 GiB of weights)"),
            "{message}"
        );
    }

    #[test]
    fn fragmentation_message_says_layers_do_not_fit_whole() {
        let mut s = shortfall();
        s.available_bytes = 6 << 30;
        s.shortfall_bytes = 1 << 30;
        let message = s.to_string();
        assert!(
            message.contains("whole layers for only 20 of 32"),
            "{message}"
        );
    }
}
