//! Rules every plan obeys, checked on random clusters of 1 to 8 nodes and random models.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use exo_partition::Strategy::{CostOptimal, MemoryWeighted};
use exo_partition::{
    ClusterProfile, LinkProfile, ModelProfile, NodeId, NodeProfile, Plan, RequestProfile, Result,
    plan,
};
use proptest::prelude::*;

/// Room in the link table for one node more than the largest cluster.
const SLOTS: usize = 9;

#[derive(Debug, Clone)]
struct Case {
    model: ModelProfile,
    nodes: Vec<NodeProfile>,
    /// `links[i * SLOTS + j]`: the link from node `i` to node `j`, if measured.
    links: Vec<Option<(f64, f64)>>,
    request: RequestProfile,
}

impl Case {
    fn cluster(&self, nodes: &[NodeProfile]) -> ClusterProfile {
        let index: BTreeMap<&NodeId, usize> = self
            .nodes
            .iter()
            .chain(nodes)
            .map(|n| (&n.id, id_index(&n.id)))
            .collect();
        let mut links = Vec::new();
        for a in nodes {
            for b in nodes {
                let (i, j) = (index[&a.id], index[&b.id]);
                if i == j {
                    continue;
                }
                if let Some((latency, bandwidth)) = self.links[i * SLOTS + j] {
                    links.push(LinkProfile::new(
                        a.id.clone(),
                        b.id.clone(),
                        latency,
                        bandwidth,
                    ));
                }
            }
        }
        ClusterProfile::new(nodes.to_vec(), links)
    }

    fn plan(&self, strategy: exo_partition::Strategy) -> Result<Plan> {
        plan(
            &self.model,
            &self.cluster(&self.nodes),
            &self.request,
            strategy,
        )
    }
}

fn id_index(id: &NodeId) -> usize {
    id.as_str()[1..].parse().unwrap()
}

fn log_uniform(low_exp: f64, high_exp: f64) -> impl Strategy<Value = f64> {
    (low_exp..high_exp).prop_map(|e| 10f64.powf(e))
}

prop_compose! {
    fn model()(
        layers in 1u32..=24,
        kv_pow in 0u32..=3,
        q_per_kv in prop::sample::select(vec![1u32, 2, 4]),
        layer_mb in 1u64..=2000,
        embedding_mb in 0u64..=600,
        head_mb in 0u64..=600,
        flops_per_byte in 0.5f64..4.0,
        kv_bytes in 0u64..=8192,
        vocab in 1000u32..=150_000,
        activation_bytes in prop::sample::select(vec![2u32, 4]),
    ) -> ModelProfile {
        let kv_heads = 1 << kv_pow;
        let attention_heads = kv_heads * q_per_kv;
        let hidden = attention_heads * 64;
        ModelProfile {
            layers,
            layer_weight_bytes: layer_mb * 1_000_000,
            embedding_bytes: embedding_mb * 1_000_000,
            head_bytes: head_mb * 1_000_000,
            layer_flops_per_token: (layer_mb as f64 * 1e6 * flops_per_byte) as u64,
            hidden_size: hidden,
            // Not a multiple of the KV heads, so MLP columns must be rounded.
            intermediate_size: hidden * 3 + 7,
            attention_heads,
            kv_heads,
            kv_bytes_per_token_per_layer: kv_bytes,
            vocab_size: vocab,
            activation_bytes,
        }
    }
}

prop_compose! {
    fn node()(
        memory_mb in 0u64..=40_000,
        flops in log_uniform(9.0, 14.0),
        bandwidth in log_uniform(9.0, 12.0),
    ) -> (u64, f64, f64) {
        (memory_mb * 1_000_000, flops, bandwidth)
    }
}

prop_compose! {
    fn request()(context in 1u64..=8192, concurrent in 1u32..=4, prompt_fraction in 0.0f64..=1.0)
        -> RequestProfile {
        let prompt = ((context as f64 * prompt_fraction) as u64).clamp(1, context);
        RequestProfile { context_len: context, concurrent_requests: concurrent, prompt_len: prompt }
    }
}

fn link() -> impl Strategy<Value = Option<(f64, f64)>> {
    prop::option::weighted(0.85, (log_uniform(-6.0, -1.5), log_uniform(6.0, 10.0)))
}

