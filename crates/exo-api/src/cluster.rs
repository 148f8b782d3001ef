//! The cluster as `GET /v1/cluster` shows it: plain serialisable views that the engine fills
//! in from whatever it knows (membership, measurements, the current placement plan).

use serde::{Deserialize, Serialize};

/// The whole cluster as one node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Every node known, this one included.
    pub nodes: Vec<NodeView>,
    /// Measured links between nodes, one per ordered pair that has been measured.
    pub links: Vec<LinkView>,
    /// The placement in force, if a model is loaded.
    pub plan: Option<PlanView>,
    /// A short human-readable state, such as `ready` or `waiting: <why>`.
    pub status: String,
    /// Whether this node can serve the model now (what `GET /readyz` answers).
    pub ready: bool,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// The node's stable id (for example a libp2p peer id).
    pub id: String,
    /// A human-readable name, such as the host name.
    pub name: String,
    /// What the node does in the cluster, such as `worker` or `gateway`.
    pub role: String,
    /// Where the node can be reached, if known.
    pub address: Option<String>,
    /// Total memory on the node's device.
    pub memory_bytes: u64,
    /// The part of it the node offers to the cluster.
    pub offered_memory_bytes: u64,
    /// Measured compute throughput in floating-point operations per second.
    pub flops: f64,
    /// Ids of the models the node has on disk.
    pub models: Vec<String>,
    /// Whether this is the node answering the request.
    pub is_self: bool,
}

/// A measured link from one node to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    /// Id of the sending node.
    pub from: String,
    /// Id of the receiving node.
    pub to: String,
    /// Round-trip latency, if measured.
    pub latency_ms: Option<f64>,
    /// Throughput, if measured.
    pub bandwidth_bytes_per_s: Option<f64>,
}

/// A placement plan: which node holds which layers of which model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanView {
    /// Identifies the plan; it changes whenever the cluster re-plans.
    pub epoch: String,
    /// The model the plan places.
    pub model: String,
    /// The pipeline stages in order.
    pub stages: Vec<StageView>,
    /// What the cost model predicts for decoding, if it could.
    pub predicted_decode_tokens_per_s: Option<f64>,
    /// What the cost model predicts for the first token, if it could.
    pub predicted_time_to_first_token_ms: Option<f64>,
    /// Why the plan looks the way it does, one sentence per line.
    pub explanation: Vec<String>,
}

/// One pipeline stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageView {
    /// Id of the node running the stage.
    pub node: String,
    /// First layer held (inclusive).
    pub layers_start: u32,
    /// Last layer held (exclusive).
    pub layers_end: u32,
    /// Whether the stage holds the token embedding.
    pub embeds: bool,
    /// Whether the stage holds the output head and samples.
    pub has_head: bool,
}
