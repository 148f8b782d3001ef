//! From a membership snapshot to a plan every node computes alike.
//!
//! Only what every node sees identically enters the plan: the nodes' own announced profiles
//! (memory offered, measured compute and memory bandwidth) and the model. Link measurements
//! are taken by each node on its own and differ slightly between them, so they are left out:
//! links are assumed to be the planner's default LAN link. The plan's epoch is a hash of the
//! plan itself, so a membership change that does not change the plan (an observer joining)
//! does not disturb requests in flight.

use std::sync::Arc;

use exo_core::{Epoch, LayerRange, NodeId, Stage};
use exo_model::{Checkpoint, ModelConfig, TensorId};
use exo_partition::{ClusterProfile, ModelProfile, NodeProfile, Plan, RequestProfile, Strategy};
use exo_shard::{WeightFormat, Weights};
use exo_topology::{ModelFile, NodeRole, TopologySnapshot};
use exo_transport::WireDtype;
use sha2::Digest;

/// The plan a node serves by.
#[derive(Clone, Debug)]
pub struct ActivePlan {
    /// A hash of the model and the stages.
    pub epoch: Epoch,
    /// The model's name.
    pub model: String,
    /// The stages in order, with where each node's shard service listens.
    pub stages: Vec<Stage>,
    /// The planner's full answer (predictions, explanation).
    pub plan: Plan,
}

impl ActivePlan {
    /// Where `node` stands in the ring, if it is in it.
    pub fn index_of(&self, node: &NodeId) -> Option<usize> {
        self.stages.iter().position(|s| &s.node == node)
    }
}

/// Whether the cluster can serve the model now.
#[derive(Clone, Debug)]
pub enum PlanState {
    /// Not yet, and why (`not enough memory across nodes: ...`).
    Waiting(String),
    /// Serving by this plan.
    Ready(Arc<ActivePlan>),
}

/// Bytes a tensor takes in memory once loaded as `weights`.
fn held_bytes(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    id: TensorId,
    weights: Weights,
) -> u64 {
    let elements: u64 = config
        .expected_shape(id)
        .iter()
        .map(|&d| d as u64)
        .product();
    let stored = checkpoint.stored_bytes(id).unwrap_or(elements * 4);
    match weights {
        Weights::F32 => elements * 4,
        // The CPU kernels repack quantized blocks with f32 scales: about a fifth more.
        Weights::Stored => stored + stored / 5,
        Weights::Quantize(format) => {
            let bits: u64 = match format {
                WeightFormat::F32 => 32,
                WeightFormat::F16 => 16,
                WeightFormat::Q8_0 => 9,
                WeightFormat::Q4_0 => 5,
                _ => 6,
            };
            elements * bits / 8
        }
    }
}

/// What the planner needs to know about the model at `checkpoint`, held as `weights`, with
/// activations sent as `wire`.
pub fn model_profile(checkpoint: &Checkpoint, weights: Weights, wire: WireDtype) -> ModelProfile {
    let config = checkpoint.config();
    let bytes = |id| held_bytes(checkpoint, config, id, weights);
    let layer: u64 = config
        .layer_parts()
        .into_iter()
        .filter(|&part| checkpoint.has_tensor(TensorId::Layer { layer: 0, part }))
        .map(|part| bytes(TensorId::Layer { layer: 0, part }))
        .sum();
    let embedding = bytes(TensorId::Embedding);
    let head = if checkpoint.has_tensor(TensorId::Head) {
        bytes(TensorId::Head)
    } else {
        embedding
    } + bytes(TensorId::FinalNorm);
    // The KV cache holds f32 keys and values.
    let kv = 2 * config.num_kv_heads as u64 * config.head_dim as u64 * 4;
    ModelProfile {
        layers: config.num_layers as u32,
        layer_weight_bytes: layer,
        embedding_bytes: embedding,
        head_bytes: head,
        // A mixture of experts computes only the experts it routes to.
        layer_flops_per_token: 2 * config.active_layer_params() as u64,
        hidden_size: config.hidden_size as u32,
        intermediate_size: config.intermediate_size as u32,
        attention_heads: config.num_heads as u32,
        kv_heads: config.num_kv_heads as u32,
        kv_bytes_per_token_per_layer: kv,
        vocab_size: config.vocab_size as u32,
        // Bytes per value on the wire, rounded (8-bit blocks: 1.0625 -> 1).
        activation_bytes: (wire.row_bytes(config.hidden_size) as f64
            / config.hidden_size.max(1) as f64)
            .round()
            .max(1.0) as u32,
    }
}

