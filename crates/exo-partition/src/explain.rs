//! Sentences that say why a plan looks the way it does.

use crate::cost::{Ctx, DecodeCost, StageSpec, to_s};
use crate::format::{bytes, ordinal, plural, rate, time};
use crate::plan::{ExcludedNode, Prediction, Strategy};
use crate::units::{Role, Unit, whole};

/// The summary line: predictions and where the time goes.
pub(crate) fn summary(strategy: Strategy, p: &Prediction) -> String {
    let name = match strategy {
        Strategy::CostOptimal => "cost-optimal plan",
        Strategy::MemoryWeighted => {
            "exo's ring memory-weighted split (layers in proportion to memory; compute and \
             links ignored)"
        }
    };
    format!(
        "{name}: predicted {:.2} tokens/s decode ({} per token: {} compute, {} all-reduce, {} \
         on links); prefill of {} at {:.0} tokens/s, first token after {}",
        p.decode_tokens_per_s,
        time(p.time_per_token_s),
        time(p.compute_s),
        time(p.all_reduce_s),
        time(p.link_s),
        plural(p.prompt_len, "token"),
        p.prefill_tokens_per_s,
        time(p.ttft_s),
    )
}

/// `ring: a -> b+c -> d -> back to a`, with the hop costs.
pub(crate) fn ring(ctx: &Ctx<'_>, stages: &[StageSpec]) -> String {
    let name = |stage: &StageSpec| {
        stage
            .members
            .iter()
            .map(|share| ctx.id(share.node).as_str())
            .collect::<Vec<_>>()
            .join("+")
    };
    let mut line = String::from("ring: ");
    for (s, stage) in stages.iter().enumerate() {
        line.push_str(&name(stage));
        if let Some(next) = stages.get(s + 1) {
            let hop = ctx.act_hop_ps(stage.lead(), next.lead());
            line.push_str(&format!(" -({})-> ", time(to_s(hop))));
        }
    }
    match stages {
        [_, .., last] => {
            let back = ctx.tok_hop_ps(last.lead(), stages[0].lead());
            line.push_str(&format!(
                " -({})-> back to {}",
                time(to_s(back)),
                ctx.id(stages[0].lead())
            ));
        }
        _ => line.push_str(" (one stage, no hops)"),
    }
    line
}

fn share(ctx: &Ctx<'_>, stage: &StageSpec, start: u32) -> String {
    format!(
        "layers {start}..{} ({:.0}% of {})",
        start + stage.layers,
        100.0 * f64::from(stage.layers) / f64::from(ctx.layers()),
        ctx.layers()
    )
}

fn extras(role: Role) -> &'static str {
    match role {
        Role::First => ", plus the embedding",
        Role::Last => ", plus the output head",
        Role::Only => ", plus the embedding and the output head",
        Role::Middle => "",
    }
}

