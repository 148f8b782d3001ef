//! Rotating the cluster key: a member hands a new key to every other member it is connected
//! to except the nodes it revokes, inside the connections the current key protects. Each node
//! that takes it hears of it ([`crate::Topology::rotations`]) and is expected to start again
//! with the new key; the revoked nodes keep the old one, which then opens no connection and
//! no call.

use crate::identity::ClusterKey;
use crate::profile::NodeId;

/// A new cluster key another member handed this node.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// The new key.
    pub key: ClusterKey,
    /// The member that rotated it.
    pub by: NodeId,
    /// The nodes it left out.
    pub revoked: Vec<NodeId>,
}

/// How one node answered a rotation this node sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationAck {
    /// The node.
    pub node: NodeId,
    /// `Ok` when it took the new key; otherwise why not (it refused, or did not answer).
    pub outcome: Result<(), String>,
}