/// A shard service endpoint as a peer announced it, made reachable: an unspecified host
/// (`0.0.0.0`, the node listens everywhere) is replaced by the address its membership
/// connection came from.
pub(crate) fn reachable(endpoint: &str, peer_addresses: &[String]) -> String {
    let Some(rest) = endpoint.strip_prefix("http://0.0.0.0:") else {
        return endpoint.to_owned();
    };
    let ip = peer_addresses.iter().find_map(|a| {
        let mut parts = a.split('/').skip(1);
        match (parts.next(), parts.next()) {
            (Some("ip4"), Some(ip)) => Some(ip.to_owned()),
            (Some("ip6"), Some(ip)) => Some(format!("[{ip}]")),
            _ => None,
        }
    });
    format!("http://{}:{rest}", ip.as_deref().unwrap_or("127.0.0.1"))
}

/// Whether a node announcing `theirs` serves the same model as `ours`: the same name and size,
/// and the same manifest when both keep one.
fn same_model(ours: &ModelFile, theirs: &ModelFile) -> bool {
    theirs.name == ours.name
        && theirs.bytes == ours.bytes
        && match (&ours.manifest, &theirs.manifest) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// The chunks of a model of `count` chunks that a node announcing `file` holds: the ones it
/// lists, when it keeps the model in a store and holds only some; else all of them (a node
/// without a store has the whole file).
pub(crate) fn held_by(file: &ModelFile, count: u32) -> exo_store::ChunkSet {
    match (&file.manifest, &file.chunks) {
        (Some(_), Some(runs)) => exo_store::ChunkSet::from_runs(runs, count),
        _ => exo_store::ChunkSet::all(count),
    }
}

/// `Err` when the workers serving `model` do not hold every chunk of it between them (the
/// model is known from peers only, and the node with the whole file is gone): their layers
/// could not all be loaded. `chunks` is the model's chunk count when this node keeps it in
/// its store.
fn check_coverage(
    serving: &[&ModelFile],
    model: &ModelFile,
    chunks: Option<u32>,
) -> Result<(), String> {
    let Some(count) = chunks else {
        return Ok(());
    };
    let held = serving
        .iter()
        .fold(exo_store::ChunkSet::new(), |held, file| {
            held.union(&held_by(file, count))
        });
    if held.covers(count) {
        return Ok(());
    }
    Err(format!(
        "no node of the cluster holds the whole of {} and the nodes hold only {} of its {} \
         chunks between them: start a node that has the model file",
        model.name,
        held.len(),
        count
    ))
}

/// Plans `model` on the workers of `snapshot` that hold the same model file, with `strategy`.
/// `chunks` is the model's chunk count when this node keeps it in its store: the workers must
/// then hold every chunk between them. `Err` says why the cluster cannot serve it now.
pub(crate) fn plan_cluster(
    snapshot: &TopologySnapshot,
    model: &ModelFile,
    chunks: Option<u32>,
    profile: &ModelProfile,
    context: u64,
    strategy: Strategy,
) -> Result<ActivePlan, String> {
    let mut members: Vec<(NodeProfile, String)> = Vec::new();
    let mut serving: Vec<&ModelFile> = Vec::new();
    let local = &snapshot.local;
    let candidates = std::iter::once((local, Vec::new())).chain(
        snapshot
            .nodes
            .iter()
            .map(|p| (&p.profile, p.addresses.clone())),
    );
    for (node, addresses) in candidates {
        let file = node.models.iter().find(|m| same_model(model, m));
        let serves = node.role == NodeRole::Worker && file.is_some();
        let Some(endpoint) = node.grpc_endpoint.as_deref().filter(|_| serves) else {
            continue;
        };
        serving.extend(file);
        let memory = node
            .memory
            .available_bytes
            .or(node.memory.total_bytes)
            .unwrap_or(0);
        members.push((
            NodeProfile::new(
                node.id.as_str(),
                memory,
                node.flops_per_s.max(1.0),
                node.mem_bandwidth_bytes_per_s.max(1.0),
                node.backend.clone(),
            ),
            reachable(endpoint, &addresses),
        ));
    }
    check_coverage(&serving, model, chunks)?;
    let endpoints: std::collections::HashMap<String, String> = members
        .iter()
        .map(|(n, e)| (n.id.as_str().to_owned(), e.clone()))
        .collect();
    let mut cluster = ClusterProfile::new(members.into_iter().map(|(n, _)| n).collect(), vec![]);
    // The runtime runs pipeline stages; tensor-parallel groups are not implemented yet.
    cluster.max_tensor_parallel = 1;
    let context = context.clamp(1, u64::from(u32::MAX));
    let request = RequestProfile::new(context, context.min(512));
    let plan =
        exo_partition::plan(profile, &cluster, &request, strategy).map_err(|e| e.to_string())?;
    let stages: Vec<Stage> = plan
        .stages
        .iter()
        .filter_map(|s| {
            let node = s.lead()?.as_str().to_owned();
            Some(Stage {
                endpoint: endpoints.get(&node)?.clone(),
                node: NodeId::from(node),
                layers: LayerRange::new(s.layers.start, s.layers.end),
            })
        })
        .collect();
    if stages.len() != plan.stages.len() {
        return Err("the plan names a node without a shard service".to_owned());
    }
    Ok(ActivePlan {
        epoch: epoch_of(&model.name, &stages),
        model: model.name.clone(),
        stages,
        plan,
    })
}

/// A hash of what a request depends on: the model and who holds which layers where.
pub(crate) fn epoch_of(model: &str, stages: &[Stage]) -> Epoch {
    let mut hasher = sha2::Sha256::new();
    hasher.update(model.as_bytes());
    for s in stages {
        hasher.update([0]);
        hasher.update(s.node.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(s.endpoint.as_bytes());
        hasher.update(s.layers.start.to_le_bytes());
        hasher.update(s.layers.end.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Epoch::from_hash(u64::from_le_bytes(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_hosts_are_replaced_by_the_peer_address() {
        assert_eq!(
            reachable(
                "http://0.0.0.0:52417",
                &["/ip4/10.0.0.5/tcp/52416".to_owned()]
            ),
            "http://10.0.0.5:52417"
        );
        assert_eq!(reachable("http://10.1.1.1:9", &[]), "http://10.1.1.1:9");
        assert_eq!(reachable("http://0.0.0.0:9", &[]), "http://127.0.0.1:9");
    }

    #[test]
    fn a_model_known_from_peers_plans_only_while_the_workers_hold_all_its_chunks() {
        let file = |manifest: Option<&str>, chunks: Option<Vec<[u32; 2]>>| ModelFile {
            name: "m.gguf".into(),
            bytes: 10,
            manifest: manifest.map(str::to_owned),
            chunks,
            ..ModelFile::default()
        };
        let ours = file(Some("a"), Some(vec![[0, 4]]));
        // Same name and size: the same model, unless both name manifests and they differ.
        assert!(same_model(&ours, &file(None, None)));
        assert!(same_model(&ours, &file(Some("a"), None)));
        assert!(!same_model(&ours, &file(Some("b"), None)));
        let (half, other_half) = (
            file(Some("a"), Some(vec![[0, 6]])),
            file(Some("a"), Some(vec![[5, 10]])),
        );
        // Without a store nothing is checked; a whole copy (or a plain file) covers.
        assert!(check_coverage(&[&half], &ours, None).is_ok());
        assert!(check_coverage(&[&half, &file(Some("a"), None)], &ours, Some(10)).is_ok());
        assert!(check_coverage(&[&half, &file(None, None)], &ours, Some(10)).is_ok());
        // Two parts that cover between them do; one alone does not, and says why.
        assert!(check_coverage(&[&half, &other_half], &ours, Some(10)).is_ok());
        let why = check_coverage(&[&half], &ours, Some(10));
        assert!(
            why.as_ref()
                .is_err_and(|w| w.contains("6 of its 10 chunks")),
            "{why:?}"
        );
    }

    #[test]
    fn epochs_change_with_the_stages_and_are_never_zero() {
        let stage = |n: &str, r: std::ops::Range<u32>| Stage {
            node: n.into(),
            endpoint: format!("http://{n}"),
            layers: r.into(),
        };
        let a = epoch_of("m", &[stage("a", 0..10), stage("b", 10..30)]);
        assert_eq!(a, epoch_of("m", &[stage("a", 0..10), stage("b", 10..30)]));
        assert_ne!(a, epoch_of("m", &[stage("a", 0..11), stage("b", 11..30)]));
        assert_ne!(a, epoch_of("m", &[stage("b", 0..10), stage("a", 10..30)]));
        assert_ne!(a.get(), 0);
    }
}
