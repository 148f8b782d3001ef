//! Plain data about nodes and links: what each node announces about itself, and what this node
//! measured about its links. These are what the node runtime turns into the planner's inputs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's identity as text: its libp2p peer id in base58.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<libp2p::PeerId> for NodeId {
    fn from(peer: libp2p::PeerId) -> Self {
        Self(peer.to_base58())
    }
}

/// What a node does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Runs model shards; the planner may give it work.
    #[default]
    Worker,
    /// Only watches the cluster (`exo-node peers`); never given work.
    Observer,
}

/// What a node tells the others about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// The node's identity.
    pub id: NodeId,
    /// A random value chosen at each start. Two live nodes with the same `id` but different
    /// `instance` share one identity (a copied home folder).
    pub instance: String,
    /// The host name, for people reading the topology.
    pub name: String,
    /// The operating system, for people (`Linux (Debian GNU/Linux 12)`); empty from a node of
    /// a release that did not send it.
    #[serde(default)]
    pub os: String,
    /// What the node does.
    pub role: NodeRole,
    /// Where its shard service (gRPC) listens, once it runs one (`http://10.0.0.5:52417`).
    pub grpc_endpoint: Option<String>,
    /// Memory the node has and offers.
    pub memory: MemoryInfo,
    /// The compute backend (`flex`, `ndarray`, `wgpu`; `none` for an observer).
    pub backend: String,
    /// The device the backend runs on (a CPU model or a GPU name).
    pub device: String,
    /// Logical CPU cores.
    pub cores: u32,
    /// f32 throughput measured at start, FLOP/s (all cores).
    pub flops_per_s: f64,
    /// Memory bandwidth measured at start (bytes read plus bytes written per second).
    pub mem_bandwidth_bytes_per_s: f64,
    /// The software version (`0.1.0`).
    pub software_version: String,
    /// The cluster protocol version (`/exo/2.0.0`); nodes with another major version cannot
    /// work together.
    pub protocol_version: String,
    /// Model files the node holds, so that weights can be fetched from a neighbour.
    pub models: Vec<ModelFile>,
}

/// Memory figures, in bytes. `None` where the platform does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemoryInfo {
    /// Total memory (capped by a cgroup limit or the configured limit).
    pub total_bytes: Option<u64>,
    /// Memory available for new work now (same caps).
    pub available_bytes: Option<u64>,
}

/// A model file a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ModelFile {
    /// The file name or model name (`SmolLM2-135M-Instruct-Q4_1.gguf`).
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, hex, when known.
    pub sha256: Option<String>,
    /// How its chat template writes tool calls (`hermes`, `llama3`, `mistral`), when it takes
    /// tools: what an API front that reads no model needs to read calls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_syntax: Option<String>,
    /// The hash of the model's manifest in the node's model store (64 hex digits), when the
    /// node can send its chunks to peers that lack them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The chunks the node holds, as sorted `[start, end)` runs, when it holds only some (it is
    /// fetching, or holds only its shard); absent when it holds every chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<[u32; 2]>>,
}

/// What this node measured about its link to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LinkMeasurement {
    /// Smoothed round-trip time of a ping, seconds (exponentially weighted mean). Samples taken
    /// while a bandwidth probe runs on the link are left out: they measure the probe's queue.
    pub rtt_s: Option<f64>,
    /// Ping samples behind `rtt_s`.
    pub rtt_samples: u32,
    /// Bandwidth from this node to the peer, bytes/s, from the latest timed transfer.
    pub bandwidth_bytes_per_s: Option<f64>,
    /// Transfers behind `bandwidth_bytes_per_s`.
    pub bandwidth_probes: u32,
}

impl LinkMeasurement {
    /// One-way latency estimate (half the smoothed round trip), seconds.
    pub fn latency_s(&self) -> Option<f64> {
        self.rtt_s.map(|rtt| rtt / 2.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn profiles_are_plain_json() {
        let link = LinkMeasurement {
            rtt_s: Some(0.004),
            rtt_samples: 3,
            bandwidth_bytes_per_s: Some(1e8),
            bandwidth_probes: 1,
        };
        assert_eq!(link.latency_s(), Some(0.002));
        let json = serde_json::to_string(&link).unwrap();
        assert_eq!(
            serde_json::from_str::<LinkMeasurement>(&json).unwrap(),
            link
        );
    }
}
