//! Encoding and decoding one activation frame of the default model (hidden 576) for the wire:
//! one decode position and a 512-token prefill chunk, as f32, f16 and bf16.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use exo_core::Activations;
use exo_transport::WireDtype;
use exo_transport::testing::{decode_frame, encode_frame};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("activation frame (hidden 576)");
    for positions in [1usize, 512] {
        let a = Activations {
            rows: positions,
            hidden: 576,
            values: (0..positions * 576)
                .map(|i| ((i * 2654435761usize) % 1000) as f32 / 100.0 - 5.0)
                .collect(),
        };
        group.throughput(Throughput::Elements((positions * 576) as u64));
        for dtype in [WireDtype::F32, WireDtype::F16, WireDtype::Bf16] {
            let frame = encode_frame(&a, dtype);
            group.bench_function(
                BenchmarkId::new(format!("encode {dtype}"), positions),
                |b| b.iter(|| black_box(encode_frame(black_box(&a), dtype))),
            );
            group.bench_function(
                BenchmarkId::new(format!("decode {dtype}"), positions),
                |b| b.iter(|| black_box(decode_frame(black_box(&frame)).is_ok())),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
