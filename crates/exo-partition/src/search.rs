//! The cost-optimal search: an exact dynamic programme over a family of ring orders.
//!
//! For every node `a` the search fixes two orders of the nodes by how cheap their links to
//! `a` are (round trip of one activation): `a` first and the rest nearest first, and the rest
//! farthest first with `a` last. A ring is any subsequence of such an order, so it may skip
//! any node; with `a` first, `a` leads the first stage (embedding) and whichever unit comes
//! last holds the head; with `a` last, `a` leads the last stage (head). Stages are units (one
//! node or a tensor-parallel group) whose nodes all come after the previous stage's in the
//! order. For each order the programme finds, exactly, the cheapest such ring and split of
//! layers within every unit's memory cap. The answer is the cheapest over all orders.
//!
//! Why this shape: the order of the other nodes depends only on their links to `a`, and a
//! unit's candidacy only on its own members, so adding a node to the cluster keeps every old
//! order as a sub-order of a new one and every old unit. Every ring the smaller cluster could
//! use is still available, which is why adding a node never raises the predicted time; and
//! nodes are indexed in id order, so the result does not depend on input order.
//!
//! Cost: `2n` orders, each `O(U · n · L)` for `U` units, `n` nodes and `L` layers.

use std::cmp::Reverse;

use crate::cost::{Ctx, StageSpec};
use crate::units::{Role, Unit};

const INF: u64 = u64::MAX;

/// The cheapest placement found and its decode time per token.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub stages: Vec<StageSpec>,
    pub cost_ps: u64,
}

/// Which end of the ring the anchor node leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The anchor leads the first stage; the order lists it first, then the others nearest
    /// first.
    First,
    /// The anchor leads the last stage; the order lists the others farthest first, then it.
    Last,
}

/// The last stage of the cheapest ring so far: which programme found it, and how.
#[derive(Debug, Clone, Copy)]
struct Best {
    cost: u64,
    anchor: usize,
    end: End,
    unit: usize,
    layers: usize,
}

/// The cheapest placement of the model on `units`, or `None` when nothing fits.
pub(crate) fn search(ctx: &Ctx<'_>, units: &[Unit]) -> Option<Found> {
    let mut dp = Dp::new(ctx, units);
    for anchor in 0..ctx.n() {
        for end in [End::First, End::Last] {
            dp.run(anchor, end);
        }
    }
    let best = dp.best?;
    // Only costs are kept while searching; run the winning programme again and read the ring
    // back from them.
    dp.run(best.anchor, best.end);
    let mut stages = dp.reconstruct(best)?;
    balance(ctx, units, &mut stages);
    Some(Found {
        cost_ps: ctx.decode(&stages).total_ps(),
        stages,
    })
}

/// Among placements of the same decode time, the one whose slowest stage is fastest.
///
/// A single stream's decode time is the sum of the stages' times, so on equal nodes every
/// split of the layers costs the same, and the programme's pick among them is arbitrary. Under
/// load it is not: with several requests in flight every stage computes at once, and the
/// slowest stage sets the pace (on two equal nodes holding the default model, the stage with
/// the head was busy all the time and the other a fifth less). So layers move, one at a time,
/// from the slowest stage to a stage whose time per layer is no greater (the sum cannot grow)
/// and that can hold one more, while that makes the slowest stage faster.
fn balance(ctx: &Ctx<'_>, units: &[Unit], stages: &mut [StageSpec]) {
    let n = stages.len();
    if n < 2 {
        return;
    }
    let Some(unit): Option<Vec<&Unit>> = stages
        .iter()
        .map(|s| units.iter().find(|u| u.members == s.members))
        .collect()
    else {
        return;
    };
    let cap: Vec<u32> = (0..n).map(|s| unit[s].cap(Role::of(s, n))).collect();
    let fixed: Vec<u64> = (0..n)
        .map(|s| {
            let mut t = unit[s].forward_ps;
            if s == 0 {
                t = t.saturating_add(ctx.emb_ps[unit[s].lead()]);
            }
            if s + 1 == n {
                t = t.saturating_add(unit[s].head_ps);
            }
            t
        })
        .collect();
    let time =
        |s: usize, layers: u32| mul(layers as usize, unit[s].layer_ps).saturating_add(fixed[s]);
    // Each move lowers the slowest stage or ends the loop; bounded all the same.
    for _ in 0..ctx.layers() as usize * n {
        let Some(slow) = (0..n).max_by_key(|&s| (time(s, stages[s].layers), Reverse(s))) else {
            return;
        };
        let slowest = time(slow, stages[slow].layers);
        let target = (0..n)
            .filter(|&s| {
                s != slow
                    && stages[slow].layers > 1
                    && stages[s].layers < cap[s]
                    && unit[s].layer_ps <= unit[slow].layer_ps
                    && time(s, stages[s].layers + 1) < slowest
            })
            .min_by_key(|&s| (time(s, stages[s].layers + 1), s));
        let Some(to) = target else { return };
        stages[slow].layers -= 1;
        stages[to].layers += 1;
    }
}

