//! Many requests at once through the cluster core: every stage batches the pending work of all
//! its requests into one step, prompts are cut into budgeted pieces mixed with decode tokens,
//! and requests join and leave between steps. None of it may change an answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use exo_core::{GenerationEvent, SamplingParams};
use exo_shard::Weights;
use exo_testkit::cluster::Options;
use exo_testkit::{TestCluster, TestModel, collect, raw_request};

const GIB: u64 = 1 << 30;

/// Prompts of different lengths (the tiny tokenizer has a token per character).
const PROMPTS: [&str; 8] = [
    "a",
    "hello,world",
    "x;y;z;w;",
    "a_longer_prompt_that_takes_several_pieces_0123456789",
    "short",
    "batching:requests:join:and:leave",
    "qq",
    "the_last_one_is_medium_sized",
];

fn sampling(i: usize) -> SamplingParams {
    if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 1.3,
            top_p: 1.0,
            top_k: 0,
            seed: 100 + i as u64,
        }
    }
}

/// Each request of `PROMPTS`, alone, in one process: what it must also give in a batch.
fn references(model: &TestModel) -> Vec<Vec<u32>> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| model.reference(p, 6 + 3 * i, sampling(i), Weights::Stored))
        .collect()
}

/// Sends every request of `PROMPTS` (each a little after the one before, to origins taken in
/// turn) and returns their token ids, in order.
async fn all_at_once(cluster: &TestCluster) -> Vec<Vec<u32>> {
    let tasks: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let node = std::sync::Arc::clone(cluster.node(i % cluster.nodes.len()));
            let mut request = raw_request(prompt, (6 + 3 * i) as u32);
            request.sampling = sampling(i);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
                let events = node.generate(request).await.unwrap();
                collect(events).await.unwrap().1.token_ids
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_requests_in_batches_answer_as_each_would_alone() {
    let model = TestModel::tiny(6, 17);
    let reference = references(&model);
    // A long request runs through each round, so that the eight (each over within
    // milliseconds) find a request in progress to share steps with, whatever the load.
    const LONG: &str = "long";
    let long_reference = model.reference(LONG, 200, SamplingParams::greedy(), Weights::Stored);
    // Small steps: prompts are cut into pieces that share steps with decode tokens.
    let options = Options {
        prefill_chunk: 16,
        step_rows: 6,
        ..Options::default()
    };
    for memory in [vec![GIB], vec![GIB, GIB, GIB]] {
        let cluster = TestCluster::start_with(&model, &memory, options.clone()).await;
        // Rounds go on (at most 5) until a step has batched two; every round's answers must
        // equal the references.
        let mut batched = 0;
        for _round in 0..5 {
            let long = cluster
                .node(0)
                .generate(raw_request(LONG, 200))
                .await
                .unwrap();
            let answers = all_at_once(&cluster).await;
            assert_eq!(collect(long).await.unwrap().1.token_ids, long_reference);
            for (i, (got, want)) in answers.iter().zip(&reference).enumerate() {
                assert_eq!(
                    got,
                    want,
                    "request {i} ({:?}) on {} node(s)",
                    PROMPTS[i],
                    memory.len()
                );
            }
            batched = cluster
                .nodes
                .iter()
                .map(|n| n.node.stage_stats().max_batch)
                .max()
                .unwrap();
            if batched >= 2 {
                break;
            }
        }
        assert!(batched >= 2, "no step computed two requests together");
        cluster.wait_idle().await;
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_one_request_of_a_batch_leaves_the_others_unchanged() {
    let model = TestModel::tiny(6, 19);
    let reference: Vec<Vec<u32>> = (0..4)
        .map(|i| model.reference(PROMPTS[i], 30, sampling(i), Weights::Stored))
        .collect();
    let cluster = TestCluster::start(&model, &[GIB, GIB, GIB]).await;
    let mut streams = Vec::new();
    for (i, prompt) in PROMPTS.iter().enumerate().take(4) {
        let mut request = raw_request(prompt, 30);
        request.sampling = sampling(i);
        streams.push(cluster.node(i % 3).generate(request).await.unwrap());
    }
    // A few tokens into request 2, its caller goes away.
    let mut victim = streams.remove(2);
    let mut seen = 0;
    while seen < 3 {
        match victim.recv().await {
            Some(Ok(GenerationEvent::Text(_))) => seen += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(victim);
    let survivors = [0usize, 1, 3];
    for (stream, i) in streams.into_iter().zip(survivors) {
        let ids = collect(stream).await.unwrap().1.token_ids;
        assert_eq!(
            ids, reference[i],
            "request {i} after request 2 was cancelled"
        );
    }
    // Every stage freed the cancelled request too.
    cluster.wait_idle().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn choices_of_one_answer_compute_their_prompt_once() {
    let model = TestModel::tiny(6, 23);
    const PROMPT: &str = "choices_of_one_answer_share_the_prompt_they_all_continue";
    const TOKENS: usize = 12;
    let prompt_rows = PROMPT.chars().count() as u64;
    let reference: Vec<Vec<u32>> = (0..3)
        .map(|i| model.reference(PROMPT, TOKENS, sampling(i), Weights::Stored))
        .collect();
    for memory in [vec![GIB], vec![GIB, GIB, GIB]] {
        let cluster = TestCluster::start(&model, &memory).await;
        let rows = || -> Vec<u64> {
            cluster
                .nodes
                .iter()
                .map(|n| n.node.stage_stats().rows)
                .collect()
        };
        let before = rows();
        // Three choices, as the API asks for them: one key, the same prompt, a seed each.
        let mut streams = Vec::new();
        for i in 0..3 {
            let mut request = raw_request(PROMPT, TOKENS as u32);
            request.sampling = sampling(i);
            request.share_prefill = Some(42);
            streams.push(cluster.node(0).generate(request).await.unwrap());
        }
        for (i, stream) in streams.into_iter().enumerate() {
            let ids = collect(stream).await.unwrap().1.token_ids;
            assert_eq!(ids, reference[i], "choice {i} on {} node(s)", memory.len());
        }
        cluster.wait_idle().await;
        // Every stage computed the prompt once, the last prompt row once more for each other
        // choice, and a row for each token fed back.
        let want = prompt_rows + 2 + 3 * (TOKENS as u64 - 1);
        for (stage, (after, before)) in rows().iter().zip(&before).enumerate() {
            assert_eq!(
                after - before,
                want,
                "rows computed by node {stage} of {} (without sharing: {})",
                memory.len(),
                3 * (prompt_rows + TOKENS as u64 - 1)
            );
        }
        cluster.shutdown().await;
    }
}
