//! Units a stage can be held by: one node, or a tensor-parallel group of nodes.
//!
//! Whether a group is a candidate depends only on its own members and the links among them,
//! never on the rest of the cluster: a node that joins the cluster cannot remove a candidate.

use crate::cost::{Ctx, Share, StageSpec};

/// Largest tensor-parallel group considered. Each all-reduce takes `2 (g - 1)` link latencies,
/// which on home networks eats the gain of wider groups.
pub(crate) const MAX_GROUP: usize = 4;

/// At most this many tensor-parallel groups enter the search (the ones that save the most per
/// layer). Clusters of up to 9 nodes never reach it (9 nodes have 246 groups of 2 to 4).
pub(crate) const MAX_CANDIDATE_GROUPS: usize = 256;

/// The role a stage plays in the ring, which decides whether its lead also holds the
/// embedding, the head, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Middle = 0,
    First = 1,
    Last = 2,
    Only = 3,
}

impl Role {
    pub fn of(stage: usize, stages: usize) -> Self {
        match (stage == 0, stage + 1 == stages) {
            (true, true) => Self::Only,
            (true, false) => Self::First,
            (false, true) => Self::Last,
            (false, false) => Self::Middle,
        }
    }

    fn holds_embedding(self) -> bool {
        matches!(self, Self::First | Self::Only)
    }

    fn holds_head(self) -> bool {
        matches!(self, Self::Last | Self::Only)
    }
}

/// One node or a tensor-parallel group, with everything the search needs about it.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    /// Lead first, then by node index.
    pub members: Vec<Share>,
    /// Decode time per layer, all-reduce included.
    pub layer_ps: u64,
    /// The head for one token, gathering the logits included, when this unit is last.
    pub head_ps: u64,
    /// The lead forwarding each token's activation to the other members.
    pub forward_ps: u64,
    /// Most layers it can hold in each [`Role`].
    pub caps: [u32; 4],
}

impl Unit {
    pub fn lead(&self) -> usize {
        self.members.first().map_or(0, |m| m.node)
    }

    pub fn contains(&self, node: usize) -> bool {
        self.members.iter().any(|m| m.node == node)
    }

    pub fn cap(&self, role: Role) -> u32 {
        self.caps[role as usize]
    }

    pub fn spec(&self, layers: u32) -> StageSpec {
        StageSpec {
            members: self.members.clone(),
            layers,
        }
    }
}

/// Every node that can hold a layer, then every candidate tensor-parallel group.
pub(crate) fn units(ctx: &Ctx<'_>) -> Vec<Unit> {
    let n = ctx.n();
    let mut units: Vec<Unit> = (0..n)
        .map(|node| unit(ctx, vec![whole(ctx, node)]))
        .filter(|u| u.cap(Role::Middle) > 0)
        .collect();
    let mut groups: Vec<(u64, Unit)> = Vec::new();
    let largest = MAX_GROUP
        .min(n)
        .min(usize::try_from(ctx.kv_heads()).unwrap_or(usize::MAX))
        .min(usize::try_from(ctx.cluster.max_tensor_parallel).unwrap_or(usize::MAX));
    for size in 2..=largest {
        for_each_combination(n, size, &mut |nodes| {
            if let Some(group) = group(ctx, nodes) {
                groups.push(group);
            }
        });
    }
    if groups.len() > MAX_CANDIDATE_GROUPS {
        // Keep the groups that save the most; the sort is stable, so ties keep id order.
        groups.sort_by_key(|g| std::cmp::Reverse(g.0));
        groups.truncate(MAX_CANDIDATE_GROUPS);
    }
    units.extend(groups.into_iter().map(|(_, u)| u));
    units
}

/// The share of a node that holds a stage alone.
pub(crate) fn whole(ctx: &Ctx<'_>, node: usize) -> Share {
    Share {
        node,
        kv_heads: ctx.kv_heads(),
        mlp_columns: ctx.model.intermediate_size,
    }
}

/// A group of `nodes` as a unit, with what it saves per layer over its fastest member alone,
/// if it saves anything and can hold a layer.
fn group(ctx: &Ctx<'_>, nodes: &[usize]) -> Option<(u64, Unit)> {
    let fastest = nodes.iter().map(|&node| ctx.layer_ps[node]).min()?;
    // The all-reduce alone must leave room for a gain before the shares are worth working out.
    if ctx.all_reduce_ps(nodes) >= fastest {
        return None;
    }
    let shares = split(ctx, nodes)?;
    // The lead holds the embedding, so it is the member with the most memory.
    let lead = (0..nodes.len()).max_by(|&a, &b| {
        let (ma, mb) = (
            ctx.nodes[nodes[a]].memory_bytes,
            ctx.nodes[nodes[b]].memory_bytes,
        );
        ma.cmp(&mb).then(b.cmp(&a))
    })?;
    let mut members = vec![shares[lead]];
    members.extend(
        shares
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != lead)
            .map(|(_, &share)| share),
    );
    let layer_ps = ctx.layer_cost(&members).total_ps();
    if layer_ps >= fastest {
        return None;
    }
    let unit = unit(ctx, members);
    (unit.cap(Role::Middle) > 0).then(|| (fastest - layer_ps, unit))
}

