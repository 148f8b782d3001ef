//! The cost model: validated inputs in canonical order, primitive costs, and the prediction
//! and memory accounting of a placement.
//!
//! Decode costs are kept in whole picoseconds. Integer sums are exact and associative, so the
//! search, the evaluation of its result and the same plan found from a larger cluster all
//! agree to the picosecond; that is what makes "adding a node never raises the predicted time"
//! and "the plan does not depend on node order" hold exactly rather than up to rounding.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::plan::{LayerRange, Prediction, Stage, StageMember};
use crate::profile::{
    ClusterProfile, LinkQuality, ModelProfile, NodeId, NodeProfile, RequestProfile, saturate,
};

/// Bytes of a sampled token id returned from the last stage to the first.
pub(crate) const TOKEN_BYTES: f64 = 4.0;

const PS_PER_S: f64 = 1e12;
/// No single primitive cost is allowed above 1000 s, so sums of many stay far from overflow.
const MAX_PRIMITIVE_PS: f64 = 1e15;

/// Seconds to whole picoseconds, clamped to `0..=1000 s`.
pub(crate) fn to_ps(seconds: f64) -> u64 {
    if seconds.is_nan() || seconds <= 0.0 {
        return 0;
    }
    (seconds * PS_PER_S).round().min(MAX_PRIMITIVE_PS) as u64
}

/// Whole picoseconds to seconds.
pub(crate) fn to_s(ps: u64) -> f64 {
    ps as f64 / PS_PER_S
}

/// One node's part of every layer in a stage: whole KV heads (with their query heads) of the
/// attention, and columns of the MLP (and the same fraction of the head's vocabulary rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Share {
    pub node: usize,
    pub kv_heads: u32,
    pub mlp_columns: u32,
}

/// A stage as the planner works with it: members lead first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StageSpec {
    pub members: Vec<Share>,
    pub layers: u32,
}

impl StageSpec {
    pub fn lead(&self) -> usize {
        self.members.first().map_or(0, |m| m.node)
    }
}

/// A layer's weights or FLOPs, divided between attention and MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    pub attention: u64,
    pub mlp: u64,
}

/// Per-layer decode time of a stage's nodes, split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerCost {
    /// The slowest member's compute or weight reading for its share of the layer.
    pub compute_ps: u64,
    /// The two all-reduces a tensor-parallel layer needs (0 for one node).
    pub all_reduce_ps: u64,
}

impl LayerCost {
    pub fn total_ps(self) -> u64 {
        self.compute_ps.saturating_add(self.all_reduce_ps)
    }
}

/// Decode time per token of a placement, split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct DecodeCost {
    pub compute_ps: u64,
    pub all_reduce_ps: u64,
    pub link_ps: u64,
}

impl DecodeCost {
    pub fn total_ps(self) -> u64 {
        self.compute_ps
            .saturating_add(self.all_reduce_ps)
            .saturating_add(self.link_ps)
    }
}

/// Validated inputs with nodes sorted by id, and the primitive costs derived from them.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub model: &'a ModelProfile,
    pub cluster: &'a ClusterProfile,
    pub request: &'a RequestProfile,
    /// Nodes sorted by id; everything else is indexed the same way.
    pub nodes: Vec<&'a NodeProfile>,
    links: Vec<LinkQuality>,
    /// Which links were not measured in either direction.
    unmeasured: Vec<bool>,
    /// Decode time of one whole layer on each node, seconds and picoseconds.
    pub layer_s: Vec<f64>,
    pub layer_ps: Vec<u64>,
    /// Decode time of the embedding lookup and of the head on each node.
    pub emb_ps: Vec<u64>,
    pub head_ps: Vec<u64>,
    /// A layer's weight bytes and FLOPs per token, attention and MLP apart.
    weights: Split,
    flops: Split,
    /// Per node, seconds per layer of: attention FLOPs, MLP FLOPs, attention bytes (weights
    /// and the KV-cache read at `prompt_len`), MLP bytes.
    coefficients: Vec<[f64; 4]>,
    /// Sending one token's activation, and one token id, from node `i` to `j` (`i * n + j`).
    act_hop_ps: Vec<u64>,
    tok_hop_ps: Vec<u64>,
    /// KV cache one whole layer reserves for the request.
    pub kv_reserve_per_layer: u64,
}

