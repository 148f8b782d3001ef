//! Identities: nodes, plan epochs, requests, layer ranges and the stages of a plan.

use std::fmt;

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// A node's identity (its libp2p peer id in base58).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize), serde(transparent))]
pub struct NodeId(String);

impl NodeId {
    /// A node id from its text.
    pub fn new(id: impl Into<String>) -> Self {
        NodeId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last eight characters, enough to tell nodes apart in logs.
    pub fn short(&self) -> &str {
        let id = self.0.as_str();
        let mut at = id.len().saturating_sub(8);
        while !id.is_char_boundary(at) {
            at += 1;
        }
        &id[at..]
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        NodeId(id.to_owned())
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        NodeId(id)
    }
}

/// A plan's identity: a hash of the model and the stages, so every node derives the same one
/// and an unchanged plan keeps it. Never 0 (0 on the wire means "none").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize), serde(transparent))]
pub struct Epoch(u64);

impl Epoch {
    /// The epoch with this number; `None` for 0, which is no epoch.
    pub fn new(value: u64) -> Option<Self> {
        (value != 0).then_some(Epoch(value))
    }

    /// An epoch from a hash: 0 becomes 1.
    pub fn from_hash(value: u64) -> Self {
        Epoch(value.max(1))
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One request's identity across every stage it visits, chosen at random by its origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize), serde(transparent))]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A half-open range of decoder layers, `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct LayerRange {
    /// The first layer.
    pub start: u32,
    /// One past the last layer.
    pub end: u32,
}

impl LayerRange {
    /// `start..end`.
    pub fn new(start: u32, end: u32) -> Self {
        LayerRange { start, end }
    }

    /// Layers in the range.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no layer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As a `usize` range, for indexing.
    pub fn to_range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl From<std::ops::Range<u32>> for LayerRange {
    fn from(r: std::ops::Range<u32>) -> Self {
        LayerRange::new(r.start, r.end)
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// One stage of a plan: a range of layers held by one node, which a request's activations
/// visit in ring order. (A tensor-parallel group of nodes sharing a stage's layers extends
/// this once the runtime runs such groups.)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Stage {
    /// The node that holds it.
    pub node: NodeId,
    /// Where that node's shard service listens (`http://10.0.0.5:52417`).
    pub endpoint: String,
    /// Its layers.
    pub layers: LayerRange,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn epochs_are_never_zero_and_print_as_sixteen_hex_digits() {
        assert_eq!(Epoch::new(0), None);
        assert_eq!(Epoch::from_hash(0).get(), 1);
        assert_eq!(Epoch::from_hash(0xab).to_string(), "00000000000000ab");
    }

    #[test]
    fn short_node_ids_are_the_tail() {
        assert_eq!(NodeId::from("12D3KooWabcdefgh").short(), "abcdefgh");
        assert_eq!(NodeId::from("abc").short(), "abc");
        assert_eq!(NodeId::from("ééééé").short(), "éééé");
    }

    #[test]
    fn layer_ranges_measure_themselves() {
        let r = LayerRange::from(3..10);
        assert_eq!(
            (r.len(), r.is_empty(), r.to_string()),
            (7, false, "3..10".into())
        );
        assert!(LayerRange::new(5, 5).is_empty());
        assert_eq!(LayerRange::new(6, 5).len(), 0);
    }
}
