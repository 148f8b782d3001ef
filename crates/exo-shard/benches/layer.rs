//! One decoder layer of the default model's shape (hidden 576, 9 heads, 3 KV heads, MLP 1536)
//! on the CPU kernels with Q4_1 weights: sixteen decode steps after 0 and after 512 positions
//! already in the KV cache (the difference is attention over 512 positions), and a 32-token
//! prefill.

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use exo_model::{Checkpoint, ShardSpec, testing};
use exo_shard::{BackendKind, LlamaShard, WeightFormat, Weights};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut config = testing::tiny_config(1);
    config.hidden_size = 576;
    config.intermediate_size = 1536;
    config.num_heads = 9;
    config.num_kv_heads = 3;
    config.head_dim = 64;
    config.vocab_size = 256;
    config.max_position_embeddings = 2048;
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return eprintln!("no temporary folder: {e}"),
    };
    let built = testing::write_hf_folder(dir.path(), &config, 7, 1)
        .map_err(|e| e.to_string())
        .and_then(|()| Checkpoint::open(dir.path()).map_err(|e| e.to_string()))
        .and_then(|checkpoint| {
            let device = BackendKind::Flex.device().map_err(|e| e.to_string())?;
            LlamaShard::load_with(
                &checkpoint,
                &ShardSpec::whole(1),
                &device,
                Weights::Quantize(WeightFormat::Q4_1),
            )
            .map_err(|e| e.to_string())
        });
    let shard = match built {
        Ok(s) => s,
        Err(e) => return eprintln!("cannot build the layer: {e}"),
    };
    exo_shard::set_kernel_threads(1);
    let tokens: Vec<u32> = (0..512).map(|i| (i * 7 % 256) as u32).collect();
    let mut group = c.benchmark_group("decoder layer 576 (q4_1, 1 thread)");
    group.sample_size(30);
    for context in [0usize, 512] {
        let mut cache = shard.new_cache();
        if context > 0 {
            let Ok(x) = shard.embed(&tokens[..context]) else {
                return;
            };
            if shard.forward(x, &mut cache).is_err() {
                return;
            }
        }
        let Ok(x) = shard.embed(&[3]) else { return };
        // Sixteen steps per sample from a copy of the cache (the copy is not timed): one step
        // alone would be dominated by the copy's fresh memory.
        group.bench_function(
            BenchmarkId::new("16 decode steps", format!("context {context}")),
            |b| {
                b.iter_batched(
                    || cache.clone(),
                    |mut cache| {
                        for _ in 0..16 {
                            black_box(shard.forward(x.clone(), &mut cache).is_ok());
                        }
                        cache
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    let Ok(x) = shard.embed(&tokens[..32]) else {
        return;
    };
    group.bench_function("prefill 32 tokens", |b| {
        b.iter_batched(
            || (x.clone(), shard.new_cache()),
            |(x, mut cache)| (black_box(shard.forward(x, &mut cache).is_ok()), cache),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
