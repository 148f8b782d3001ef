//! What the membership service reports: events as they happen, a snapshot on request, and
//! diagnostics about peers that were seen but could not join.

use serde::{Deserialize, Serialize};

use crate::identity::ClusterKeyInfo;
use crate::profile::{LinkMeasurement, NodeId, NodeProfile};

/// Something that changed in the cluster, as seen from this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TopologyEvent {
    /// A node connected, proved it holds the cluster key, runs a compatible version and sent its
    /// profile.
    NodeJoined {
        /// Its profile.
        profile: NodeProfile,
        /// The address of the connection it joined through.
        address: String,
        /// How it was found.
        via: Discovery,
    },
    /// A node is gone.
    NodeLeft {
        /// Which node.
        id: NodeId,
        /// Why it is considered gone.
        reason: LeaveReason,
    },
    /// A node announced a changed profile (models, memory, endpoint).
    ProfileUpdated {
        /// The new profile.
        profile: NodeProfile,
    },
    /// A link measurement changed: a bandwidth probe finished, or the smoothed round trip moved
    /// by more than a fifth (and more than half a millisecond).
    LinkMeasured {
        /// The node at the other end.
        id: NodeId,
        /// The figures now.
        link: LinkMeasurement,
    },
    /// A peer was seen but something stands in the way (another cluster key, another version,
    /// a copied identity, an unreachable address).
    PeerProblem {
        /// What was seen and what went wrong.
        diagnostic: PeerDiagnostic,
    },
}

/// How a peer came to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// Multicast DNS on the local network.
    Mdns,
    /// A static peer address (`--peer`).
    Static,
    /// It connected to this node.
    Inbound,
    /// This node dialled it for another reason (a request to a peer it knew an address of).
    Dialed,
}

/// Why a node is considered gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeaveReason {
    /// It closed its connections: a clean shutdown, or its process ended.
    Closed,
    /// It stopped answering pings (it crashed, lost power or its network went away).
    Unresponsive {
        /// How long it had been silent when declared gone, seconds.
        silent_s: f64,
    },
    /// It restarted: a new instance with the same identity took its place (a
    /// [`TopologyEvent::NodeJoined`] follows).
    Restarted,
    /// This node closed the connection (shutting down, or refusing the peer).
    Disconnected,
    /// The connection failed.
    Error {
        /// What failed.
        detail: String,
    },
}

/// A peer this node saw but that is not (or not properly) part of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerDiagnostic {
    /// The peer's id when known (mDNS and static addresses with `/p2p/` name it; a failed
    /// handshake does not).
    pub id: Option<NodeId>,
    /// The address it was seen at.
    pub address: Option<String>,
    /// How it was seen.
    pub via: Discovery,
    /// What went wrong; `None` while a first connection attempt is still under way.
    pub problem: Option<Problem>,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Why a peer that was seen is not in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The connection was made but the peer encrypts with another cluster key.
    ClusterKeyMismatch {
        /// What the handshake reported.
        detail: String,
    },
    /// The connection was made but the handshake after the key check failed (a peer running
    /// an incompatible release, or a connection broken mid-handshake).
    HandshakeFailed {
        /// What the handshake reported.
        detail: String,
    },
    /// The peer runs an incompatible cluster protocol version.
    IncompatibleVersion {
        /// Ours.
        ours: String,
        /// Theirs.
        theirs: String,
    },
    /// The peer presents this node's identity, or two peers present one identity: a home folder
    /// was copied.
    DuplicateIdentity {
        /// Where the two were seen.
        detail: String,
    },
    /// A different node answered at the address.
    WrongPeer {
        /// The node that answered.
        obtained: NodeId,
    },
    /// No connection could be made (refused, no route, no answer).
    Unreachable {
        /// What the network said.
        detail: String,
    },
    /// Anything else.
    Other {
        /// What happened.
        detail: String,
    },
}

/// Everything this node knows about the cluster at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopologySnapshot {
    /// This node's own profile.
    pub local: NodeProfile,
    /// The addresses this node listens on.
    pub listen_addresses: Vec<String>,
    /// The cluster key in use (fingerprint and origin, never the secret).
    pub cluster_key: ClusterKeyInfo,
    /// The other nodes of the cluster, by id.
    pub nodes: Vec<PeerInfo>,
    /// Peers seen but not in the cluster, and why.
    pub diagnostics: Vec<PeerDiagnostic>,
}

impl TopologySnapshot {
    /// The node with id `id`, if it is in the cluster.
    pub fn node(&self, id: &NodeId) -> Option<&PeerInfo> {
        self.nodes.iter().find(|n| &n.profile.id == id)
    }
}

/// A node of the cluster and this node's link to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// What it announced.
    pub profile: NodeProfile,
    /// The remote addresses of the open connections.
    pub addresses: Vec<String>,
    /// How it was found.
    pub via: Discovery,
    /// The link from this node to it.
    pub link: LinkMeasurement,
    /// How long it has been in the cluster, seconds.
    pub joined_s_ago: f64,
}
