//! A set of chunk indices, kept and sent as sorted `[start, end)` runs: a shard's chunks are a
//! few runs, so a node's announcement stays small whatever the model's size.

use serde::{Deserialize, Serialize};

/// Chunk indices as sorted, disjoint, non-adjacent `[start, end)` runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkSet(Vec<[u32; 2]>);

impl ChunkSet {
    /// No chunks.
    pub fn new() -> Self {
        ChunkSet::default()
    }

    /// Every chunk of a model of `count` chunks.
    pub fn all(count: u32) -> Self {
        if count == 0 {
            return ChunkSet::new();
        }
        ChunkSet(vec![[0, count]])
    }

    /// The set of the `true` positions of `held`.
    pub fn from_flags(held: &[bool]) -> Self {
        let mut runs: Vec<[u32; 2]> = Vec::new();
        for (i, &h) in held.iter().enumerate() {
            if !h {
                continue;
            }
            let i = i as u32;
            match runs.last_mut() {
                Some(run) if run[1] == i => run[1] = i + 1,
                _ => runs.push([i, i + 1]),
            }
        }
        ChunkSet(runs)
    }

    /// Runs as a peer sent them, made canonical (sorted, merged, empty runs dropped) and cut to
    /// `count` chunks: a peer's announcement is never trusted to be well formed.
    pub fn from_runs(runs: &[[u32; 2]], count: u32) -> Self {
        let mut runs: Vec<[u32; 2]> = runs
            .iter()
            .map(|&[s, e]| [s.min(count), e.min(count)])
            .filter(|[s, e]| s < e)
            .collect();
        runs.sort_unstable();
        let mut merged: Vec<[u32; 2]> = Vec::with_capacity(runs.len());
        for [s, e] in runs {
            match merged.last_mut() {
                Some(last) if s <= last[1] => last[1] = last[1].max(e),
                _ => merged.push([s, e]),
            }
        }
        ChunkSet(merged)
    }

    /// The runs.
    pub fn runs(&self) -> &[[u32; 2]] {
        &self.0
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: u32) -> bool {
        let i = self.0.partition_point(|r| r[1] <= index);
        self.0.get(i).is_some_and(|r| r[0] <= index)
    }

    /// How many chunks the set holds.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|[s, e]| u64::from(e - s)).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every index, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().flat_map(|&[s, e]| s..e)
    }

    /// The union of two sets.
    pub fn union(&self, other: &ChunkSet) -> ChunkSet {
        let mut runs = self.0.clone();
        runs.extend_from_slice(&other.0);
        let end = runs.iter().map(|r| r[1]).max().unwrap_or(0);
        ChunkSet::from_runs(&runs, end)
    }

    /// The chunks of this set that `other` lacks.
    pub fn difference(&self, other: &ChunkSet) -> ChunkSet {
        let end = self.0.last().map_or(0, |r| r[1]);
        let flags: Vec<bool> = (0..end)
            .map(|i| self.contains(i) && !other.contains(i))
            .collect();
        ChunkSet::from_flags(&flags)
    }

    /// Whether the set holds every chunk of a model of `count` chunks.
    pub fn covers(&self, count: u32) -> bool {
        count == 0 || self.0.first() == Some(&[0, count])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_canonical_whatever_a_peer_sends() {
        let set = ChunkSet::from_runs(&[[5, 9], [0, 2], [2, 3], [8, 12], [7, 7], [20, 99]], 22);
        assert_eq!(set.runs(), &[[0, 3], [5, 12], [20, 22]]);
        assert!(set.contains(0) && set.contains(11) && set.contains(21));
        assert!(!set.contains(3) && !set.contains(12) && !set.contains(22));
        assert_eq!(set.len(), 3 + 7 + 2);
        assert_eq!(set.iter().count(), 12);
    }

    #[test]
    fn flags_become_runs_and_a_union_covers() {
        let a = ChunkSet::from_flags(&[true, true, false, true]);
        assert_eq!(a.runs(), &[[0, 2], [3, 4]]);
        assert!(!a.covers(4));
        let b = ChunkSet::from_flags(&[false, false, true]);
        assert!(a.union(&b).covers(4));
        assert!(ChunkSet::all(4).covers(4));
        assert_eq!(ChunkSet::all(6).difference(&a).runs(), &[[2, 3], [4, 6]]);
        assert!(ChunkSet::new().covers(0));
    }
}