/// One line per stage of a cost-optimal plan.
pub(crate) fn optimal_stages(ctx: &Ctx<'_>, units: &[Unit], stages: &[StageSpec]) -> Vec<String> {
    let mut start = 0;
    let mut lines = Vec::new();
    for (s, stage) in stages.iter().enumerate() {
        let role = Role::of(s, stages.len());
        let cap = units
            .iter()
            .find(|u| u.members == stage.members)
            .map_or(0, |u| u.cap(role));
        let range = share(ctx, stage, start);
        start += stage.layers;
        let lead = stage.lead();
        let line = if let [only] = stage.members[..] {
            let node = only.node;
            let faster = (0..ctx.n())
                .filter(|&x| ctx.layer_ps[x] < ctx.layer_ps[node])
                .count();
            let tied = (0..ctx.n())
                .filter(|&x| x != node && ctx.layer_ps[x] == ctx.layer_ps[node])
                .count();
            let room = if stage.layers == ctx.layers() {
                format!(
                    "it holds the whole model in the {} it offers",
                    bytes(ctx.nodes[node].memory_bytes)
                )
            } else if stage.layers >= cap {
                format!(
                    "that is all that fits in the {} it offers with {} of KV cache per layer",
                    bytes(ctx.nodes[node].memory_bytes),
                    bytes(ctx.kv_reserve_per_layer)
                )
            } else {
                format!(
                    "it has room for {}, but the rest run cheaper elsewhere",
                    plural(u64::from(cap), "layer")
                )
            };
            let rank = match (faster, tied) {
                (0, 0) => "the fastest".to_owned(),
                (0, _) => "tied fastest".to_owned(),
                (f, 0) => format!("the {} fastest", ordinal(f + 1)),
                (f, _) => format!("tied {} fastest", ordinal(f + 1)),
            };
            format!(
                "{} holds {range}{} at {} per layer, {rank} of {} nodes; {room}",
                ctx.id(node),
                extras(role),
                time(to_s(ctx.layer_ps[node])),
                ctx.n(),
            )
        } else {
            let shares = stage
                .members
                .iter()
                .map(|share| {
                    format!(
                        "{} {} of {} KV heads and {:.0}% of the MLP",
                        ctx.id(share.node),
                        share.kv_heads,
                        ctx.kv_heads(),
                        100.0 * f64::from(share.mlp_columns)
                            / f64::from(ctx.model.intermediate_size)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let names = stage
                .members
                .iter()
                .map(|share| ctx.id(share.node).as_str())
                .collect::<Vec<_>>()
                .join(" + ");
            let cost = ctx.layer_cost(&stage.members);
            let fastest = stage
                .members
                .iter()
                .map(|m| m.node)
                .min_by_key(|&x| (ctx.layer_ps[x], x))
                .unwrap_or(lead);
            let saved = ctx.layer_ps[fastest].saturating_sub(cost.compute_ps);
            let slowest_link = stage
                .members
                .iter()
                .flat_map(|a| stage.members.iter().map(move |b| (a.node, b.node)))
                .filter(|(a, b)| a != b)
                .map(|(a, b)| ctx.link(a, b))
                .max_by(|x, y| x.latency_s.total_cmp(&y.latency_s))
                .unwrap_or_else(|| ctx.link(lead, lead));
            format!(
                "{names} split {range}{} as a tensor-parallel group ({shares}); their \
                 links (at worst {} latency, {}) keep the all-reduce to {} per layer, less than \
                 the {} per layer the split saves against {} alone",
                extras(role),
                time(slowest_link.latency_s),
                rate(slowest_link.bandwidth_bytes_per_s),
                time(to_s(cost.all_reduce_ps)),
                time(to_s(saved)),
                ctx.id(fastest),
            )
        };
        lines.push(line);
    }
    lines
}

/// Why each node a cost-optimal plan does not use was left out.
pub(crate) fn optimal_excluded(ctx: &Ctx<'_>, stages: &[StageSpec]) -> Vec<ExcludedNode> {
    let base = ctx.decode(stages);
    ctx.unused(stages)
        .into_iter()
        .map(|x| {
            let node = ctx.nodes[x];
            let (weights, kv) = ctx.share_bytes_per_layer(&whole(ctx, x));
            let one_layer = weights.saturating_add(kv);
            if node.memory_bytes < one_layer {
                return ExcludedNode {
                    node: node.id.clone(),
                    reason: format!(
                        "it offers {} but one layer with its KV cache needs {}",
                        bytes(node.memory_bytes),
                        bytes(one_layer)
                    ),
                    added_time_per_token_s: None,
                };
            }
            let Some(best) = cheapest_insertion(ctx, stages, x) else {
                return ExcludedNode {
                    node: node.id.clone(),
                    reason: "no stage can give it a layer without running out of memory".to_owned(),
                    added_time_per_token_s: None,
                };
            };
            let added = i128::from(best.cost.total_ps()) - i128::from(base.total_ps());
            let reason = if added > 0 {
                let link = ctx.link(best.prev, x);
                let measured = if ctx.is_unmeasured(best.prev, x) {
                    ", unmeasured"
                } else {
                    ""
                };
                let mut parts = Vec::new();
                let links = i128::from(best.cost.link_ps) - i128::from(base.link_ps);
                if links > 0 {
                    parts.push(format!(
                        "{} more on links from {} ({} latency, {}{measured})",
                        time(links as f64 / 1e12),
                        ctx.id(best.prev),
                        time(link.latency_s),
                        rate(link.bandwidth_bytes_per_s),
                    ));
                }
                let work = |c: DecodeCost| i128::from(c.compute_ps) + i128::from(c.all_reduce_ps);
                let compute = work(best.cost) - work(base);
                if compute > 0 {
                    parts.push(format!(
                        "{} more compute ({} per layer against {} on {})",
                        time(compute as f64 / 1e12),
                        time(to_s(ctx.layer_ps[x])),
                        time(to_s(ctx.layer_ps[best.donor])),
                        ctx.id(best.donor),
                    ));
                }
                format!(
                    "including it would add {} per token, {}; the plan fits without its memory",
                    time(added as f64 / 1e12),
                    parts.join(" and ")
                )
            } else {
                format!(
                    "the ring orders searched have no place for it; inserting it after {} is \
                     predicted to save {} per token",
                    ctx.id(best.prev),
                    time(-added as f64 / 1e12)
                )
            };
            ExcludedNode {
                node: node.id.clone(),
                reason,
                added_time_per_token_s: Some(added as f64 / 1e12),
            }
        })
        .collect()
}

struct Insertion {
    cost: DecodeCost,
    /// The lead of the stage before it in the ring.
    prev: usize,
    /// The lead of the stage that gave it its layer.
    donor: usize,
}

/// The cheapest way to put node `x` into the ring as a one-layer stage, taking the layer from
/// a neighbouring stage, that fits every node's memory.
fn cheapest_insertion(ctx: &Ctx<'_>, stages: &[StageSpec], x: usize) -> Option<Insertion> {
    let mut best: Option<Insertion> = None;
    for at in 0..=stages.len() {
        let donor = [at.checked_sub(1), Some(at)]
            .into_iter()
            .flatten()
            .find(|&d| stages.get(d).is_some_and(|s| s.layers >= 2));
        let Some(donor) = donor else {
            continue;
        };
        let mut trial = stages.to_vec();
        trial[donor].layers -= 1;
        trial.insert(
            at,
            StageSpec {
                members: vec![whole(ctx, x)],
                layers: 1,
            },
        );
        if !ctx.overruns(&trial).is_empty() {
            continue;
        }
        let cost = ctx.decode(&trial);
        if best
            .as_ref()
            .is_none_or(|b| cost.total_ps() < b.cost.total_ps())
        {
            let prev = trial[(at + trial.len() - 1) % trial.len()].lead();
            best = Some(Insertion {
                cost,
                prev,
                donor: stages[donor].lead(),
            });
        }
    }
    best
}

/// One line per stage of a memory-weighted plan.
pub(crate) fn baseline_stages(ctx: &Ctx<'_>, stages: &[StageSpec]) -> Vec<String> {
    let total: u128 = ctx.nodes.iter().map(|n| u128::from(n.memory_bytes)).sum();
    let mut start = 0;
    let mut lines = Vec::new();
    for (s, stage) in stages.iter().enumerate() {
        let node = stage.lead();
        let offered = ctx.nodes[node].memory_bytes;
        lines.push(format!(
            "{} holds {}{} because it offers {:.0}% of the cluster's memory ({})",
            ctx.id(node),
            share(ctx, stage, start),
            extras(Role::of(s, stages.len())),
            percent(u128::from(offered), total),
            bytes(offered),
        ));
        start += stage.layers;
    }
    lines
}

/// Why each node a memory-weighted plan does not use was left out.
pub(crate) fn baseline_excluded(ctx: &Ctx<'_>, stages: &[StageSpec]) -> Vec<ExcludedNode> {
    let total: u128 = ctx.nodes.iter().map(|n| u128::from(n.memory_bytes)).sum();
    ctx.unused(stages)
        .into_iter()
        .map(|x| ExcludedNode {
            node: ctx.id(x).clone(),
            reason: format!(
                "its {:.1}% share of the cluster's memory rounds to zero of {}",
                percent(u128::from(ctx.nodes[x].memory_bytes), total),
                plural(u64::from(ctx.layers()), "layer"),
            ),
            added_time_per_token_s: None,
        })
        .collect()
}

fn percent(part: u128, total: u128) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * part as f64 / total as f64
    }
}