/// The nodes in the order the programme for `anchor` visits them.
fn order(ctx: &Ctx<'_>, anchor: usize, end: End) -> Vec<usize> {
    let mut others: Vec<usize> = (0..ctx.n()).filter(|&x| x != anchor).collect();
    let round_trip = |x: usize| {
        ctx.act_hop_ps(anchor, x)
            .saturating_add(ctx.act_hop_ps(x, anchor))
    };
    match end {
        End::First => {
            others.sort_by_key(|&x| (round_trip(x), x));
            others.insert(0, anchor);
        }
        End::Last => {
            others.sort_by_key(|&x| (Reverse(round_trip(x)), x));
            others.push(anchor);
        }
    }
    others
}

struct Dp<'c, 'a> {
    ctx: &'c Ctx<'a>,
    units: &'c [Unit],
    layers: usize,
    /// `cost[u * (L + 1) + l]`: cheapest partial ring ending with unit `u`, `l` layers placed.
    cost: Vec<u64>,
    /// `reach[x * (L + 1) + l]`: cheapest partial ring whose last stage is led by node `x`,
    /// among units already usable as a predecessor.
    reach: Vec<u64>,
    active_leads: Vec<bool>,
    /// Cheapest way to arrive at the unit being processed with `l` layers placed.
    arrive: Vec<u64>,
    /// Position span of each unit in the current order.
    span: Vec<(usize, usize)>,
    /// Units in the current programme, in processing order.
    usable: Vec<usize>,
    anchor: usize,
    end: End,
    best: Option<Best>,
}

impl<'c, 'a> Dp<'c, 'a> {
    fn new(ctx: &'c Ctx<'a>, units: &'c [Unit]) -> Self {
        let layers = ctx.layers() as usize;
        let width = layers + 1;
        Self {
            ctx,
            units,
            layers,
            cost: vec![INF; units.len() * width],
            reach: vec![INF; ctx.n() * width],
            active_leads: vec![false; ctx.n()],
            arrive: vec![INF; width],
            span: vec![(0, 0); units.len()],
            usable: Vec::with_capacity(units.len()),
            anchor: 0,
            end: End::First,
            best: None,
        }
    }

    fn width(&self) -> usize {
        self.layers + 1
    }

