//! Placement planner: splits a model's layers across unequal nodes from measured memory,
//! compute and links, predicts what the split will deliver, and explains itself.
//!
//! Plain data goes in: a [`ModelProfile`], a [`ClusterProfile`] (a [`NodeProfile`] per node
//! and a [`LinkProfile`] per measured ordered pair) and a [`RequestProfile`]. A [`Plan`] comes
//! out: an ordered ring of [`Stage`]s, each a layer range held by one node or by a
//! tensor-parallel group splitting the layers by whole KV heads; a [`Prediction`] of decode
//! tokens/s, prefill tokens/s and time to first token from an explicit cost model; and an
//! explanation of every share and of every node left out. [`Strategy::MemoryWeighted`] is
//! exo's split, kept as the baseline; [`Strategy::CostOptimal`] is ours.
//!
//! This crate is pure and must NOT know about IO, async, networking, tensors, model
//! execution or how the measurements were taken: the node runtime measures, calls [`plan`]
//! and carries the plan out. Every node computes the plan independently from the same
//! snapshot, so the result depends only on the data, never on the order it is listed in.
//!
//! ```
//! use exo_partition::{
//!     ClusterProfile, LinkProfile, LlamaShape, ModelProfile, NodeProfile, RequestProfile,
//!     Strategy, plan,
//! };
//!
//! let model = ModelProfile::llama(&LlamaShape::llama3_8b(4.5))?;
//! let cluster = ClusterProfile::new(
//!     vec![
//!         NodeProfile::new("desktop", 64 << 30, 20e12, 400e9, "wgpu"),
//!         NodeProfile::new("pi", 4 << 30, 50e9, 4e9, "ndarray"),
//!     ],
//!     vec![LinkProfile::new("desktop", "pi", 8e-3, 2e6)],
//! );
//! let plan = plan(&model, &cluster, &RequestProfile::new(8192, 512), Strategy::CostOptimal)?;
//! assert_eq!(plan.stages.len(), 1);
//! assert_eq!(plan.excluded[0].node.as_str(), "pi");
//! println!("{plan}");
//! # Ok::<(), exo_partition::Error>(())
//! ```

mod baseline;
mod cost;
mod error;
mod explain;
mod format;
mod node;
mod plan;
mod profile;
mod search;
mod units;

pub use error::{Error, MemoryShortfall, Result};
pub use plan::{
    ExcludedNode, LayerRange, MemoryOverrun, Plan, Prediction, Stage, StageMember, Strategy,
};
pub use profile::{
    ClusterProfile, LinkProfile, LinkQuality, LlamaShape, ModelProfile, NodeId, NodeProfile,
    RequestProfile,
};

use cost::{Ctx, StageSpec};

/// Places `model` on `cluster` for `request` with `strategy`.
///
/// # Cost model
///
/// For a node with compute `F` (FLOP/s) and memory bandwidth `B` (bytes/s), one layer costs
/// `t = max(flops / F, (weight bytes + KV bytes per token × prompt_len) / B)` per decoded
/// token. A tensor-parallel member with `k` of the `K` KV heads and `c` of the `I` MLP
/// columns does `k / K` of the layer's attention and `c / I` of its MLP (split in a Llama
/// layer's proportions), and the group adds two ring all-reduces of the activation
/// (`hidden × activation_bytes` bytes) per layer, each `2 (g - 1)` steps of
/// `latency + bytes / g / bandwidth` over the group's slowest ring link. The first stage adds
/// the embedding lookup (one row read), the last the head
/// (`max(2 · hidden · vocab / F, head bytes / B)`, split like the MLP columns in a group,
/// whose members then send their logits to the lead). A hop between consecutive stages costs
/// `latency + activation bytes / bandwidth` between their leads, a group's lead forwards each
/// activation to its members the same way, and the last stage returns the token id (4 bytes)
/// to the first. Decode time per token of one request is the sum of all of it, since the
/// stages run one after the other.
///
/// Prefill of `P = prompt_len` tokens: each layer costs `max(P · flops / F, weight bytes / B)`
/// (plus all-reduces of `P` activations), hops carry `P` activations, the head runs once, and
/// the time to first token is that whole pass.
///
/// Memory: a node holding `n` layers (or its share of them) needs their weights plus a KV
/// cache of `context_len × concurrent_requests` tokens each, plus the embedding when it leads
/// the first stage and the head (or its share) on the last; scratch activations are not
/// counted.
///
/// Links missing in one direction use the other direction's measurement; pairs measured in
/// neither use [`ClusterProfile::unmeasured_link`]. `docs/partitioning.md` has the formulas in
/// full and worked examples.
///
/// # Errors
///
/// Invalid profiles (zero layers, duplicate node ids, non-positive or NaN throughput, links
/// naming unknown nodes, a prompt longer than the context) are refused with the field named.
/// When nothing fits, [`Error::InsufficientMemory`] gives the shortfall in bytes and the
/// largest context, or the largest model, that would fit. The baseline only refuses when the
/// nodes' memory does not add up to the model's; a baseline split that overruns a node is
/// returned with [`Plan::overruns`] filled in.
pub fn plan(
    model: &ModelProfile,
    cluster: &ClusterProfile,
    request: &RequestProfile,
    strategy: Strategy,
) -> Result<Plan> {
    let ctx = Ctx::new(model, cluster, request)?;
    match strategy {
        Strategy::CostOptimal => {
            let units = units::units(&ctx);
            let found = search::search(&ctx, &units).ok_or_else(|| shortfall(&ctx))?;
            debug_assert_eq!(ctx.decode(&found.stages).total_ps(), found.cost_ps);
            let mut explanation = explain::optimal_stages(&ctx, &units, &found.stages);
            let excluded = explain::optimal_excluded(&ctx, &found.stages);
            Ok(assemble(
                &ctx,
                strategy,
                &found.stages,
                &mut explanation,
                excluded,
            ))
        }
        Strategy::MemoryWeighted => {
            let weights = u128::from(model.weight_bytes());
            let kv = u128::from(model.kv_reserve_bytes(request));
            let offered: u128 = cluster
                .nodes
                .iter()
                .map(|n| u128::from(n.memory_bytes))
                .sum();
            if weights + kv > offered {
                return Err(shortfall(&ctx));
            }
            let stages = baseline::stages(&ctx);
            let mut explanation = explain::baseline_stages(&ctx, &stages);
            let excluded = explain::baseline_excluded(&ctx, &stages);
            Ok(assemble(
                &ctx,
                strategy,
                &stages,
                &mut explanation,
                excluded,
            ))
        }
    }
}

