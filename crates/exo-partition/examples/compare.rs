//! Prints the worked examples of `docs/partitioning.md`: every scenario planned with the
//! baseline and with ours, as a Markdown table, followed by our plans' explanations.
//!
//! Run with `cargo run -p exo-partition --example compare`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use exo_partition::{Plan, Strategy, plan};

fn layout(plan: &Plan) -> String {
    plan.stages
        .iter()
        .map(|s| {
            let names: Vec<&str> = s.members.iter().map(|m| m.node.as_str()).collect();
            format!("{} {}", names.join("+"), s.layers)
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

fn main() {
    println!(
        "| Example | Cluster | Model | Baseline split | Baseline tok/s | Our plan | Our tok/s | \
         Speed-up | Time to first token, baseline → ours | Left out by us |"
    );
    println!("|---|---|---|---|---:|---|---:|---:|---:|---|");
    let mut details = Vec::new();
    for s in common::scenarios() {
        let base = plan(&s.model, &s.cluster, &s.request, Strategy::MemoryWeighted).unwrap();
        let ours = plan(&s.model, &s.cluster, &s.request, Strategy::CostOptimal).unwrap();
        let overrun = if base.fits_memory() {
            ""
        } else {
            " (overruns memory)"
        };
        let left: Vec<&str> = ours.excluded.iter().map(|e| e.node.as_str()).collect();
        println!(
            "| {} | {} | {} | {}{overrun} | {:.2} | {} | {:.2} | {:.1}x | {:.2} s → {:.2} s ({}-token prompt) | {} |",
            s.name,
            s.about,
            s.model_name,
            layout(&base),
            base.predicted.decode_tokens_per_s,
            layout(&ours),
            ours.predicted.decode_tokens_per_s,
            ours.predicted.decode_tokens_per_s / base.predicted.decode_tokens_per_s,
            base.predicted.ttft_s,
            ours.predicted.ttft_s,
            ours.predicted.prompt_len,
            if left.is_empty() {
                "none".to_owned()
            } else {
                left.join(", ")
            },
        );
        details.push((s.name, base, ours));
    }
    for (name, base, ours) in details {
        println!("\n### {name}\n\nBaseline:\n\n```text\n{base}```\n\nOurs:\n\n```text\n{ours}```");
    }
}