    /// The cheapest rings in which `anchor` leads the stage at `end`.
    ///
    /// Units are taken in order of their first node's position; a unit can follow any unit
    /// that lies wholly before it, so rings are subsequences of the order. With the anchor
    /// first, only units led by it can start, and every other unit not containing it can
    /// continue or end the ring, returning the token to the anchor. With the anchor last,
    /// any unit without it can start (the token comes from the anchor) or continue, and only
    /// units led by it can end.
    fn run(&mut self, anchor: usize, end: End) {
        let (ctx, units, big_l) = (self.ctx, self.units, self.layers);
        self.anchor = anchor;
        self.end = end;
        let order = order(ctx, anchor, end);
        let mut pos = vec![0; ctx.n()];
        for (p, &node) in order.iter().enumerate() {
            pos[node] = p;
        }
        for (span, unit) in self.span.iter_mut().zip(units) {
            let positions = unit.members.iter().map(|m| pos[m.node]);
            *span = (
                positions.clone().min().unwrap_or(0),
                positions.max().unwrap_or(0),
            );
        }
        self.cost.fill(INF);
        self.reach.fill(INF);
        self.active_leads.fill(false);
        self.usable.clear();
        self.usable.extend(
            (0..units.len()).filter(|&u| !units[u].contains(anchor) || units[u].lead() == anchor),
        );
        let span = &self.span;
        self.usable.sort_by_key(|&u| (span[u].0, u));

        let mut done: Vec<usize> = Vec::new();
        for k in 0..self.usable.len() {
            let ui = self.usable[k];
            let unit = &units[ui];
            let lead = unit.lead();
            self.activate(&mut done, self.span[ui].0);
            let arrived = self.arrive_at(lead);
            match (end, lead == anchor) {
                (End::First, true) => {
                    if unit.cap(Role::Only) as usize >= big_l {
                        let cost = mul(big_l, unit.layer_ps)
                            .saturating_add(self.first_cost(ui))
                            .saturating_add(unit.head_ps);
                        self.offer(cost, ui, big_l);
                    }
                    self.start(ui);
                    done.push(ui);
                }
                (End::First, false) => {
                    if arrived {
                        self.extend(ui);
                        let close = unit.head_ps.saturating_add(ctx.tok_hop_ps(lead, anchor));
                        self.finish(ui, close);
                    }
                    done.push(ui);
                }
                (End::Last, true) => {
                    if arrived {
                        self.finish(ui, unit.head_ps);
                    }
                }
                (End::Last, false) => {
                    self.start(ui);
                    if arrived {
                        self.extend(ui);
                    }
                    done.push(ui);
                }
            }
        }
    }

    /// What the first stage costs besides its layers: the embedding, forwarding inside the
    /// unit, and (when the anchor is last) the token's way from the anchor.
    fn first_cost(&self, ui: usize) -> u64 {
        let unit = &self.units[ui];
        let lead = unit.lead();
        let mut cost = self.ctx.emb_ps[lead].saturating_add(unit.forward_ps);
        if self.end == End::Last {
            cost = cost.saturating_add(self.ctx.tok_hop_ps(self.anchor, lead));
        }
        cost
    }

    /// Unit `ui` as the first of several stages.
    fn start(&mut self, ui: usize) {
        let unit = &self.units[ui];
        let base = self.first_cost(ui);
        let most = (unit.cap(Role::First) as usize).min(self.layers - 1);
        let row = ui * self.width();
        for m in 1..=most {
            self.cost[row + m] = mul(m, unit.layer_ps).saturating_add(base);
        }
    }

    /// Makes every processed unit that lies wholly before `position` usable as a predecessor.
    fn activate(&mut self, done: &mut Vec<usize>, position: usize) {
        let width = self.width();
        let mut i = 0;
        while i < done.len() {
            let v = done[i];
            if self.span[v].1 >= position {
                i += 1;
                continue;
            }
            done.swap_remove(i);
            let lead = self.units[v].lead();
            self.active_leads[lead] = true;
            let costs = &self.cost[v * width..(v + 1) * width];
            let reach = &mut self.reach[lead * width..(lead + 1) * width];
            for (slot, &c) in reach.iter_mut().zip(costs) {
                *slot = (*slot).min(c);
            }
        }
    }

    /// Fills `arrive` for a unit led by `lead`; false when nothing can precede it.
    fn arrive_at(&mut self, lead: usize) -> bool {
        let width = self.width();
        self.arrive.fill(INF);
        for x in 0..self.ctx.n() {
            if !self.active_leads[x] {
                continue;
            }
            let hop = self.ctx.act_hop_ps(x, lead);
            let reach = &self.reach[x * width..(x + 1) * width];
            for (slot, &c) in self.arrive.iter_mut().zip(reach) {
                *slot = (*slot).min(c.saturating_add(hop));
            }
        }
        self.arrive.iter().any(|&c| c != INF)
    }