fn assemble(
    ctx: &Ctx<'_>,
    strategy: Strategy,
    stages: &[StageSpec],
    stage_lines: &mut Vec<String>,
    excluded: Vec<ExcludedNode>,
) -> Plan {
    let predicted = ctx.prediction(stages);
    let overruns: Vec<MemoryOverrun> = ctx
        .overruns(stages)
        .into_iter()
        .map(|(node, needed_bytes, offered_bytes)| MemoryOverrun {
            node: ctx.id(node).clone(),
            needed_bytes,
            offered_bytes,
        })
        .collect();
    let mut explanation = vec![
        explain::summary(strategy, &predicted),
        explain::ring(ctx, stages),
    ];
    explanation.append(stage_lines);
    explanation.extend(
        excluded
            .iter()
            .map(|e| format!("{} left out: {}", e.node, e.reason)),
    );
    explanation.extend(overruns.iter().map(|o| {
        format!(
            "{} would need {} but offers {}: the memory-weighted split ignores the KV cache, \
             the embedding and the head",
            o.node,
            format::bytes(o.needed_bytes),
            format::bytes(o.offered_bytes)
        )
    }));
    Plan {
        strategy,
        stages: ctx.stages(stages),
        predicted,
        excluded,
        overruns,
        explanation,
    }
}

/// The error for a cluster the model does not fit, with what would fit instead.
fn shortfall(ctx: &Ctx<'_>) -> Error {
    let (model, request) = (ctx.model, ctx.request);
    let weight_bytes = model.weight_bytes();
    let kv_cache_bytes = model.kv_reserve_bytes(request);
    let needed_bytes = weight_bytes.saturating_add(kv_cache_bytes);
    let available_bytes = ctx
        .nodes
        .iter()
        .fold(0u64, |sum, n| sum.saturating_add(n.memory_bytes));
    let fits = |model: &ModelProfile, request: &RequestProfile| {
        Ctx::new(model, ctx.cluster, request)
            .map(|c| search::search(&c, &units::units(&c)).is_some())
            .unwrap_or(false)
    };
    let max_layers_that_fit = largest(1, model.layers.saturating_sub(1).into(), |layers| {
        let mut smaller = model.clone();
        smaller.layers = u32::try_from(layers).unwrap_or(u32::MAX);
        fits(&smaller, request)
    })
    .map_or(0, |l| u32::try_from(l).unwrap_or(0));
    let max_context_that_fits = largest(1, request.context_len.saturating_sub(1), |context| {
        let mut shorter = request.clone();
        shorter.context_len = context;
        shorter.prompt_len = shorter.prompt_len.min(context);
        fits(model, &shorter)
    });
    let per_layer = model
        .layer_weight_bytes
        .saturating_add(model.kv_reserve_bytes_per_layer(request));
    let shortfall_bytes = if needed_bytes > available_bytes {
        needed_bytes - available_bytes
    } else {
        u64::from(model.layers - max_layers_that_fit).saturating_mul(per_layer)
    };
    let max_model_bytes_that_fit = if max_layers_that_fit == 0 {
        0
    } else {
        u64::from(max_layers_that_fit)
            .saturating_mul(model.layer_weight_bytes)
            .saturating_add(model.embedding_bytes)
            .saturating_add(model.head_bytes)
    };
    Error::InsufficientMemory(Box::new(MemoryShortfall {
        needed_bytes,
        available_bytes,
        shortfall_bytes,
        weight_bytes,
        kv_cache_bytes,
        context_len: request.context_len,
        concurrent_requests: request.concurrent_requests,
        layers: model.layers,
        max_context_that_fits,
        max_layers_that_fit,
        max_model_bytes_that_fit,
    }))
}

/// The largest value in `low..=high` for which `ok` holds, assuming it holds for a prefix.
fn largest(low: u64, high: u64, ok: impl Fn(u64) -> bool) -> Option<u64> {
    if low > high || !ok(low) {
        return None;
    }
    let (mut good, mut bad) = (low, high.saturating_add(1));
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_finds_the_boundary() {
        assert_eq!(largest(1, 100, |x| x <= 37), Some(37));
        assert_eq!(largest(1, 100, |_| true), Some(100));
        assert_eq!(largest(1, 100, |_| false), None);
        assert_eq!(largest(1, 0, |_| true), None);
    }
}
