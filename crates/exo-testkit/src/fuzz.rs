//! A small mutation fuzzer that runs on stable Rust inside `cargo test`, for the inputs a peer
//! or a file can hand a node: seeds (valid inputs) are mutated (bits flipped, bytes set to
//! edge values, little-endian integers overwritten with edge values, ranges cut, repeated or
//! filled with junk) and each mutant goes to a target that must not panic. Runs are
//! deterministic (a fixed seed), bounded in executions and in time, and a mutant that makes
//! the target panic is written to the temp folder and named in the panic, to become a
//! regression test.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// Deterministic xorshift64* randomness and the mutations.
#[derive(Clone, Debug)]
pub struct Mutator {
    state: u64,
}

/// Byte values that often sit on a parser's edge.
const EDGE_BYTES: [u8; 8] = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, b'{', b'"'];

/// Integer values that often sit on a parser's edge (counts, lengths, offsets, types).
const EDGE_INTS: [u64; 12] = [
    0,
    1,
    2,
    7,
    255,
    4096,
    65_535,
    1 << 31,
    u32::MAX as u64,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

impl Mutator {
    /// A mutator whose choices follow from `seed`.
    pub fn new(seed: u64) -> Self {
        Mutator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// The next random 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// An offset into `len` bytes, three times in four within the first `hot` (where a format
    /// keeps its headers, counts and offsets).
    fn offset(&mut self, len: usize, hot: usize) -> usize {
        let bound = if self.below(4) < 3 { hot.min(len) } else { len };
        self.below(bound.max(1)).min(len.saturating_sub(1))
    }

    /// `input` with one to four mutations; `hot` bytes at the front are mutated most.
    pub fn mutate(&mut self, input: &[u8], hot: usize) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.below(4) {
            if out.is_empty() {
                out.push(EDGE_BYTES[self.below(EDGE_BYTES.len())]);
                continue;
            }
            let at = self.offset(out.len(), hot);
            match self.below(7) {
                0 => out[at] ^= 1 << self.below(8),
                1 => out[at] = EDGE_BYTES[self.below(EDGE_BYTES.len())],
                2 => {
                    let value = EDGE_INTS[self.below(EDGE_INTS.len())];
                    let width = [1usize, 2, 4, 8][self.below(4)];
                    for (i, b) in value.to_le_bytes().iter().take(width).enumerate() {
                        if let Some(slot) = out.get_mut(at + i) {
                            *slot = *b;
                        }
                    }
                }
                3 => {
                    let end = (at + 1 + self.below(64)).min(out.len());
                    out.drain(at..end);
                }
                4 => {
                    let end = (at + 1 + self.below(64)).min(out.len());
                    let piece = out[at..end].to_vec();
                    let to = self.below(out.len() + 1);
                    out.splice(to..to, piece);
                }
                5 => {
                    let len = 1 + self.below(16);
                    let junk: Vec<u8> = (0..len).map(|_| self.next_u64() as u8).collect();
                    out.splice(at..at, junk);
                }
                _ => out.truncate(at),
            }
        }
        out
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Mutants the target ran on.
    pub executions: usize,
    /// Seeds they came from.
    pub seeds: usize,
    /// How long it took.
    pub elapsed: Duration,
}

/// Runs `target` on up to `executions` mutants of `seeds` (taken in turn, each also once as
/// it is), within `budget`; `hot` bytes at each seed's front are mutated most. A panic of the
/// target is caught, its input written to a file, and the run panics naming the file, the
/// execution and the panic message.
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    executions: usize,
    budget: Duration,
    hot: usize,
    mut target: impl FnMut(&[u8]),
) -> Run {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let started = Instant::now();
    let mut mutator = Mutator::new(0x5EED ^ name.len() as u64);
    let mut done = 0;
    while done < executions && started.elapsed() < budget {
        let seed = &seeds[done % seeds.len()];
        let input = if done < seeds.len() {
            seed.clone()
        } else {
            mutator.mutate(seed, hot)
        };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let path = std::env::temp_dir().join(format!("exo-fuzz-{name}-{done}.bin"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{name}: execution {done} panicked ({message}); its input of {} bytes is in {}",
                input.len(),
                path.display()
            );
        }
        done += 1;
    }
    Run {
        executions: done,
        seeds: seeds.len(),
        elapsed: started.elapsed(),
    }
}
