//! The cluster as `GET /v1/cluster` and `GET /v1/cluster/events` show it: plain serialisable
//! views that the engine fills in from whatever it knows (membership, measurements, the
//! current placement plan, what each stage reports about itself).
//!
//! Fields added after the first release carry `#[serde(default)]`, so a client reading an
//! older node's view still parses it.

use serde::{Deserialize, Serialize};

/// The whole cluster as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// Every node known, this one included, and nodes that left a moment ago.
    pub nodes: Vec<NodeView>,
    /// Measured links between nodes, one per ordered pair that has been measured.
    pub links: Vec<LinkView>,
    /// The placement in force, if a model is loaded.
    pub plan: Option<PlanView>,
    /// A short human-readable state, such as `ready` or `waiting: <why>`.
    pub status: String,
    /// Whether this node can serve the model now (what `GET /readyz` answers).
    pub ready: bool,
    /// Peers that were seen but are not in the cluster, and why: what a person needs when a
    /// device will not join.
    #[serde(default)]
    pub problems: Vec<PeerProblemView>,
}

/// One node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    /// The node's stable id (for example a libp2p peer id).
    pub id: String,
    /// A human-readable name, such as the host name.
    pub name: String,
    /// What the node does in the cluster, such as `worker` or `observer`.
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
    /// Where the node stands now.
    #[serde(default)]
    pub state: NodeState,
    /// While the node loads its layers, the part loaded so far (0 to 1), when known.
    #[serde(default)]
    pub progress: Option<f64>,
    /// The node's operating system (`Debian GNU/Linux 12`, `macOS 15.1`).
    #[serde(default)]
    pub os: String,
    /// What computes: a CPU model or a GPU name.
    #[serde(default)]
    pub device: String,
    /// Logical CPU cores.
    #[serde(default)]
    pub cores: u32,
    /// The compute backend (`flex` on the CPU, `wgpu` on a GPU; `none` for an observer).
    #[serde(default)]
    pub backend: String,
    /// Memory the node's process uses now (resident), when it reports it.
    #[serde(default)]
    pub used_memory_bytes: Option<u64>,
    /// Bytes of model weights the node holds, when it reports it.
    #[serde(default)]
    pub weight_bytes: Option<u64>,
    /// While the node fetches its layers' chunks from its peers: how far it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchView>,
}

/// A node's fetch of its shard from its peers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FetchView {
    /// Bytes received and verified.
    pub received_bytes: u64,
    /// Bytes the node needs in all (what it lacked when the fetch began).
    pub total_bytes: u64,
    /// The rate over the last seconds.
    pub bytes_per_s: f64,
    /// Seconds left at that rate, when it is known.
    pub eta_s: Option<f64>,
}

/// Where a node stands in the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeState {
    /// In the cluster, not yet part of the plan (the cluster is about to plan again).
    #[default]
    Joining,
    /// Part of the plan, loading its layers.
    Loading,
    /// Part of the plan, fetching its layers from its peers (it lacks the model file).
    Fetching,
    /// Holds its layers of the plan in force.
    Ready,
    /// A worker the plan leaves out (the plan's explanation says why).
    Idle,
    /// A worker while the cluster has no plan (the cluster's status says why).
    Waiting,
    /// Watches or serves the API only (a gateway); never given layers.
    Observer,
    /// Left the cluster a moment ago.
    Gone,
}

/// A measured link from one node to another.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageView {
    /// Id of the node running the stage (its lead, for a tensor-parallel group).
    pub node: String,
    /// First layer held (inclusive).
    pub layers_start: u32,
    /// Last layer held (exclusive).
    pub layers_end: u32,
    /// Whether the stage holds the token embedding.
    pub embeds: bool,
    /// Whether the stage holds the output head and samples.
    pub has_head: bool,
    /// Every node of a tensor-parallel group, the lead first; empty for a one-node stage.
    #[serde(default)]
    pub group: Vec<String>,
    /// Mean time the stage took per decode step lately (one position of every request in the
    /// frame; prompt chunks left out), in milliseconds. It stays while the stage is idle.
    #[serde(default)]
    pub step_ms: Option<f64>,
    /// Positions (prompt and generated tokens) the stage computed per second lately.
    #[serde(default)]
    pub tokens_per_s: Option<f64>,
    /// Requests with state on the stage's node now.
    #[serde(default)]
    pub requests: Option<u32>,
    /// Bytes of activations the stage's node sent on to the next stage since it started (the
    /// last stage sends none: its tokens go to their origins).
    #[serde(default)]
    pub sent_bytes: Option<u64>,
}

/// A peer that was seen but is not in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerProblemView {
    /// The peer's id, when known.
    pub peer: Option<String>,
    /// Where it was seen.
    pub address: Option<String>,
    /// What stands in the way, for people (`it uses another cluster key`).
    pub problem: String,
}
