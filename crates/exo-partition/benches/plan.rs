//! Planning time for 16 nodes and 80 layers (Llama 3 70B), ours and the baseline.
//!
//! Run with `cargo bench -p exo-partition --bench plan`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use exo_partition::{ClusterProfile, NodeProfile, RequestProfile, Strategy, plan};

fn plan_16_nodes_80_layers(c: &mut Criterion) {
    let model = common::llama3_70b_q4();
    assert_eq!(model.layers, 80);
    let request = RequestProfile::new(4096, 512);
    // A mixed home cluster: four rooms of a desktop, two Mac minis on Thunderbolt and a
    // laptop or a Pi.
    let home = common::big_cluster(16);
    // The search's worst case: sixteen equal nodes on one fast switch, so that every group of
    // two to four nodes pays off as a tensor-parallel group (256 candidate groups).
    let nodes: Vec<NodeProfile> = (0..16)
        .map(|i| common::desktop(&format!("gpu-{i:02}"), 8))
        .collect();
    let ids: Vec<(String, (f64, f64))> = nodes
        .iter()
        .map(|n| (n.id.to_string(), (20e-6, 3e9)))
        .collect();
    let pairs: Vec<(&str, (f64, f64))> = ids.iter().map(|(id, q)| (id.as_str(), *q)).collect();
    let switch = ClusterProfile::new(nodes, common::star(&pairs));

    let mut group = c.benchmark_group("plan 16 nodes x 80 layers");
    for (name, cluster, strategy) in [
        ("home, cost-optimal", &home, Strategy::CostOptimal),
        ("home, memory-weighted", &home, Strategy::MemoryWeighted),
        ("fast switch, cost-optimal", &switch, Strategy::CostOptimal),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                plan(
                    black_box(&model),
                    black_box(cluster),
                    black_box(&request),
                    strategy,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, plan_16_nodes_80_layers);
criterion_main!(benches);
