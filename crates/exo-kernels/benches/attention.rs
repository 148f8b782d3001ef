//! One attention head of the default model (head dim 64, 3 KV heads interleaved) for one query
//! over 128 and 512 cached positions, per instruction set.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use exo_kernels::{Isa, attend_with};
use std::hint::black_box;

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let (hd, stride) = (64, 192);
    let mut group = c.benchmark_group("attend hd=64");
    for visible in [128usize, 512] {
        let (keys, vals) = (values(visible * stride), values(visible * stride + 7));
        let q = values(hd);
        group.throughput(Throughput::Elements((visible * hd * 2) as u64));
        for isa in Isa::supported() {
            let (mut scores, mut out) = (vec![0f32; visible], vec![0f32; hd]);
            let id = BenchmarkId::new(isa.name(), format!("positions={visible}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    attend_with(
                        isa,
                        black_box(&q),
                        black_box(&keys[64..]),
                        black_box(&vals[64..]),
                        stride,
                        visible,
                        0.125,
                        &mut scores,
                        &mut out,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
