//! Routing of a mixture of experts, shared by both implementations of the layers: which
//! experts each token goes to, and with what weights.

/// One token's visit to one expert: the expert, the token's row, and the weight of the
/// expert's output in the token's sum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Route {
    pub(crate) expert: u32,
    pub(crate) row: u32,
    pub(crate) weight: f32,
}

/// Routes every row of `logits` (`[rows, experts]`, the router's output; overwritten) to its
/// `per_token` most likely experts: a softmax over all experts, the best `per_token` kept
/// (ties go to the lower index), their weights rescaled to sum to one when `normalize`.
/// `routes` receives them sorted by expert, then row, so that each expert's rows are one run.
pub(crate) fn route(
    logits: &mut [f32],
    experts: usize,
    per_token: usize,
    normalize: bool,
    routes: &mut Vec<Route>,
) {
    routes.clear();
    if experts == 0 {
        return;
    }
    for (row, p) in logits.chunks_exact_mut(experts).enumerate() {
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in p.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        p.iter_mut().for_each(|v| *v /= sum);
        let first = routes.len();
        for _ in 0..per_token.min(experts) {
            // `per_token` is small (8 of 128 in Qwen3-MoE): repeated maxima beat a sort.
            let mut best = 0;
            for (e, v) in p.iter().enumerate() {
                if *v > p[best] {
                    best = e;
                }
            }
            routes.push(Route {
                expert: best as u32,
                row: row as u32,
                weight: p[best],
            });
            // Probabilities are never negative: this one is not picked again.
            p[best] = -1.0;
        }
        if normalize {
            let total: f32 = routes[first..].iter().map(|r| r.weight).sum();
            // llama.cpp's floor, so that vanishing weights cannot divide by zero.
            let total = total.max(6.103_515_6e-5);
            routes[first..].iter_mut().for_each(|r| r.weight /= total);
        }
    }
    routes.sort_unstable_by_key(|r| (r.expert, r.row));
}

/// The runs of `routes` (sorted by [`route`]) that go to one expert each: `(expert, range)`.
pub(crate) fn runs(routes: &[Route]) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let first = routes.get(at)?;
        let end = at
            + routes[at..]
                .iter()
                .take_while(|r| r.expert == first.expert)
                .count();
        let run = (first.expert as usize, at..end);
        at = end;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_goes_to_its_best_experts_with_normalised_weights() {
        // Two rows over four experts, two per token.
        let mut logits = vec![0.0, 2.0, 1.0, -1.0, 3.0, 0.0, 0.0, 3.5];
        let mut routes = Vec::new();
        route(&mut logits, 4, 2, true, &mut routes);
        let picked: Vec<(u32, u32)> = routes.iter().map(|r| (r.expert, r.row)).collect();
        assert_eq!(picked, [(0, 1), (1, 0), (2, 0), (3, 1)]);
        for row in 0..2 {
            let total: f32 = routes
                .iter()
                .filter(|r| r.row == row)
                .map(|r| r.weight)
                .sum();
            assert!((total - 1.0).abs() < 1e-6);
        }
        // Row 0: softmax weights of logits 2 and 1, renormalised: e / (e + 1).
        let w = routes.iter().find(|r| r.expert == 1).map(|r| r.weight);
        let e = std::f32::consts::E;
        assert!((w.unwrap_or(0.0) - e / (e + 1.0)).abs() < 1e-6);
        let groups: Vec<(usize, std::ops::Range<usize>)> = runs(&routes).collect();
        assert_eq!(groups, [(0, 0..1), (1, 1..2), (2, 2..3), (3, 3..4)]);
    }

    #[test]
    fn without_normalising_the_weights_are_the_softmax() {
        let mut logits = vec![0.0, 0.0, 0.0, 0.0];
        let mut routes = Vec::new();
        route(&mut logits, 4, 1, false, &mut routes);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].expert, 0);
        assert!((routes[0].weight - 0.25).abs() < 1e-6);
    }
}
