//! The planner's output: a ring of stages, a prediction and an explanation.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::node::NodeId;

/// How to split the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// exo's ring memory-weighted split, kept as the baseline: every node, ordered by memory
    /// (largest first), takes a share of the layers proportional to the memory it offers.
    /// Compute and links are ignored; the result is costed with the same model as ours.
    MemoryWeighted,
    /// Ours: the plan with the least predicted decode time per token that fits every node's
    /// memory, choosing which nodes take part, the ring order and tensor-parallel groups.
    CostOptimal,
}

/// A half-open range of layer indices, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    /// First layer held.
    pub start: u32,
    /// One past the last layer held.
    pub end: u32,
}

impl LayerRange {
    /// Number of layers in the range.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no layer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// One node's part of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMember {
    /// The node.
    pub node: NodeId,
    /// KV heads of every layer in the stage this node computes (all of them when it holds
    /// the stage alone).
    pub kv_heads: u32,
    /// Query heads that go with those KV heads.
    pub attention_heads: u32,
    /// MLP columns of every layer in the stage this node computes.
    pub mlp_columns: u32,
    /// Weight bytes the node holds: its share of the stage's layers, plus the embedding or the
    /// head when it is the stage's lead and the stage is first or last.
    pub weight_bytes: u64,
    /// KV-cache bytes the node reserves: its share of the KV heads, for the requested context
    /// and concurrency.
    pub kv_cache_bytes: u64,
}

impl StageMember {
    /// Weights plus KV cache: what this member needs of the memory its node offers.
    pub fn total_bytes(&self) -> u64 {
        self.weight_bytes.saturating_add(self.kv_cache_bytes)
    }
}

/// A contiguous range of layers held by one node, or by a tensor-parallel group of nodes that
/// split every layer in it by whole KV heads and MLP columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The layers this stage runs.
    pub layers: LayerRange,
    /// The nodes that run them. The first member is the stage's lead: it receives the
    /// activation, forwards it to the others, sends the result on, and holds the embedding or
    /// the head when the stage has one.
    pub members: Vec<StageMember>,
    /// Whether this stage embeds tokens (the first stage).
    pub holds_embedding: bool,
    /// Whether this stage runs the output head and samples (the last stage).
    pub holds_head: bool,
}

impl Stage {
    /// The node that leads this stage.
    pub fn lead(&self) -> Option<&NodeId> {
        self.members.first().map(|m| &m.node)
    }

    /// Whether this stage is a tensor-parallel group.
    pub fn is_tensor_parallel(&self) -> bool {
        self.members.len() > 1
    }
}

/// What the cost model predicts for a plan. The formulas are documented on
/// [`plan`](crate::plan) and in `docs/partitioning.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Time to decode one token of one request: every stage, every hop and the token's return.
    pub time_per_token_s: f64,
    /// `1 / time_per_token_s`.
    pub decode_tokens_per_s: f64,
    /// Part of `time_per_token_s` spent computing or reading weights (including the embedding
    /// and the head).
    pub compute_s: f64,
    /// Part of `time_per_token_s` spent in tensor-parallel all-reduces.
    pub all_reduce_s: f64,
    /// Part of `time_per_token_s` spent on links: hops between stages, forwarding inside
    /// tensor-parallel groups and returning the token to the first stage.
    pub link_s: f64,
    /// The prompt length the prefill figures are for.
    pub prompt_len: u64,
    /// Prompt tokens processed per second during prefill.
    pub prefill_tokens_per_s: f64,
    /// Time to first token: the prefill of the whole prompt through every stage and the head.
    pub ttft_s: f64,
}

/// A node the plan does not use, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExcludedNode {
    /// The node.
    pub node: NodeId,
    /// Why it was left out, in words that name the numbers behind the decision.
    pub reason: String,
    /// How much the cheapest way found to include it would add to the time per token, when
    /// it could be included at all.
    pub added_time_per_token_s: Option<f64>,
}

/// A node that a plan asks for more memory than it offers (only the baseline can do this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryOverrun {
    /// The node.
    pub node: NodeId,
    /// Weights plus KV cache the plan gives it.
    pub needed_bytes: u64,
    /// What it offers.
    pub offered_bytes: u64,
}

/// A placement of the model on the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The strategy that produced it.
    pub strategy: Strategy,
    /// The stages in ring order: the first holds the embedding, the last holds the head and
    /// sends each sampled token back to the first.
    pub stages: Vec<Stage>,
    /// What the cost model predicts.
    pub predicted: Prediction,
    /// Nodes the plan leaves out, in id order.
    pub excluded: Vec<ExcludedNode>,
    /// Nodes that would run out of memory. Always empty for [`Strategy::CostOptimal`]; the
    /// baseline ignores KV cache, embedding and head when it splits, so it can overrun.
    pub overruns: Vec<MemoryOverrun>,
    /// Why the plan looks the way it does, one sentence per line: a summary, then every
    /// stage, then every node left out.
    pub explanation: Vec<String>,
}

impl Plan {
    /// Whether every node's share fits the memory it offers.
    pub fn fits_memory(&self) -> bool {
        self.overruns.is_empty()
    }

    /// Every node the plan uses, in ring order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.stages
            .iter()
            .flat_map(|s| s.members.iter().map(|m| &m.node))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.explanation {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_range_counts_and_prints_half_open() {
        let range = LayerRange { start: 3, end: 7 };
        assert_eq!(range.len(), 4);
        assert!(!range.is_empty());
        assert_eq!(range.to_string(), "3..7");
        assert!(LayerRange { start: 5, end: 5 }.is_empty());
    }
}
