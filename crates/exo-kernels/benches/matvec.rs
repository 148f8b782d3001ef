//! Matrix-vector (decode) and matrix-matrix (prefill) shapes of the default model
//! (SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49152), per format and instruction set.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use exo_kernels::{Isa, QuantMatrix, QuantizedActs, WeightFormat, matmul_with};
use std::hint::black_box;

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let shapes = [
        ("gate_up 3072x576", 3072, 576),
        ("down 576x1536", 576, 1536),
        ("head 49152x576", 49152, 576),
    ];
    for (name, rows, cols) in shapes {
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        for format in [WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::F32] {
            let Ok(base) = QuantMatrix::from_f32(format, rows, cols, &values(rows * cols)) else {
                continue;
            };
            let variants = if base.format() == WeightFormat::F32 {
                vec![("f32-acts", base)]
            } else {
                vec![
                    ("f32-acts", base.clone()),
                    ("q8-acts", base.with_q8_activations()),
                ]
            };
            for (acts_name, w) in variants {
                for n in [1usize, 32] {
                    group.throughput(Throughput::Elements((rows * cols * n) as u64));
                    for isa in Isa::supported() {
                        let x = values(n * cols);
                        let mut out = vec![0f32; n * rows];
                        let mut acts = QuantizedActs::new();
                        let id = BenchmarkId::new(
                            format!("{format}/{acts_name}/{}", isa.name()),
                            format!("n={n}"),
                        );
                        group.bench_function(id, |b| {
                            b.iter(|| {
                                matmul_with(
                                    isa,
                                    black_box(&w),
                                    black_box(&x),
                                    n,
                                    &mut out,
                                    &mut acts,
                                )
                            })
                        });
                    }
                }
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