fn unit(ctx: &Ctx<'_>, members: Vec<Share>) -> Unit {
    let per_layer: Vec<u64> = members
        .iter()
        .map(|share| {
            let (weights, kv) = ctx.share_bytes_per_layer(share);
            weights.saturating_add(kv)
        })
        .collect();
    let caps = [Role::Middle, Role::First, Role::Last, Role::Only]
        .map(|r| cap_with(ctx, &members, &per_layer, r));
    let (head, gather) = ctx.head_cost_ps(&members);
    Unit {
        layer_ps: ctx.layer_cost(&members).total_ps(),
        head_ps: head.saturating_add(gather),
        forward_ps: ctx.forward_ps(&members),
        caps,
        members,
    }
}

/// Most layers `members` can hold in `role`: every member must fit its share of each layer
/// (`per_layer` bytes), and its part of the embedding and head.
fn cap_with(ctx: &Ctx<'_>, members: &[Share], per_layer: &[u64], role: Role) -> u32 {
    let layers = ctx.layers();
    members
        .iter()
        .zip(per_layer)
        .enumerate()
        .map(|(m, (share, &per_layer))| {
            let extra = ctx.extra_bytes(members, m, role.holds_embedding(), role.holds_head());
            let Some(room) = ctx.nodes[share.node].memory_bytes.checked_sub(extra) else {
                return 0;
            };
            match per_layer {
                0 => layers,
                per_layer => u32::try_from(room / per_layer).map_or(layers, |c| c.min(layers)),
            }
        })
        .min()
        .unwrap_or(0)
}