    /// Unit `ui` after another stage: `cost[ui][l] = forward + min over m of
    /// arrive[l - m] + m · layer cost`, for `m` up to its cap, by a sliding-window minimum.
    fn extend(&mut self, ui: usize) {
        let unit = &self.units[ui];
        let big_l = self.layers;
        let cap = unit.cap(Role::Middle) as usize;
        let t = i128::from(unit.layer_ps);
        let arrive = &self.arrive;
        let key = |j: usize| i128::from(arrive[j]) - j as i128 * t;
        let row = ui * (big_l + 1);
        // Candidate `j`s with increasing keys; `head..` is the live part.
        let mut window: Vec<usize> = Vec::with_capacity(big_l);
        let mut head = 0;
        for l in 2..big_l {
            let j = l - 1;
            if arrive[j] != INF {
                let k = key(j);
                while window.len() > head && window.last().is_some_and(|&b| key(b) > k) {
                    window.pop();
                }
                window.push(j);
            }
            while head < window.len() && window[head] + cap < l {
                head += 1;
            }
            let Some(&j) = window.get(head) else {
                continue;
            };
            let value = key(j) + l as i128 * t + i128::from(unit.forward_ps);
            let value = u64::try_from(value.max(0)).unwrap_or(INF - 1);
            let slot = &mut self.cost[row + l];
            *slot = (*slot).min(value);
        }
    }

    /// Unit `ui` as the last stage, holding the head; `close` is the head and the token's
    /// way back to the first stage.
    fn finish(&mut self, ui: usize, close: u64) {
        let unit = &self.units[ui];
        let big_l = self.layers;
        let most = (unit.cap(Role::Last) as usize).min(big_l - 1);
        for m in 1..=most {
            let arrive = self.arrive[big_l - m];
            if arrive == INF {
                continue;
            }
            let cost = arrive
                .saturating_add(mul(m, unit.layer_ps))
                .saturating_add(unit.forward_ps)
                .saturating_add(close);
            self.offer(cost, ui, m);
        }
    }

    /// Keeps the ring ending with `m` layers on `ui` if it is the cheapest so far.
    fn offer(&mut self, cost: u64, unit: usize, layers: usize) {
        if self.best.is_none_or(|b| cost < b.cost) {
            self.best = Some(Best {
                cost,
                anchor: self.anchor,
                end: self.end,
                unit,
                layers,
            });
        }
    }

    /// Reads the ring ending as `best` says back from the costs of the programme just run,
    /// by finding at each step a predecessor whose cost accounts exactly for the rest.
    fn reconstruct(&self, best: Best) -> Option<Vec<StageSpec>> {
        let (ctx, units, big_l) = (self.ctx, self.units, self.layers);
        let last = &units[best.unit];
        let mut stages = vec![last.spec(best.layers as u32)];
        if best.layers == big_l {
            return Some(stages);
        }
        let close = match self.end {
            End::First => last
                .head_ps
                .saturating_add(ctx.tok_hop_ps(last.lead(), self.anchor)),
            End::Last => last.head_ps,
        };
        // What the stages before the last must cost, and where they end.
        let mut rest = best
            .cost
            .checked_sub(mul(best.layers, last.layer_ps))?
            .checked_sub(last.forward_ps)?
            .checked_sub(close)?;
        let mut placed = big_l - best.layers;
        let mut next = best.unit;
        loop {
            let (v, arrival) = self.predecessor(next, placed, rest)?;
            let unit = &units[v];
            let row = v * self.width();
            debug_assert_eq!(self.cost[row + placed], arrival);
            // Was `v` the first stage, holding all `placed` layers?
            if placed <= unit.cap(Role::First) as usize
                && (self.end == End::Last || unit.lead() == self.anchor)
                && mul(placed, unit.layer_ps).saturating_add(self.first_cost(v)) == arrival
            {
                stages.push(unit.spec(placed as u32));
                break;
            }
            // Otherwise it holds `m` layers after some earlier stage.
            let m = (1..=(unit.cap(Role::Middle) as usize).min(placed - 1)).find(|&m| {
                let before = arrival
                    .checked_sub(mul(m, unit.layer_ps))
                    .and_then(|c| c.checked_sub(unit.forward_ps));
                before.is_some_and(|b| self.predecessor(v, placed - m, b).is_some())
            })?;
            stages.push(unit.spec(m as u32));
            rest = arrival
                .checked_sub(mul(m, unit.layer_ps))?
                .checked_sub(unit.forward_ps)?;
            placed -= m;
            next = v;
            if stages.len() > units.len() {
                return None;
            }
        }
        stages.reverse();
        Some(stages)
    }