impl<'a> Ctx<'a> {
    pub fn new(
        model: &'a ModelProfile,
        cluster: &'a ClusterProfile,
        request: &'a RequestProfile,
    ) -> Result<Self> {
        model.validate()?;
        request.validate()?;
        if cluster.nodes.is_empty() {
            return Err(Error::NoNodes);
        }
        let mut nodes: Vec<&NodeProfile> = cluster.nodes.iter().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        for pair in nodes.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(Error::DuplicateNode {
                    id: pair[0].id.clone(),
                });
            }
        }
        for node in &nodes {
            for (field, value) in [
                ("flops_per_s", node.flops_per_s),
                ("mem_bandwidth_bytes_per_s", node.mem_bandwidth_bytes_per_s),
            ] {
                if !(value.is_finite() && value > 0.0) {
                    return Err(Error::InvalidNode {
                        node: node.id.clone(),
                        field,
                        value,
                    });
                }
            }
        }
        let n = nodes.len();
        let index: BTreeMap<&NodeId, usize> =
            nodes.iter().enumerate().map(|(i, n)| (&n.id, i)).collect();
        let mut measured: Vec<Option<LinkQuality>> = vec![None; n * n];
        for link in &cluster.links {
            let find = |id: &NodeId| {
                index
                    .get(id)
                    .copied()
                    .ok_or_else(|| Error::UnknownLinkNode {
                        from: link.from.clone(),
                        to: link.to.clone(),
                        unknown: id.clone(),
                    })
            };
            let (from, to) = (find(&link.from)?, find(&link.to)?);
            let invalid = |problem: String| Error::InvalidLink {
                from: link.from.clone(),
                to: link.to.clone(),
                problem,
            };
            if from == to {
                return Err(invalid("goes from a node to itself".to_owned()));
            }
            check_link(link.latency_s, link.bandwidth_bytes_per_s).map_err(invalid)?;
            let slot = &mut measured[from * n + to];
            if slot.is_some() {
                return Err(invalid("is listed more than once".to_owned()));
            }
            *slot = Some(LinkQuality {
                latency_s: link.latency_s,
                bandwidth_bytes_per_s: link.bandwidth_bytes_per_s,
            });
        }
        let fallback = cluster.unmeasured_link;
        check_link(fallback.latency_s, fallback.bandwidth_bytes_per_s).map_err(|problem| {
            Error::InvalidLink {
                from: NodeId::new("*"),
                to: NodeId::new("*"),
                problem: format!("unmeasured_link {problem}"),
            }
        })?;
        let mut links = vec![fallback; n * n];
        let mut unmeasured = vec![false; n * n];
        for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                match (measured[i * n + j], measured[j * n + i]) {
                    (Some(q), _) | (None, Some(q)) => links[i * n + j] = q,
                    (None, None) => unmeasured[i * n + j] = true,
                }
            }
        }

        let prompt = request.prompt_len as f64;
        let kv_read = model.kv_bytes_per_token_per_layer as f64 * prompt;
        let mlp_fraction = mlp_fraction(model);
        let split = |total: u64| {
            let mlp = ((total as f64 * mlp_fraction).floor() as u64).min(total);
            Split {
                attention: total - mlp,
                mlp,
            }
        };
        let layer_bytes = model.layer_weight_bytes as f64 + kv_read;
        let layer_flops = model.layer_flops_per_token as f64;
        let layer_s: Vec<f64> = nodes
            .iter()
            .map(|node| {
                (layer_flops / node.flops_per_s).max(layer_bytes / node.mem_bandwidth_bytes_per_s)
            })
            .collect();
        let layer_ps = layer_s.iter().map(|&s| to_ps(s)).collect();
        let (weights, flops) = (
            split(model.layer_weight_bytes),
            split(model.layer_flops_per_token),
        );
        let coefficients = nodes
            .iter()
            .map(|node| {
                [
                    flops.attention as f64 / node.flops_per_s,
                    flops.mlp as f64 / node.flops_per_s,
                    (weights.attention as f64 + kv_read) / node.mem_bandwidth_bytes_per_s,
                    weights.mlp as f64 / node.mem_bandwidth_bytes_per_s,
                ]
            })
            .collect();
        let emb_row = model.embedding_bytes as f64 / f64::from(model.vocab_size);
        let head_flops = 2.0 * f64::from(model.hidden_size) * f64::from(model.vocab_size);
        let emb_ps = nodes
            .iter()
            .map(|node| to_ps(emb_row / node.mem_bandwidth_bytes_per_s))
            .collect();
        let head_ps = nodes
            .iter()
            .map(|node| {
                to_ps(
                    (head_flops / node.flops_per_s)
                        .max(model.head_bytes as f64 / node.mem_bandwidth_bytes_per_s),
                )
            })
            .collect();
        let activation = f64::from(model.hidden_size) * f64::from(model.activation_bytes);
        let hop =
            |q: &LinkQuality, bytes: f64| to_ps(q.latency_s + bytes / q.bandwidth_bytes_per_s);
        let act_hop_ps = links.iter().map(|q| hop(q, activation)).collect();
        let tok_hop_ps = links.iter().map(|q| hop(q, TOKEN_BYTES)).collect();
        Ok(Self {
            model,
            cluster,
            request,
            weights,
            flops,
            coefficients,
            kv_reserve_per_layer: model.kv_reserve_bytes_per_layer(request),
            nodes,
            links,
            unmeasured,
            layer_s,
            layer_ps,
            emb_ps,
            head_ps,
            act_hop_ps,
            tok_hop_ps,
        })
    }

    pub fn n(&self) -> usize {
        self.nodes.len()
    }

    pub fn layers(&self) -> u32 {
        self.model.layers
    }

    pub fn kv_heads(&self) -> u32 {
        self.model.kv_heads
    }

    pub fn id(&self, node: usize) -> &NodeId {
        &self.nodes[node].id
    }

    pub fn link(&self, from: usize, to: usize) -> LinkQuality {
        self.links[from * self.n() + to]
    }

    pub fn is_unmeasured(&self, from: usize, to: usize) -> bool {
        self.unmeasured[from * self.n() + to]
    }

    /// Sending one token's activation from `from` to `to` (0 on the same node).
    pub fn act_hop_ps(&self, from: usize, to: usize) -> u64 {
        if from == to {
            0
        } else {
            self.act_hop_ps[from * self.n() + to]
        }
    }

    /// Returning a token id from `from` to `to` (0 on the same node).
    pub fn tok_hop_ps(&self, from: usize, to: usize) -> u64 {
        if from == to {
            0
        } else {
            self.tok_hop_ps[from * self.n() + to]
        }
    }

    fn activation_bytes(&self) -> f64 {
        f64::from(self.model.hidden_size) * f64::from(self.model.activation_bytes)
    }

    /// Weight and KV-cache bytes per layer for a member computing `share` of every layer.
    /// Shares are rounded up, so members never under-reserve.
    pub fn share_bytes_per_layer(&self, share: &Share) -> (u64, u64) {
        let heads = u128::from(self.kv_heads());
        let columns = u128::from(self.model.intermediate_size);
        let part = |bytes: u64, num: u32, den: u128| {
            saturate((u128::from(bytes) * u128::from(num)).div_ceil(den))
        };
        (
            part(self.weights.attention, share.kv_heads, heads).saturating_add(part(
                self.weights.mlp,
                share.mlp_columns,
                columns,
            )),
            part(self.kv_reserve_per_layer, share.kv_heads, heads),
        )
    }

    /// Fractions of the attention and of the MLP (and head) a share computes.
    fn fractions(&self, share: &Share) -> (f64, f64) {
        (
            f64::from(share.kv_heads) / f64::from(self.kv_heads()),
            f64::from(share.mlp_columns) / f64::from(self.model.intermediate_size),
        )
    }

    /// Decode time of a share of one layer, seconds: `max(flops / F, bytes / B)` over its
    /// part of the attention (with its KV heads' cache reads) and of the MLP.
    pub fn share_layer_s(&self, share: &Share) -> f64 {
        let (a, m) = self.fractions(share);
        let [fa, fm, ba, bm] = self.coefficients[share.node];
        (a * fa + m * fm).max(a * ba + m * bm)
    }

    /// A member's share of a layer as `(fixed, per column)` seconds, once for compute and
    /// once for memory traffic: with `kv_heads` on `node` and `c` MLP columns, its time is the
    /// larger of `fixed + c · per column` over the two.
    pub fn share_lines(&self, node: usize, kv_heads: u32) -> [(f64, f64); 2] {
        let a = f64::from(kv_heads) / f64::from(self.kv_heads());
        let per_column = 1.0 / f64::from(self.model.intermediate_size);
        let [fa, fm, ba, bm] = self.coefficients[node];
        [(a * fa, fm * per_column), (a * ba, bm * per_column)]
    }

    /// The two all-reduces of one token's activation among `nodes`, picoseconds.
    pub fn all_reduce_ps(&self, nodes: &[usize]) -> u64 {
        let members: Vec<Share> = nodes
            .iter()
            .map(|&node| Share {
                node,
                kv_heads: 0,
                mlp_columns: 0,
            })
            .collect();
        to_ps(self.all_reduce_s(&members, self.activation_bytes()))
    }

    /// Per-layer decode time of a stage's members.
    ///
    /// One node: `max(flops / F, (weights + KV read) / B)`. A tensor-parallel group: the
    /// slowest member's share of that, plus two ring all-reduces of the activation.
    pub fn layer_cost(&self, members: &[Share]) -> LayerCost {
        if let [share] = members {
            return LayerCost {
                compute_ps: self.layer_ps[share.node],
                all_reduce_ps: 0,
            };
        }
        let compute = members
            .iter()
            .map(|share| self.share_layer_s(share))
            .fold(0.0, f64::max);
        LayerCost {
            compute_ps: to_ps(compute),
            all_reduce_ps: to_ps(self.all_reduce_s(members, self.activation_bytes())),
        }
    }

    /// The head for one token, split as `(compute, gather)`: each member computes the logits
    /// of its fraction of the vocabulary (the fraction of MLP columns it has), and the other
    /// members send theirs to the lead (f32 logits) to sample.
    pub fn head_cost_ps(&self, members: &[Share]) -> (u64, u64) {
        if let [share] = members {
            return (self.head_ps[share.node], 0);
        }
        let (compute, gather) = self.head_cost_s(members);
        (to_ps(compute), to_ps(gather))
    }

    fn head_cost_s(&self, members: &[Share]) -> (f64, f64) {
        let flops = 2.0 * f64::from(self.model.hidden_size) * f64::from(self.model.vocab_size);
        let logits = 4.0 * f64::from(self.model.vocab_size);
        let lead = members.first().map_or(0, |m| m.node);
        let mut compute = 0.0f64;
        let mut gather = 0.0f64;
        for (i, share) in members.iter().enumerate() {
            let (_, m) = self.fractions(share);
            let node = self.nodes[share.node];
            compute = compute.max(
                (m * flops / node.flops_per_s)
                    .max(m * self.model.head_bytes as f64 / node.mem_bandwidth_bytes_per_s),
            );
            if i > 0 {
                let q = self.link(share.node, lead);
                gather = gather.max(q.latency_s + m * logits / q.bandwidth_bytes_per_s);
            }
        }
        (compute, gather)
    }

    /// Two ring all-reduces of `bytes` among `members`: each is `2 (g - 1)` steps in which
    /// every member sends `bytes / g` to its ring neighbour, so a step takes as long as the
    /// slowest link of the ring. The ring order with the fastest slowest link is used.
    pub fn all_reduce_s(&self, members: &[Share], bytes: f64) -> f64 {
        let g = members.len();
        if g < 2 {
            return 0.0;
        }
        let chunk = bytes / g as f64;
        let step = |from: usize, to: usize| {
            let q = self.link(members[from].node, members[to].node);
            q.latency_s + chunk / q.bandwidth_bytes_per_s
        };
        // Rings start at member 0; the others follow in every order.
        let mut rest: Vec<usize> = (1..g).collect();
        let mut best = f64::INFINITY;
        loop {
            let mut slowest = step(0, rest[0]).max(step(rest[g - 2], 0));
            for pair in rest.windows(2) {
                slowest = slowest.max(step(pair[0], pair[1]));
            }
            best = best.min(slowest);
            if !next_permutation(&mut rest) {
                break;
            }
        }
        2.0 * 2.0 * (g as f64 - 1.0) * best
    }

    /// The lead forwarding one token's activation to the other members (0 for one node).
    pub fn forward_ps(&self, members: &[Share]) -> u64 {
        let lead = members.first().map_or(0, |m| m.node);
        members
            .iter()
            .skip(1)
            .map(|share| self.act_hop_ps(lead, share.node))
            .max()
            .unwrap_or(0)
    }

    /// Decode time per token of a placement in ring order.
    ///
    /// Each stage costs `layers × layer cost + forwarding`, plus the embedding on the first
    /// and the head on the last; each hop between consecutive stages costs
    /// `latency + activation bytes / bandwidth` between their leads; the last stage's lead
    /// returns the token id to the first stage's lead.
    pub fn decode(&self, stages: &[StageSpec]) -> DecodeCost {
        let mut cost = DecodeCost::default();
        let last = stages.len().saturating_sub(1);
        for (s, stage) in stages.iter().enumerate() {
            let layer = self.layer_cost(&stage.members);
            let layers = u64::from(stage.layers);
            cost.compute_ps = cost
                .compute_ps
                .saturating_add(layers.saturating_mul(layer.compute_ps));
            cost.all_reduce_ps = cost
                .all_reduce_ps
                .saturating_add(layers.saturating_mul(layer.all_reduce_ps));
            cost.link_ps = cost.link_ps.saturating_add(self.forward_ps(&stage.members));
            let lead = stage.lead();
            if s == 0 {
                cost.compute_ps = cost.compute_ps.saturating_add(self.emb_ps[lead]);
            }
            if s == last {
                let (head, gather) = self.head_cost_ps(&stage.members);
                cost.compute_ps = cost.compute_ps.saturating_add(head);
                cost.link_ps = cost.link_ps.saturating_add(gather);
            }
            let hop = if s < last {
                self.act_hop_ps(lead, stages[s + 1].lead())
            } else {
                self.tok_hop_ps(lead, stages[0].lead())
            };
            cost.link_ps = cost.link_ps.saturating_add(hop);
        }
        cost
    }

    /// Prefill time of a `prompt_len`-token prompt, seconds: every stage processes the whole
    /// prompt at once (compute `P × flops` against one read of its weights), every hop carries
    /// `P` activations, and the head runs for the last position only.
    pub fn prefill_s(&self, stages: &[StageSpec]) -> f64 {
        let prompt = self.request.prompt_len as f64;
        let activations = self.activation_bytes() * prompt;
        let bulk_hop = |from: usize, to: usize| {
            if from == to {
                return 0.0;
            }
            let q = self.link(from, to);
            q.latency_s + activations / q.bandwidth_bytes_per_s
        };
        let last = stages.len().saturating_sub(1);
        let mut total = 0.0;
        for (s, stage) in stages.iter().enumerate() {
            let share_time = |share: &Share| {
                let (a, m) = self.fractions(share);
                let p = self.nodes[share.node];
                let flops = prompt * (a * self.flops.attention as f64 + m * self.flops.mlp as f64);
                let bytes = a * self.weights.attention as f64 + m * self.weights.mlp as f64;
                (flops / p.flops_per_s).max(bytes / p.mem_bandwidth_bytes_per_s)
            };
            let layer = stage.members.iter().map(share_time).fold(0.0, f64::max)
                + self.all_reduce_s(&stage.members, activations);
            let lead = stage.lead();
            let forward = stage
                .members
                .iter()
                .skip(1)
                .map(|share| bulk_hop(lead, share.node))
                .fold(0.0, f64::max);
            total += f64::from(stage.layers) * layer + forward;
            if s == last {
                let (head, gather) = self.head_cost_ps(&stage.members);
                total += to_s(head) + to_s(gather);
            } else {
                total += bulk_hop(lead, stages[s + 1].lead());
            }
        }
        total
    }

    pub fn prediction(&self, stages: &[StageSpec]) -> Prediction {
        let decode = self.decode(stages);
        let time = to_s(decode.total_ps());
        let ttft = self.prefill_s(stages);
        Prediction {
            time_per_token_s: time,
            decode_tokens_per_s: rate(1.0, time),
            compute_s: to_s(decode.compute_ps),
            all_reduce_s: to_s(decode.all_reduce_ps),
            link_s: to_s(decode.link_ps),
            prompt_len: self.request.prompt_len,
            prefill_tokens_per_s: rate(self.request.prompt_len as f64, ttft),
            ttft_s: ttft,
        }
    }

    /// Weight and KV-cache bytes member `m` of stage `s` holds.
    pub fn member_bytes(&self, stages: &[StageSpec], s: usize, m: usize) -> (u64, u64) {
        let stage = &stages[s];
        let (weights, kv) = self.share_bytes_per_layer(&stage.members[m]);
        let layers = u128::from(stage.layers);
        let extra = self.extra_bytes(&stage.members, m, s == 0, s + 1 == stages.len());
        (
            saturate(u128::from(weights) * layers + u128::from(extra)),
            saturate(u128::from(kv) * layers),
        )
    }

    /// Bytes member `m` holds besides its layers: the whole embedding on the first stage's
    /// lead, and on the last stage the head, whole for one node, split like the MLP columns
    /// in a group.
    pub fn extra_bytes(&self, members: &[Share], m: usize, first: bool, last: bool) -> u64 {
        let mut extra = 0u64;
        if first && m == 0 {
            extra = extra.saturating_add(self.model.embedding_bytes);
        }
        if last {
            let head = match members {
                [_] => self.model.head_bytes,
                _ => saturate(
                    (u128::from(self.model.head_bytes) * u128::from(members[m].mlp_columns))
                        .div_ceil(u128::from(self.model.intermediate_size)),
                ),
            };
            extra = extra.saturating_add(head);
        }
        extra
    }

    /// Nodes asked for more than they offer: `(node, needed, offered)`.
    pub fn overruns(&self, stages: &[StageSpec]) -> Vec<(usize, u64, u64)> {
        let mut needed: BTreeMap<usize, u64> = BTreeMap::new();
        for (s, stage) in stages.iter().enumerate() {
            for (m, share) in stage.members.iter().enumerate() {
                let (w, kv) = self.member_bytes(stages, s, m);
                let entry = needed.entry(share.node).or_default();
                *entry = entry.saturating_add(w).saturating_add(kv);
            }
        }
        needed
            .into_iter()
            .filter(|&(node, bytes)| bytes > self.nodes[node].memory_bytes)
            .map(|(node, bytes)| (node, bytes, self.nodes[node].memory_bytes))
            .collect()
    }

    /// Nodes no stage uses, in id order.
    pub fn unused(&self, stages: &[StageSpec]) -> Vec<usize> {
        let used: BTreeSet<usize> = stages
            .iter()
            .flat_map(|s| s.members.iter().map(|m| m.node))
            .collect();
        (0..self.n()).filter(|i| !used.contains(i)).collect()
    }

    /// The public form of a placement.
    pub fn stages(&self, stages: &[StageSpec]) -> Vec<Stage> {
        let q_per_kv = self.model.attention_heads / self.kv_heads();
        let mut start = 0;
        let last = stages.len().saturating_sub(1);
        stages
            .iter()
            .enumerate()
            .map(|(s, stage)| {
                let layers = LayerRange {
                    start,
                    end: start + stage.layers,
                };
                start = layers.end;
                let members = stage
                    .members
                    .iter()
                    .enumerate()
                    .map(|(m, share)| {
                        let (weight_bytes, kv_cache_bytes) = self.member_bytes(stages, s, m);
                        StageMember {
                            node: self.id(share.node).clone(),
                            kv_heads: share.kv_heads,
                            attention_heads: share.kv_heads * q_per_kv,
                            mlp_columns: share.mlp_columns,
                            weight_bytes,
                            kv_cache_bytes,
                        }
                    })
                    .collect();
                Stage {
                    layers,
                    members,
                    holds_embedding: s == 0,
                    holds_head: s == last,
                }
            })
            .collect()
    }
}