/// A case of `nodes` nodes, plus one more node (id `n{nodes}`) that is not in it.
fn case_with_spare(
    nodes: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (Case, NodeProfile)> {
    (
        model(),
        prop::collection::vec(node(), nodes.start() + 1..=nodes.end() + 1),
        prop::collection::vec(link(), SLOTS * SLOTS),
        request(),
    )
        .prop_map(|(model, measured, links, request)| {
            let mut nodes: Vec<NodeProfile> = measured
                .into_iter()
                .enumerate()
                .map(|(i, (memory, flops, bandwidth))| {
                    NodeProfile::new(format!("n{i}"), memory, flops, bandwidth, "ndarray")
                })
                .collect();
            let spare = nodes.pop().unwrap();
            (
                Case {
                    model,
                    nodes,
                    links,
                    request,
                },
                spare,
            )
        })
}

fn case() -> impl Strategy<Value = Case> {
    case_with_spare(1..=8).prop_map(|(case, _)| case)
}

/// A deterministic shuffle, so that failures reproduce from the proptest seed.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

fn same_outcome(a: &Result<Plan>, b: &Result<Plan>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.to_string() == b.to_string(),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_layer_is_assigned_once_in_contiguous_stages(case in case()) {
        for strategy in [CostOptimal, MemoryWeighted] {
            let Ok(plan) = case.plan(strategy) else { continue };
            let mut next = 0;
            for stage in &plan.stages {
                prop_assert_eq!(stage.layers.start, next);
                prop_assert!(!stage.layers.is_empty());
                prop_assert!(!stage.members.is_empty());
                next = stage.layers.end;
            }
            prop_assert_eq!(next, case.model.layers);
            prop_assert!(plan.stages.first().unwrap().holds_embedding);
            prop_assert!(plan.stages.last().unwrap().holds_head);
            // No node appears in two stages or twice in one.
            let mut seen: Vec<&NodeId> = plan.nodes().collect();
            let used = seen.len();
            seen.sort();
            seen.dedup();
            prop_assert_eq!(seen.len(), used);
            prop_assert_eq!(used + plan.excluded.len(), case.nodes.len());
        }
    }

    #[test]
    fn every_node_stays_within_the_memory_it_offers(case in case()) {
        let Ok(plan) = case.plan(CostOptimal) else { return Ok(()) };
        prop_assert!(plan.fits_memory());
        let m = &case.model;
        let kv_heads = u128::from(m.kv_heads);
        let width = u128::from(m.intermediate_size);
        let reserve = u128::from(m.kv_bytes_per_token_per_layer)
            * u128::from(case.request.context_len)
            * u128::from(case.request.concurrent_requests);
        // The documented split of a layer: the MLP's part in the proportions of a Llama layer.
        let hidden = f64::from(m.hidden_size);
        let kv_dim = hidden * f64::from(m.kv_heads) / f64::from(m.attention_heads);
        let mlp = 3.0 * hidden * f64::from(m.intermediate_size);
        let fraction = mlp / (2.0 * hidden * hidden + 2.0 * hidden * kv_dim + mlp);
        let mlp_bytes = ((m.layer_weight_bytes as f64 * fraction).floor() as u64).min(m.layer_weight_bytes);
        let attention_bytes = u128::from(m.layer_weight_bytes - mlp_bytes);
        let mlp_bytes = u128::from(mlp_bytes);
        let last = plan.stages.len() - 1;
        for (s, stage) in plan.stages.iter().enumerate() {
            let layers = u128::from(stage.layers.len());
            for (i, member) in stage.members.iter().enumerate() {
                let heads = u128::from(member.kv_heads);
                let columns = u128::from(member.mlp_columns);
                let mut weights = layers
                    * ((attention_bytes * heads).div_ceil(kv_heads)
                        + (mlp_bytes * columns).div_ceil(width));
                if i == 0 && s == 0 {
                    weights += u128::from(m.embedding_bytes);
                }
                if s == last {
                    // A group splits the head's vocabulary like the MLP columns.
                    weights += if stage.members.len() == 1 {
                        u128::from(m.head_bytes)
                    } else {
                        (u128::from(m.head_bytes) * columns).div_ceil(width)
                    };
                }
                let kv = layers * (reserve * heads).div_ceil(kv_heads);
                prop_assert_eq!(u128::from(member.weight_bytes), weights);
                prop_assert_eq!(u128::from(member.kv_cache_bytes), kv);
                let offered = case.nodes.iter().find(|n| n.id == member.node).unwrap().memory_bytes;
                prop_assert!(weights + kv <= u128::from(offered),
                    "{} holds {} but offers {}", member.node, weights + kv, offered);
            }
        }
    }

    #[test]
    fn plan_does_not_depend_on_the_order_nodes_are_listed_in(case in case(), seed in any::<u64>()) {
        for strategy in [CostOptimal, MemoryWeighted] {
            let original = case.plan(strategy);
            let mut nodes = case.nodes.clone();
            shuffle(&mut nodes, seed);
            let mut cluster = case.cluster(&nodes);
            shuffle(&mut cluster.links, seed.rotate_left(17));
            let shuffled = plan(&case.model, &cluster, &case.request, strategy);
            prop_assert!(same_outcome(&original, &shuffled), "{:?}\n!=\n{:?}", original, shuffled);
        }
    }

    #[test]
    fn adding_a_node_never_raises_our_predicted_time_per_token(
        (case, spare) in case_with_spare(1..=8),
    ) {
        let Ok(before) = case.plan(CostOptimal) else { return Ok(()) };
        let mut bigger = case.clone();
        bigger.nodes.push(spare);
        let after = bigger.plan(CostOptimal);
        prop_assert!(after.is_ok(), "adding a node made the model not fit: {:?}", after);
        let after = after.unwrap();
        prop_assert!(
            after.predicted.time_per_token_s <= before.predicted.time_per_token_s,
            "{} s per token became {} s\nbefore:\n{}\nafter:\n{}",
            before.predicted.time_per_token_s, after.predicted.time_per_token_s, before, after
        );
    }

    #[test]
    fn our_plan_is_never_slower_than_any_one_of_its_nodes_alone(case in case()) {
        let Ok(ours) = case.plan(CostOptimal) else { return Ok(()) };
        for node in &case.nodes {
            let alone = Case { nodes: vec![node.clone()], ..case.clone() };
            if let Ok(alone) = alone.plan(CostOptimal) {
                prop_assert!(ours.predicted.time_per_token_s <= alone.predicted.time_per_token_s);
            }
        }
    }

    #[test]
    fn tensor_shares_are_whole_kv_heads_that_sum_to_the_whole(case in case()) {
        let Ok(plan) = case.plan(CostOptimal) else { return Ok(()) };
        let m = &case.model;
        for stage in &plan.stages {
            let heads: u32 = stage.members.iter().map(|x| x.kv_heads).sum();
            let queries: u32 = stage.members.iter().map(|x| x.attention_heads).sum();
            let columns: u32 = stage.members.iter().map(|x| x.mlp_columns).sum();
            prop_assert_eq!(heads, m.kv_heads);
            prop_assert_eq!(queries, m.attention_heads);
            prop_assert_eq!(columns, m.intermediate_size);
            if let [only] = &stage.members[..] {
                prop_assert_eq!(only.mlp_columns, m.intermediate_size);
            }
            for member in &stage.members {
                prop_assert!(member.kv_heads >= 1);
                prop_assert_eq!(member.attention_heads, member.kv_heads * (m.attention_heads / m.kv_heads));
            }
        }
    }

    #[test]
    fn predictions_are_finite_and_consistent(case in case()) {
        for strategy in [CostOptimal, MemoryWeighted] {
            let Ok(plan) = case.plan(strategy) else { continue };
            let p = &plan.predicted;
            prop_assert!(p.time_per_token_s > 0.0 && p.time_per_token_s.is_finite());
            prop_assert!((p.decode_tokens_per_s * p.time_per_token_s - 1.0).abs() < 1e-9);
            let parts = p.compute_s + p.all_reduce_s + p.link_s;
            prop_assert!((parts - p.time_per_token_s).abs() <= 1e-9 * p.time_per_token_s.max(1.0));
            prop_assert!(p.ttft_s > 0.0 && p.prefill_tokens_per_s > 0.0);
        }
    }
}