    /// A unit wholly before `next` whose partial ring with `placed` layers, plus the hop to
    /// `next`, costs exactly `total`; with that partial ring's cost.
    fn predecessor(&self, next: usize, placed: usize, total: u64) -> Option<(usize, u64)> {
        let lead = self.units[next].lead();
        self.usable.iter().find_map(|&v| {
            if self.span[v].1 >= self.span[next].0 {
                return None;
            }
            let cost = self.cost[v * self.width() + placed];
            let hop = self.ctx.act_hop_ps(self.units[v].lead(), lead);
            (cost != INF && cost.saturating_add(hop) == total).then_some((v, cost))
        })
    }
}

fn mul(layers: usize, per_layer: u64) -> u64 {
    (layers as u64).saturating_mul(per_layer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::profile::{ClusterProfile, LinkProfile, ModelProfile, NodeProfile, RequestProfile};
    use crate::units::units;

    fn model(layers: u32) -> ModelProfile {
        ModelProfile {
            layers,
            layer_weight_bytes: 100,
            embedding_bytes: 10,
            head_bytes: 10,
            layer_flops_per_token: 1000,
            hidden_size: 64,
            intermediate_size: 192,
            attention_heads: 2,
            kv_heads: 1,
            kv_bytes_per_token_per_layer: 0,
            vocab_size: 100,
            activation_bytes: 2,
        }
    }

    #[test]
    fn fills_the_fast_node_first_and_reads_back_the_ring_it_costed() {
        // `fast` holds 6 of 10 layers (620 bytes minus the embedding or head), so `slow` must
        // take the rest; the middle node is faster than `slow` but its link costs more than
        // it saves.
        let model = model(10);
        let cluster = ClusterProfile::new(
            vec![
                NodeProfile::new("fast", 620, 1e6, 1e6, "ndarray"),
                NodeProfile::new("slow", 10_000, 2e5, 2e5, "ndarray"),
                NodeProfile::new("far", 10_000, 5e5, 5e5, "ndarray"),
            ],
            vec![
                LinkProfile::new("fast", "slow", 1e-4, 1e9),
                LinkProfile::new("fast", "far", 1.0, 1e9),
                LinkProfile::new("slow", "far", 1.0, 1e9),
            ],
        );
        let request = RequestProfile::new(1, 1);
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        let found = search(&ctx, &units(&ctx)).unwrap();
        let mut held: Vec<(&str, u32)> = found
            .stages
            .iter()
            .map(|s| (ctx.id(s.lead()).as_str(), s.layers))
            .collect();
        held.sort();
        assert_eq!(held, [("fast", 6), ("slow", 4)]);
        assert_eq!(ctx.decode(&found.stages).total_ps(), found.cost_ps);
    }

    #[test]
    fn nothing_fits_gives_none() {
        let model = model(3);
        let cluster = ClusterProfile::new(
            vec![NodeProfile::new("tiny", 50, 1e6, 1e6, "ndarray")],
            vec![],
        );
        let request = RequestProfile::new(1, 1);
        let ctx = Ctx::new(&model, &cluster, &request).unwrap();
        assert!(search(&ctx, &units(&ctx)).is_none());
    }
}
