//! Decoding on the CPU kernels allocates nothing per token: a counting allocator watches the
//! embed -> layers -> head steps of a decode loop on host buffers the caller reuses.
//!
//! Only the test's own thread is counted (the tiny model's products are too small for the
//! kernels' worker threads), so the harness's threads cannot disturb the count.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use exo_model::testing::{tiny_config, write_gguf};
use exo_model::{Checkpoint, ShardSpec};
use exo_shard::{BackendKind, LlamaShard, WeightFormat, Weights, argmax};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether allocations on this thread are counted.
    static COUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count() {
    if COUNTED.with(|c| c.get()) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_on_the_cpu_kernels_allocate_nothing() {
    COUNTED.with(|c| c.set(true));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let config = tiny_config(4);
    write_gguf(&path, &config, 7).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let whole = ShardSpec {
        layers: 0..4,
        embedding: true,
        head: true,
    };
    for format in [WeightFormat::Q8_0, WeightFormat::Q4_1] {
        let shard =
            LlamaShard::load_with(&checkpoint, &whole, &device, Weights::Quantize(format)).unwrap();
        assert!(shard.is_native());
        let mut cache = shard.new_cache();
        shard.reserve(&mut cache, 64);
        let (mut x, mut logits) = (Vec::new(), Vec::new());
        let mut step = |tokens: &[u32], cache: &mut exo_shard::KvCache| -> u32 {
            shard.embed_into(tokens, &mut x).unwrap();
            shard.forward_in_place(&mut x, cache).unwrap();
            shard.logits_into(&x, cache, &mut logits).unwrap();
            argmax(&logits)
        };
        // Prefill and one decode step size the scratch buffers.
        let mut id = step(&[1, 5, 9, 14, 3], &mut cache);
        id = step(&[id], &mut cache);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..40 {
            id = step(&[id], &mut cache);
        }
        let during = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(
            during, 0,
            "{format}: {during} allocations in 40 decode steps"
        );
        assert_eq!(cache.len(), 46);
    }
}