/// The MLP's part of a layer's weights and FLOPs, in the proportions of a Llama layer: the
/// MLP has `3 · hidden · intermediate` weights, the attention `2 · hidden²` (q and o) plus
/// `2 · hidden · kv_dim` (k and v), with `kv_dim = hidden · kv_heads / heads`.
pub(crate) fn mlp_fraction(model: &ModelProfile) -> f64 {
    let hidden = f64::from(model.hidden_size);
    let kv_dim = hidden * f64::from(model.kv_heads) / f64::from(model.attention_heads);
    let attention = 2.0 * hidden * hidden + 2.0 * hidden * kv_dim;
    let mlp = 3.0 * hidden * f64::from(model.intermediate_size);
    mlp / (attention + mlp)
}

fn rate(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        amount / seconds
    } else {
        f64::INFINITY
    }
}

fn check_link(latency_s: f64, bandwidth: f64) -> std::result::Result<(), String> {
    if !(latency_s.is_finite() && latency_s >= 0.0) {
        return Err(format!(
            "latency_s is {latency_s}, expected a finite number of seconds >= 0"
        ));
    }
    if !(bandwidth.is_finite() && bandwidth > 0.0) {
        return Err(format!(
            "bandwidth_bytes_per_s is {bandwidth}, expected a positive finite number"
        ));
    }
    Ok(())
}

