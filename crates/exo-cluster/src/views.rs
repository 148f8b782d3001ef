//! Membership as the API shows it.

use exo_api::{LinkView, NodeView};
use exo_topology::{NodeRole, TopologySnapshot};

use crate::origin::model_id;

/// The nodes and measured links of a membership snapshot.
pub(crate) fn view_of(snapshot: &TopologySnapshot) -> (Vec<NodeView>, Vec<LinkView>) {
    let node = |p: &exo_topology::NodeProfile, is_self: bool, address: Option<String>| NodeView {
        id: p.id.as_str().to_owned(),
        name: p.name.clone(),
        role: match p.role {
            NodeRole::Worker => "worker",
            NodeRole::Observer => "observer",
        }
        .to_owned(),
        address: p.grpc_endpoint.clone().or(address),
        memory_bytes: p.memory.total_bytes.unwrap_or(0),
        offered_memory_bytes: p
            .memory
            .available_bytes
            .or(p.memory.total_bytes)
            .unwrap_or(0),
        flops: p.flops_per_s,
        models: p.models.iter().map(|m| model_id(&m.name)).collect(),
        is_self,
    };
    let mut nodes = vec![node(&snapshot.local, true, None)];
    nodes.extend(
        snapshot
            .nodes
            .iter()
            .map(|p| node(&p.profile, false, p.addresses.first().cloned())),
    );
    let links = snapshot
        .nodes
        .iter()
        .map(|p| LinkView {
            from: snapshot.local.id.as_str().to_owned(),
            to: p.profile.id.as_str().to_owned(),
            latency_ms: p.link.latency_s().map(|s| s * 1e3),
            bandwidth_bytes_per_s: p.link.bandwidth_bytes_per_s,
        })
        .collect();
    (nodes, links)
}
