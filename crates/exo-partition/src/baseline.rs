//! exo's ring memory-weighted split, kept as the baseline.
//!
//! exo orders nodes by memory (largest first, ties by id, descending) and gives node `i` the
//! layers from `floor(c_i · L)` to `floor(c_{i+1} · L)`, where `c_i` is the fraction of the
//! cluster's memory offered by the nodes before it; the last node's range ends at `L`, and
//! nodes whose range is empty are left out. Compute, links, KV cache, embedding and head play
//! no part, so the split can ask a node for more memory than it offers: that is reported in
//! [`Plan::overruns`](crate::Plan::overruns) rather than refused, so that the baseline can
//! always be costed and compared.

use std::cmp::Reverse;

use crate::cost::{Ctx, StageSpec};
use crate::units::whole;

/// The memory-weighted stages for the cluster in `ctx`.
pub(crate) fn stages(ctx: &Ctx<'_>) -> Vec<StageSpec> {
    let mut order: Vec<usize> = (0..ctx.n()).collect();
    order.sort_by_key(|&i| Reverse((ctx.nodes[i].memory_bytes, ctx.id(i))));
    let total: u128 = ctx.nodes.iter().map(|n| u128::from(n.memory_bytes)).sum();
    let layers = u128::from(ctx.layers());
    let boundary = |cumulative: u128| {
        (cumulative * layers)
            .checked_div(total)
            .map_or(0, |b| u32::try_from(b).unwrap_or(ctx.layers()))
    };
    let mut stages = Vec::new();
    let mut cumulative = 0u128;
    for (i, &node) in order.iter().enumerate() {
        let start = boundary(cumulative);
        cumulative += u128::from(ctx.nodes[node].memory_bytes);
        let end = if i + 1 == order.len() {
            ctx.layers()
        } else {
            boundary(cumulative)
        };
        if end > start {
            stages.push(StageSpec {
                members: vec![whole(ctx, node)],
                layers: end - start,
            });
        }
    }
    stages
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::profile::{ClusterProfile, ModelProfile, NodeProfile, RequestProfile};

    #[test]
    fn layers_follow_cumulative_memory_fractions() {
        let model = ModelProfile {
            layers: 10,
            layer_weight_bytes: 1,
            embedding_bytes: 1,
            head_bytes: 1,
            layer_flops_per_token: 1,
            hidden_size: 8,
            intermediate_size: 8,
            attention_heads: 2,
            kv_heads: 2,
            kv_bytes_per_token_per_layer: 0,
            vocab_size: 8,
            activation_bytes: 2,
        };
        let cluster = ClusterProfile::new(
            vec![
                NodeProfile::new("small", 5, 1.0, 1.0, "ndarray"),
                NodeProfile::new("big", 60, 1.0, 1.0, "ndarray"),
                NodeProfile::new("mid", 35, 1.0, 1.0, "ndarray"),
            ],
            vec![],
        );
        let request = RequestProfile::new(1, 1);
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        let got: Vec<(String, u32)> = stages(&ctx)
            .iter()
            .map(|s| (ctx.id(s.lead()).to_string(), s.layers))
            .collect();
        // big: 0..6, mid: 6..9 (floor 9.5), small: 9..10.
        assert_eq!(
            got,
            vec![
                ("big".to_owned(), 6),
                ("mid".to_owned(), 3),
                ("small".to_owned(), 1)
            ]
        );
    }
}