/// Shares of every layer for `nodes` working as a tensor-parallel group, or `None` when there
/// are fewer KV heads than nodes.
///
/// KV heads are whole: every member gets one, then each further head goes to the member that
/// would finish its share of the layer soonest. MLP columns then even out what whole heads
/// cannot: the smallest time `T` for which every member's columns, at most what it can do
/// within `T`, add up to the MLP width, found by bisection.
pub(crate) fn split(ctx: &Ctx<'_>, nodes: &[usize]) -> Option<Vec<Share>> {
    let total = ctx.kv_heads();
    let count = u32::try_from(nodes.len()).ok()?;
    if count > total {
        return None;
    }
    let mut heads = vec![1u32; nodes.len()];
    for _ in count..total {
        let next = (0..nodes.len()).min_by(|&a, &b| {
            let ta = f64::from(heads[a] + 1) * ctx.layer_s[nodes[a]];
            let tb = f64::from(heads[b] + 1) * ctx.layer_s[nodes[b]];
            ta.total_cmp(&tb).then(a.cmp(&b))
        })?;
        heads[next] += 1;
    }
    let width = ctx.model.intermediate_size;
    let share = |i: usize, mlp_columns: u32| Share {
        node: nodes[i],
        kv_heads: heads[i],
        mlp_columns,
    };
    let time = |i: usize, columns: u32| ctx.share_layer_s(&share(i, columns));
    let lines: Vec<[(f64, f64); 2]> = (0..nodes.len())
        .map(|i| ctx.share_lines(nodes[i], heads[i]))
        .collect();
    // The most columns member `i` can take within `limit`, if its attention alone fits.
    let most = |i: usize, limit: f64| -> Option<u32> {
        let mut most = f64::from(width);
        for &(fixed, per_column) in &lines[i] {
            if fixed > limit {
                return None;
            }
            if per_column > 0.0 {
                most = most.min((limit - fixed) / per_column);
            }
        }
        Some(most.floor().max(0.0) as u32)
    };
    let fits = |limit: f64| {
        let mut total = 0u64;
        for i in 0..nodes.len() {
            match most(i, limit) {
                Some(columns) => total += u64::from(columns),
                None => return false,
            }
        }
        total >= u64::from(width)
    };
    // Columns in proportion to speed (rounded up) always fit, so they bound the answer from
    // above; every member's attention alone bounds it from below.
    let speed: Vec<f64> = nodes.iter().map(|&node| 1.0 / ctx.layer_s[node]).collect();
    let total_speed: f64 = speed.iter().sum();
    let mut high = (0..nodes.len())
        .map(|i| {
            let columns = (f64::from(width) * speed[i] / total_speed).ceil();
            time(i, (columns as u32).min(width))
        })
        .fold(0.0, f64::max);
    let mut low = (0..nodes.len()).map(|i| time(i, 0)).fold(0.0, f64::max);
    if !fits(high) {
        high = (0..nodes.len()).map(|i| time(i, width)).fold(0.0, f64::max);
    }
    for _ in 0..30 {
        let mid = 0.5 * (low + high);
        if fits(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    let mut columns: Vec<u32> = (0..nodes.len())
        .map(|i| most(i, high).unwrap_or(0))
        .collect();
    // Hand back columns beyond the width, from the last member on; times only fall.
    let mut excess = columns
        .iter()
        .map(|&c| u64::from(c))
        .sum::<u64>()
        .saturating_sub(u64::from(width));
    for c in columns.iter_mut().rev() {
        let back = u32::try_from(excess.min(u64::from(*c))).unwrap_or(0);
        *c -= back;
        excess -= u64::from(back);
    }
    Some(
        columns
            .into_iter()
            .enumerate()
            .map(|(i, c)| share(i, c))
            .collect(),
    )
}

/// Calls `f` with every increasing `size`-combination of `0..n`, in lexicographic order.
fn for_each_combination(n: usize, size: usize, f: &mut dyn FnMut(&[usize])) {
    if size == 0 || size > n {
        return;
    }
    let mut combo: Vec<usize> = (0..size).collect();
    loop {
        f(&combo);
        let Some(i) = (0..size).rev().find(|&i| combo[i] < n - size + i) else {
            return;
        };
        combo[i] += 1;
        for j in i + 1..size {
            combo[j] = combo[j - 1] + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::profile::{ClusterProfile, LinkProfile, ModelProfile, NodeProfile, RequestProfile};

    fn model() -> ModelProfile {
        ModelProfile {
            layers: 10,
            layer_weight_bytes: 100_000_000,
            embedding_bytes: 1_000_000,
            head_bytes: 1_000_000,
            layer_flops_per_token: 200_000_000,
            hidden_size: 4096,
            intermediate_size: 14336,
            attention_heads: 32,
            kv_heads: 8,
            kv_bytes_per_token_per_layer: 4096,
            vocab_size: 1000,
            activation_bytes: 2,
        }
    }

    #[test]
    fn combinations_are_counted_and_ordered() {
        let mut seen = Vec::new();
        for_each_combination(4, 2, &mut |c| seen.push(c.to_vec()));
        assert_eq!(seen.len(), 6);
        assert_eq!(seen[0], vec![0, 1]);
        assert_eq!(seen[5], vec![2, 3]);
    }

    #[test]
    fn faster_node_gets_more_kv_heads_and_columns() {
        let model = model();
        let cluster = ClusterProfile::new(
            vec![
                NodeProfile::new("fast", 1 << 34, 3e12, 300e9, "wgpu"),
                NodeProfile::new("slow", 1 << 34, 1e12, 100e9, "ndarray"),
            ],
            vec![LinkProfile::new("fast", "slow", 1e-6, 10e9)],
        );
        let request = RequestProfile::new(100, 10);
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        let shares = split(&ctx, &[0, 1]).unwrap();
        assert_eq!((shares[0].kv_heads, shares[1].kv_heads), (6, 2));
        assert_eq!(shares[0].mlp_columns + shares[1].mlp_columns, 14336);
        // Three times the bandwidth: about three quarters of the columns.
        let fast = f64::from(shares[0].mlp_columns) / 14336.0;
        assert!((0.74..0.76).contains(&fast), "{fast}");
    }

    #[test]
    fn group_needs_a_fast_link_to_be_a_candidate() {
        let model = model();
        let nodes = vec![
            NodeProfile::new("a", 1 << 34, 1e12, 100e9, "ndarray"),
            NodeProfile::new("b", 1 << 34, 1e12, 100e9, "ndarray"),
        ];
        let request = RequestProfile::new(100, 10);
        let fast = ClusterProfile::new(nodes.clone(), vec![LinkProfile::new("a", "b", 5e-6, 5e9)]);
        let ctx = Ctx::new(&model, &fast, &request).unwrap();
        assert_eq!(units(&ctx).len(), 3);
        let slow = ClusterProfile::new(nodes, vec![LinkProfile::new("a", "b", 5e-3, 10e6)]);
        let ctx = Ctx::new(&model, &slow, &request).unwrap();
        assert_eq!(units(&ctx).len(), 2);
    }
}