/// Rearranges `items` into the next lexicographic permutation; false after the last one.
fn next_permutation(items: &mut [usize]) -> bool {
    let Some(i) = items.windows(2).rposition(|w| w[0] < w[1]) else {
        return false;
    };
    let Some(j) = items.iter().rposition(|&x| x > items[i]) else {
        return false;
    };
    items.swap(i, j);
    items[i + 1..].reverse();
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::profile::{LinkProfile, NodeProfile};

    fn model() -> ModelProfile {
        ModelProfile {
            layers: 4,
            layer_weight_bytes: 1_000_000,
            embedding_bytes: 2_000_000,
            head_bytes: 2_000_000,
            layer_flops_per_token: 2_000_000,
            hidden_size: 1000,
            intermediate_size: 3000,
            attention_heads: 8,
            kv_heads: 4,
            kv_bytes_per_token_per_layer: 100,
            vocab_size: 1000,
            activation_bytes: 2,
        }
    }

    fn cluster() -> ClusterProfile {
        ClusterProfile::new(
            vec![
                NodeProfile::new("b", 10_000_000, 1e9, 1e9, "ndarray"),
                NodeProfile::new("a", 10_000_000, 1e9, 1e9, "ndarray"),
            ],
            vec![LinkProfile::new("a", "b", 1e-3, 1e6)],
        )
    }

    #[test]
    fn nodes_are_sorted_and_missing_direction_mirrors_measured_one() {
        let (model, cluster, request) = (model(), cluster(), RequestProfile::new(10, 10));
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        assert_eq!(ctx.id(0).as_str(), "a");
        assert_eq!(ctx.link(1, 0), ctx.link(0, 1));
        assert!(!ctx.is_unmeasured(1, 0));
        // 1 ms + 2000 bytes at 1 MB/s.
        assert_eq!(ctx.act_hop_ps(0, 1), to_ps(3e-3));
    }

    #[test]
    fn decode_cost_adds_stages_hops_and_token_return() {
        let (model, cluster, request) = (model(), cluster(), RequestProfile::new(10, 10));
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        let whole = |node| Share {
            node,
            kv_heads: 4,
            mlp_columns: 3000,
        };
        let stages = [
            StageSpec {
                members: vec![whole(0)],
                layers: 3,
            },
            StageSpec {
                members: vec![whole(1)],
                layers: 1,
            },
        ];
        let cost = ctx.decode(&stages);
        // A layer reads 1 MB + 100 B x 10 tokens of KV at 1 GB/s: 1.001 ms; 2 MFLOP at 1 GFLOP/s
        // is 2 ms, so compute-bound.
        let layer = to_ps(2e-3);
        // Embedding row 2 kB at 1 GB/s; head max(2 MFLOP / 1 GFLOP/s, 2 MB / 1 GB/s) = 2 ms.
        let expected_compute = 4 * layer + to_ps(2e-6) + to_ps(2e-3);
        assert_eq!(cost.compute_ps, expected_compute);
        assert_eq!(cost.link_ps, to_ps(3e-3) + to_ps(1e-3 + 4.0 / 1e6));
        assert_eq!(cost.all_reduce_ps, 0);
    }

    #[test]
    fn all_reduce_follows_ring_formula() {
        let (model, cluster, request) = (model(), cluster(), RequestProfile::new(10, 10));
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        // Two members: 2 all-reduces x 2 steps x (1 ms + 1000 B / 1 MB/s).
        let half = |node| Share {
            node,
            kv_heads: 2,
            mlp_columns: 1500,
        };
        let s = ctx.all_reduce_s(&[half(0), half(1)], 2000.0);
        assert!((s - 4.0 * 2e-3).abs() < 1e-12, "{s}");
    }

    #[test]
    fn links_naming_unknown_nodes_are_rejected() {
        let (model, mut cluster, request) = (model(), cluster(), RequestProfile::new(10, 10));
        cluster.links.push(LinkProfile::new("a", "zz", 1e-3, 1e6));
        let err = Ctx::new(&model, &cluster, &request).unwrap_err();
        assert_eq!(err.to_string(), "link a -> zz names unknown node zz");
    }

    #[test]
    fn nan_throughput_is_rejected() {
        let (model, mut cluster, request) = (model(), cluster(), RequestProfile::new(10, 10));
        cluster.nodes[0].flops_per_s = f64::NAN;
        let err = Ctx::new(&model, &cluster, &request).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node b: flops_per_s is NaN, expected a positive finite number"
        );
    }

    #[test]
    fn permutations_cover_every_order() {
        let mut items = vec![0, 1, 2];
        let mut count = 1;
        while next_permutation(&mut items) {
            count += 1;
        }
        assert_eq!(count, 6);
    }
}
