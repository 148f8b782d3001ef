//! A start-up micro-benchmark: f32 throughput and memory bandwidth in about a quarter of a
//! second, on every core. It gives the planner relative figures for unlike machines; it is not
//! a substitute for measuring the model itself.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the micro-benchmark measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Benchmark {
    /// f32 multiply-add throughput over all cores, FLOP/s.
    pub flops_per_s: f64,
    /// Memory bandwidth over all cores, bytes read plus bytes written per second.
    pub mem_bandwidth_bytes_per_s: f64,
}

impl Benchmark {
    /// Runs both measurements, each for about `budget / 2`, on every core.
    pub fn measure(budget: Duration) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let half = budget / 2;
        Self {
            flops_per_s: flops(threads, half),
            mem_bandwidth_bytes_per_s: bandwidth(threads, half),
        }
    }
}

/// Lanes of independent multiply-add chains: enough for the compiler to fill vector registers
/// and for the chains to hide the add latency.
const LANES: usize = 64;
/// Iterations between clock checks.
const ROUNDS: usize = 4096;

fn flops(threads: usize, budget: Duration) -> f64 {
    let per_thread: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || flops_one_thread(t, budget)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    per_thread.iter().sum()
}

fn flops_one_thread(seed: usize, budget: Duration) -> f64 {
    let mut acc = [0f32; LANES];
    let mut mul = [0f32; LANES];
    let mut add = [0f32; LANES];
    for i in 0..LANES {
        // Each chain converges to add / (1 - mul): no overflow, no denormals.
        mul[i] = 0.999 - (i as f32) * 1e-5;
        add[i] = 1e-3 + (seed as f32) * 1e-6;
    }
    let (mul, add) = (black_box(mul), black_box(add));
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < budget {
        for _ in 0..ROUNDS {
            for i in 0..LANES {
                acc[i] = acc[i] * mul[i] + add[i];
            }
        }
        acc = black_box(acc);
        rounds += 1;
    }
    let flop = rounds as f64 * (ROUNDS * LANES * 2) as f64;
    flop / start.elapsed().as_secs_f64()
}

/// Bytes each thread copies: together well beyond any last-level cache.
const COPY_BYTES: usize = 64 << 20;

fn bandwidth(threads: usize, budget: Duration) -> f64 {
    let per_thread = (COPY_BYTES / threads).max(1 << 20);
    let rates: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || bandwidth_one_thread(per_thread, budget)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    rates.iter().sum()
}

fn bandwidth_one_thread(bytes: usize, budget: Duration) -> f64 {
    let src = vec![1u8; bytes / 2];
    let mut dst = vec![0u8; bytes / 2];
    // The first copy touches every page of `dst`: not part of the measurement.
    dst.copy_from_slice(&src);
    let start = Instant::now();
    let mut copies = 0u64;
    while start.elapsed() < budget {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        copies += 1;
    }
    (copies * 2 * src.len() as u64) as f64 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_is_short_and_measures_something() {
        let start = Instant::now();
        let b = Benchmark::measure(Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(b.flops_per_s > 1e6, "{b:?}");
        assert!(b.mem_bandwidth_bytes_per_s > 1e7, "{b:?}");
    }
}
