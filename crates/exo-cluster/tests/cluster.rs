//! The cluster core in one process: N real nodes (membership over the memory transport, shard
//! services on loopback, stage workers, origins) on a tiny random model.
//!
//! - any split of the layers gives exactly the tokens one process gives, on 1 to 4 stages and
//!   several plans, greedy and seeded, with prompts sent in several chunks;
//! - a caller that goes away frees the request on every stage;
//! - a plan change between requests (a node joins) is followed, and answers stay the same;
//! - a stage that stops mid-request: the request is replayed on a plan without it and the
//!   answer goes on unchanged (greedy and seeded); when no plan fits, it ends within the bound
//!   with an error saying why (without node ids: those are for the log);
//! - bad requests are refused with typed errors before anything runs;
//! - the live view (`GET /v1/cluster/events`' source) follows a node joining, a request's
//!   figures and a node leaving, without being asked again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use exo_core::{GenerationError, GenerationEvent, SamplingParams};
use exo_shard::Weights;
use exo_testkit::cluster::Options;
use exo_testkit::http::request;
use exo_testkit::{TestCluster, TestModel, collect, raw_request};

const GIB: u64 = 1 << 30;
const PROMPT: &str = "hello,cluster;split_me";

async fn ids_from(
    cluster: &TestCluster,
    node: usize,
    request: exo_core::GenerationRequest,
) -> Vec<u32> {
    let events = cluster.node(node).generate(request).await.unwrap();
    collect(events).await.unwrap().1.token_ids
}

/// Sampling at a high temperature: any change in the logits shows in the tokens (a random
/// model's greedy answer tends to repeat one token).
fn hot(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.5,
        top_p: 1.0,
        top_k: 0,
        seed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_split_answers_exactly_like_one_process() {
    let model = TestModel::tiny(8, 11);
    let reference = model.reference(PROMPT, 12, SamplingParams::greedy(), Weights::Stored);
    let sampled = model.reference(PROMPT, 24, hot(5), Weights::Stored);
    assert_eq!(reference.len(), 12);
    let distinct: std::collections::HashSet<_> = sampled.iter().collect();
    assert!(distinct.len() > 5, "a varied reference: {sampled:?}");
    // Prompts go in chunks of 5 tokens, so prefill spans several frames.
    let options = Options {
        prefill_chunk: 5,
        ..Options::default()
    };
    for memory in [
        vec![GIB],
        vec![GIB, GIB],
        vec![3 * GIB, GIB, GIB],
        vec![GIB, 2 * GIB, GIB, GIB],
    ] {
        let cluster = TestCluster::start_with(&model, &memory, options.clone()).await;
        let plan = cluster.wait_ready().await;
        let layers: Vec<String> = plan.stages.iter().map(|s| s.layers.to_string()).collect();
        for origin in [0, cluster.nodes.len() - 1] {
            let ids = ids_from(&cluster, origin, raw_request(PROMPT, 12)).await;
            assert_eq!(ids, reference, "plan {layers:?}, request at node {origin}");
            let mut request = raw_request(PROMPT, 24);
            request.sampling = hot(5);
            let ids = ids_from(&cluster, origin, request).await;
            assert_eq!(
                ids, sampled,
                "plan {layers:?}, sampled, request at node {origin}"
            );
        }
        cluster.wait_idle().await;
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_sampling_is_the_same_across_stages() {
    let model = TestModel::tiny(4, 3);
    let sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 20,
        seed: 77,
    };
    let reference = model.reference(PROMPT, 10, sampling, Weights::Stored);
    let cluster = TestCluster::start(&model, &[GIB, GIB]).await;
    let mut request = raw_request(PROMPT, 10);
    request.sampling = sampling;
    assert_eq!(ids_from(&cluster, 1, request).await, reference);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_that_goes_away_frees_the_request_on_every_stage() {
    let model = TestModel::tiny(6, 5);
    let cluster = TestCluster::start(&model, &[GIB, GIB, GIB]).await;
    let mut events = cluster
        .node(1)
        .generate(raw_request(PROMPT, 200))
        .await
        .unwrap();
    // A few tokens in, every stage holds the request.
    let mut seen = 0;
    while seen < 3 {
        match events.recv().await {
            Some(Ok(GenerationEvent::Text(_))) => seen += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let held: Vec<u32> = cluster
        .nodes
        .iter()
        .map(|n| n.node.status().active_requests)
        .collect();
    assert_eq!(held, vec![1, 1, 1]);
    drop(events);
    cluster.wait_idle().await;
    // And the cluster serves on.
    let ids = ids_from(&cluster, 0, raw_request(PROMPT, 4)).await;
    assert_eq!(ids.len(), 4);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_change_between_requests_is_followed() {
    let model = TestModel::tiny(6, 9);
    let reference = model.reference(PROMPT, 8, SamplingParams::greedy(), Weights::Stored);
    let mut cluster = TestCluster::start(&model, &[GIB, GIB]).await;
    let before = cluster.wait_ready().await;
    assert_eq!(
        ids_from(&cluster, 0, raw_request(PROMPT, 8)).await,
        reference
    );

    cluster.add_node(&model, GIB).await;
    let after = cluster.wait_ready().await;
    assert_ne!(before.epoch, after.epoch);
    assert_eq!(after.stages.len(), 3);
    for origin in 0..3 {
        assert_eq!(
            ids_from(&cluster, origin, raw_request(PROMPT, 8)).await,
            reference,
            "request at node {origin} after the plan changed"
        );
    }
    cluster.wait_idle().await;
    cluster.shutdown().await;
}

/// Reads events until `n` text pieces have come; returns their text.
async fn first_pieces(events: &mut exo_api::Generation, n: usize) -> String {
    let mut text = String::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Some(Ok(GenerationEvent::Text(t)))) => text.push_str(&t),
            other => panic!("expected text, got {other:?}"),
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_lost_mid_request_is_replayed_elsewhere_and_the_answer_goes_on_unchanged() {
    let model = TestModel::tiny(6, 13);
    let mut cluster = TestCluster::start(&model, &[GIB, GIB, GIB]).await;
    let plan = cluster.wait_ready().await;
    assert_eq!(plan.stages.len(), 3);
    // The answers uninterrupted, greedy and seeded at a high temperature.
    let greedy = raw_request(PROMPT, 120);
    let seeded = exo_core::GenerationRequest {
        sampling: hot(7),
        ..raw_request(PROMPT, 120)
    };
    let whole = |r: exo_core::GenerationRequest| {
        let node = std::sync::Arc::clone(cluster.node(0));
        async move { collect(node.generate(r).await.unwrap()).await.unwrap() }
    };
    let (greedy_text, greedy_end) = whole(greedy.clone()).await;
    let (seeded_text, seeded_end) = whole(seeded.clone()).await;
    assert_eq!(greedy_end.token_ids.len(), 120);

    // The same two, with a stage stopped once each has streamed some text (a request that is
    // not read stops once its 64 events wait: both are mid-answer when the node goes).
    let mut a = cluster.node(0).generate(greedy).await.unwrap();
    let mut b = cluster.node(0).generate(seeded).await.unwrap();
    let a_start = first_pieces(&mut a, 3).await;
    let b_start = first_pieces(&mut b, 3).await;
    let victim = cluster.node(2).node_id().clone();
    assert!(plan.index_of(&victim).is_some());
    let stopped = std::time::Instant::now();
    cluster.stop_node(2).await;
    let (a_rest, a_end) = collect(a).await.expect("the greedy request must go on");
    let (b_rest, b_end) = collect(b).await.expect("the seeded request must go on");
    eprintln!(
        "both answers went on; the stream ended {:?} after the stage stopped",
        stopped.elapsed()
    );
    // Nothing lost, nothing repeated: the text and the tokens are the uninterrupted ones.
    assert_eq!(a_start + &a_rest, greedy_text);
    assert_eq!(a_end.token_ids, greedy_end.token_ids);
    assert_eq!(b_start + &b_rest, seeded_text);
    assert_eq!(b_end.token_ids, seeded_end.token_ids);
    assert_eq!(cluster.node(0).resumed_requests(), 2);
    // The survivors planned without the stopped node, and free what the requests held.
    let after = cluster.wait_ready().await;
    assert_eq!(after.stages.len(), 2);
    assert!(after.index_of(&victim).is_none());
    cluster.wait_idle().await;
    cluster.shutdown().await;
}

/// A schema whose answers are long (30 numbers of 4-5 digits), in an array written without
/// spaces: the tiny model's vocabulary has neither spaces nor braces.
fn thirty_numbers() -> exo_core::OutputConstraint {
    exo_core::OutputConstraint::JsonSchema(
        serde_json::json!({
            "type": "array",
            "items": {"type": "integer", "minimum": 1000, "maximum": 99999},
            "minItems": 30, "maxItems": 30,
            "x-guidance": {"item_separator": ",", "whitespace_flexible": false},
        })
        .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_constrained_answer_follows_its_schema_across_stages_and_through_a_replay() {
    let model = TestModel::tiny(6, 13);
    let mut cluster = TestCluster::start(&model, &[GIB, GIB, GIB]).await;
    assert_eq!(cluster.wait_ready().await.stages.len(), 3);
    let request = exo_core::GenerationRequest {
        sampling: hot(3),
        constraint: Some(thirty_numbers()),
        ignore_eos: false,
        ..raw_request(PROMPT, 230)
    };
    let whole = |r: exo_core::GenerationRequest| {
        let node = std::sync::Arc::clone(cluster.node(0));
        async move { collect(node.generate(r).await.unwrap()).await.unwrap() }
    };
    let (text, end) = whole(request.clone()).await;
    // A random model's answer, forced into the schema: it parses and validates, and ends
    // there (with the end-of-sequence token) rather than running to the limit.
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let numbers = value.as_array().unwrap();
    assert_eq!(numbers.len(), 30, "{text}");
    assert!(
        numbers
            .iter()
            .all(|n| (1000..=99999).contains(&n.as_i64().unwrap())),
        "{text}"
    );
    assert_eq!(end.reason, exo_core::FinishReason::Stop, "{text}");
    assert!(end.token_ids.len() > 100, "{} tokens", end.token_ids.len());

    // The same request with a stage stopped mid-answer: the last stage of the new plan walks
    // the grammar through the tokens already generated, and the answer goes on unchanged.
    let mut events = cluster.node(0).generate(request).await.unwrap();
    let start = first_pieces(&mut events, 3).await;
    cluster.stop_node(2).await;
    let (rest, resumed) = collect(events).await.expect("the request must go on");
    assert_eq!(start + &rest, text);
    assert_eq!(resumed.token_ids, end.token_ids);
    assert_eq!(cluster.node(0).resumed_requests(), 1);

    // A schema the engine cannot compile is refused before anything runs, naming why.
    let bad = exo_core::GenerationRequest {
        constraint: Some(exo_core::OutputConstraint::JsonSchema(
            r#"{"type": "colour"}"#.into(),
        )),
        ..raw_request(PROMPT, 5)
    };
    match cluster.node(0).generate(bad).await {
        Err(GenerationError::Invalid { param, message }) => {
            assert_eq!(param.as_deref(), Some("constraint"));
            assert!(message.contains("colour"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    cluster.wait_idle().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn penalties_and_biases_apply_on_the_last_stage_and_survive_a_replay() {
    let model = TestModel::tiny(6, 13);
    let mut cluster = TestCluster::start(&model, &[GIB, GIB, GIB]).await;
    assert_eq!(cluster.wait_ready().await.stages.len(), 3);
    let whole = |r: exo_core::GenerationRequest| {
        let node = std::sync::Arc::clone(cluster.node(0));
        async move {
            collect(node.generate(r).await.unwrap())
                .await
                .unwrap()
                .1
                .token_ids
        }
    };
    // A random model's greedy answer repeats itself; banning its first token changes the
    // answer at once, and a frequency penalty makes it vary.
    let plain = whole(raw_request(PROMPT, 60)).await;
    let banned = plain[0];
    let penalized = exo_core::GenerationRequest {
        penalties: exo_core::Penalties {
            presence: 0.5,
            frequency: 2.0,
            logit_bias: vec![(banned, -100.0)],
        },
        ..raw_request(PROMPT, 60)
    };
    let ids = whole(penalized.clone()).await;
    assert!(!ids.contains(&banned), "{ids:?}");
    let distinct = |ids: &[u32]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct(&ids) > distinct(&plain),
        "{ids:?} against {plain:?}"
    );

    // Stopped mid-answer, the replayed request counts the tokens it had generated: the answer
    // is the uninterrupted one.
    let mut events = cluster.node(0).generate(penalized).await.unwrap();
    first_pieces(&mut events, 3).await;
    cluster.stop_node(2).await;
    let (_, resumed) = collect(events).await.expect("the request must go on");
    assert_eq!(resumed.token_ids, ids);
    assert_eq!(cluster.node(0).resumed_requests(), 1);

    // A bias for a token the model does not have is refused, naming the field.
    let bad = exo_core::GenerationRequest {
        penalties: exo_core::Penalties {
            logit_bias: vec![(1_000_000, 1.0)],
            ..Default::default()
        },
        ..raw_request(PROMPT, 5)
    };
    match cluster.node(0).generate(bad).await {
        Err(GenerationError::Invalid { param, message }) => {
            assert_eq!(param.as_deref(), Some("logit_bias"));
            assert!(message.contains("1000000"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    cluster.wait_idle().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_probabilities_come_from_the_last_stage_with_each_token() {
    let model = TestModel::tiny(6, 13);
    let cluster = TestCluster::start(&model, &[GIB, GIB]).await;
    assert_eq!(cluster.wait_ready().await.stages.len(), 2);
    let request = exo_core::GenerationRequest {
        logprobs: Some(3),
        ..raw_request(PROMPT, 12)
    };
    let mut events = cluster.node(1).generate(request).await.unwrap();
    let mut entries = Vec::new();
    let finished = loop {
        match events.recv().await {
            Some(Ok(GenerationEvent::Logprob(entry))) => entries.push(entry),
            Some(Ok(GenerationEvent::Text(_))) => {}
            Some(Ok(GenerationEvent::Finished(f))) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(entries.len(), finished.token_ids.len());
    for entry in &entries {
        // Greedy: the token taken is the likeliest, and the alternatives come in order.
        assert_eq!(entry.top.len(), 3);
        assert_eq!(entry.top[0].token, entry.chosen.token);
        assert!((entry.top[0].logprob - entry.chosen.logprob).abs() < 1e-6);
        assert!(entry.chosen.logprob <= 0.0);
        assert!(entry.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }
    // Too many alternatives are refused before anything runs.
    let greedy = exo_core::GenerationRequest {
        logprobs: Some(21),
        ..raw_request(PROMPT, 2)
    };
    assert!(matches!(
        cluster.node(0).generate(greedy).await,
        Err(GenerationError::Invalid { .. })
    ));
    cluster.wait_idle().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_cannot_resume_ends_with_an_error_naming_why_within_the_bound() {
    let model = TestModel::tiny(6, 13);
    let options = Options {
        strategy: exo_cluster::Strategy::CostOptimal,
        resume_within: Duration::from_secs(2),
        ..Options::default()
    };
    // What the whole model needs (weights and the plan's keys and values) ...
    let probe = TestCluster::start_with(&model, &[GIB], options.clone()).await;
    let total: u64 = probe
        .wait_ready()
        .await
        .plan
        .stages
        .iter()
        .flat_map(|s| &s.members)
        .map(|m| m.weight_bytes + m.kv_cache_bytes)
        .sum();
    probe.shutdown().await;
    // ... so that two nodes offering 70 % of it each need each other.
    let each = total * 7 / 10;
    let mut cluster = TestCluster::start_with(&model, &[each, each], options).await;
    let plan = cluster.wait_ready().await;
    assert_eq!(plan.stages.len(), 2);
    // (A request that is not read stops once its 64 events wait: it is mid-answer when the
    // node goes.)
    let mut events = cluster
        .node(0)
        .generate(raw_request(PROMPT, 230))
        .await
        .unwrap();
    first_pieces(&mut events, 2).await;
    // Node 1 goes, and nothing takes its place: node 0 alone cannot hold the model.
    let victim = cluster.node(1).node_id().clone();
    let stopped = std::time::Instant::now();
    cluster.stop_node(1).await;
    let error = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match events.recv().await {
                Some(Ok(GenerationEvent::Text(_))) => {}
                Some(Err(e)) => return e,
                other => panic!("expected an error, got {other:?}"),
            }
        }
    })
    .await
    .expect("the request must end within the bound, not hang");
    let took = stopped.elapsed();
    eprintln!("ended {took:?} after the stage stopped: {error}");
    let text = error.to_string();
    // The caller hears the cluster-level problem; which node it was is for the log.
    assert!(!text.contains(&victim.to_string()), "{text}");
    // A node shutting down may first refuse the request's next step (more often on a loaded
    // machine) before its links close: either is how it left.
    assert!(
        text.contains("a node of the cluster went away")
            || text.contains("a node of the cluster would not take it"),
        "{text}"
    );
    assert!(text.contains("no plan without it"), "{text}");
    assert!(text.contains("short by"), "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_says_why_until_the_cluster_can_serve_then_answers_200() {
    let model = TestModel::tiny(4, 21);
    let options = Options {
        strategy: exo_cluster::Strategy::CostOptimal,
        ..Options::default()
    };
    let mut cluster = TestCluster::empty(options);
    // One node offering 64 KiB cannot hold the model.
    cluster.add_node(&model, 64 << 10).await;
    let node = std::sync::Arc::clone(cluster.node(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let engine = std::sync::Arc::new(exo_cluster::NodeEngine::new(node));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(exo_api::serve(
        listener,
        engine,
        exo_api::ApiConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let reply = request(address, "GET", "/readyz", None).await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        if reply.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("short by"))
        {
            break reply;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("not ready yet: {}", waiting.body);
    assert_eq!(request(address, "GET", "/healthz", None).await.status, 200);
    let cluster_view = request(address, "GET", "/v1/cluster", None).await.json();
    assert_eq!(cluster_view["ready"], false, "{cluster_view}");

    // A node with room joins: the plan puts every layer there, and the first node serves
    // through it.
    cluster.add_node(&model, GIB).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = request(address, "GET", "/readyz", None).await;
        if reply.status == 200 {
            assert_eq!(reply.json(), serde_json::json!({"status": "ready"}));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = serde_json::json!({
        "model": model.id(),
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    });
    let reply = request(address, "POST", "/v1/chat/completions", Some(&body)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.json()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    let _ = stop.send(());
    let _ = server.await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_refused_with_typed_errors_before_anything_runs() {
    let model = TestModel::tiny(2, 1);
    let cluster = TestCluster::start(&model, &[GIB]).await;
    let node = cluster.node(0);
    let context = model.config.max_position_embeddings as u32;

    let mut wrong_model = raw_request(PROMPT, 4);
    wrong_model.model = "another-model".into();
    assert!(matches!(
        node.generate(wrong_model).await,
        Err(GenerationError::UnknownModel { available, .. }) if available == vec![model.id()]
    ));

    let too_long = raw_request(PROMPT, context);
    assert!(matches!(
        node.generate(too_long).await,
        Err(GenerationError::ContextExceeded { max_tokens, .. }) if max_tokens == context as usize
    ));

    let empty = raw_request("", 4);
    assert!(matches!(
        node.generate(empty).await,
        Err(GenerationError::Invalid { .. })
    ));

    let mut hot = raw_request(PROMPT, 4);
    hot.sampling.top_p = 0.0;
    assert!(matches!(
        node.generate(hot).await,
        Err(GenerationError::Invalid { param: Some(p), .. }) if p == "top_p"
    ));
    // Nothing of them reached a stage, and the node still answers.
    assert_eq!(node.status().active_requests, 0);
    assert_eq!(ids_from(&cluster, 0, raw_request(PROMPT, 3)).await.len(), 3);
    cluster.shutdown().await;
}

/// Waits (at most 30 s) on the live view `rx` until `condition` holds; returns that view.
async fn wait_view(
    rx: &mut tokio::sync::watch::Receiver<exo_api::ClusterView>,
    what: &str,
    condition: impl Fn(&exo_api::ClusterView) -> bool,
) -> exo_api::ClusterView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = rx.borrow_and_update().clone();
        if condition(&view) {
            return view;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the live view ended while waiting for {what}: {view:#?}"),
            Err(_) => panic!("no view with {what} within 30 s; the last: {view:#?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_view_follows_a_join_a_request_and_a_departure() {
    use exo_api::{Engine, NodeState};

    let model = TestModel::tiny(4, 33);
    let options = Options {
        strategy: exo_cluster::Strategy::CostOptimal,
        ..Options::default()
    };
    let mut cluster = TestCluster::empty(options);
    // A node too small for the model: the view says the cluster waits, and why.
    cluster.add_node(&model, 64 << 10).await;
    let first = std::sync::Arc::clone(cluster.node(0));
    let engine = exo_cluster::NodeEngine::new(std::sync::Arc::clone(&first));
    let mut rx = engine
        .cluster_events()
        .expect("a node engine keeps a live view");
    let view = wait_view(&mut rx, "the planner's reason", |v| {
        v.status.contains("short by") && v.nodes.len() == 1
    })
    .await;
    assert!(!view.ready);
    assert!(view.plan.is_none());
    assert_eq!(view.nodes[0].state, NodeState::Waiting, "{view:#?}");
    assert!(view.nodes[0].is_self);
    assert!(!view.nodes[0].os.is_empty(), "{view:#?}");
    assert!(view.nodes[0].cores > 0);

    // A node with room joins: the same receiver sees it, then the plan that gives it the layers.
    cluster.add_node(&model, GIB).await;
    let second = cluster.node(1).node_id().to_string();
    let view = wait_view(&mut rx, "the second node holding every layer", |v| {
        v.ready
            && v.plan.as_ref().is_some_and(|p| p.stages.len() == 1)
            && v.nodes
                .iter()
                .any(|n| n.id == second && n.state == NodeState::Ready)
    })
    .await;
    let plan = view.plan.as_ref().unwrap();
    assert_eq!(plan.stages[0].node, second);
    assert_eq!(
        (plan.stages[0].layers_start, plan.stages[0].layers_end),
        (0, 4)
    );
    // The small node is left out, and says so.
    let small = view.nodes.iter().find(|n| n.is_self).unwrap();
    assert!(
        matches!(small.state, NodeState::Idle | NodeState::Joining),
        "{view:#?}"
    );
    assert_eq!(view.links.len(), 1, "{view:#?}");
    let holder = view.nodes.iter().find(|n| n.id == second).unwrap();
    assert!(holder.used_memory_bytes.is_some_and(|b| b > 0), "{view:#?}");
    assert!(holder.weight_bytes.is_some_and(|b| b > 0), "{view:#?}");

    // A request through the first node runs on the second: the view, still watched, shows
    // the stage's step time and rate.
    let events = engine.generate(raw_request(PROMPT, 8)).await.unwrap();
    let (_, finished) = collect(events).await.unwrap();
    assert_eq!(finished.token_ids.len(), 8);
    let view = wait_view(&mut rx, "the stage's figures", |v| {
        v.plan.as_ref().is_some_and(|p| {
            p.stages[0].step_ms.is_some_and(|ms| ms > 0.0)
                && p.stages[0].tokens_per_s.is_some()
                && p.stages[0].requests.is_some()
                // One stage: its tokens go to their origin, no activations to a next stage.
                && p.stages[0].sent_bytes == Some(0)
        })
    })
    .await;
    eprintln!("after one request: {:#?}", view.plan);

    // The second node leaves: it stays in the view as gone, and the cluster waits again.
    cluster.stop_node(1).await;
    let view = wait_view(&mut rx, "the second node gone", |v| {
        v.plan.is_none()
            && v.nodes
                .iter()
                .any(|n| n.id == second && n.state == NodeState::Gone)
    })
    .await;
    assert!(!view.ready);
    drop(engine);
    cluster.shutdown().await;
}

/// Largest difference between two embeddings, value by value.
fn farthest(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_embedding_is_pooled_on_the_last_stage_like_one_process_pools_it() {
    let model = TestModel::tiny(6, 17);
    let texts = [
        PROMPT,
        "a much longer text, sent in several chunks of five tokens each",
        "x",
    ];
    let references: Vec<Vec<f32>> = texts.iter().map(|t| model.reference_embedding(t)).collect();
    for reference in &references {
        let length: f32 = reference.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((length - 1.0).abs() < 1e-5, "normalised: {length}");
    }
    assert!(
        farthest(&references[0], &references[1]) > 1e-3,
        "texts differ"
    );
    // Prompts go in chunks of 5 tokens and stages compute at most 4 rows a step, so a text's
    // rows are pooled over several pieces.
    let options = Options {
        prefill_chunk: 5,
        step_rows: 4,
        ..Options::default()
    };
    for memory in [vec![GIB], vec![GIB, GIB], vec![3 * GIB, GIB, GIB]] {
        let cluster = TestCluster::start_with(&model, &memory, options.clone()).await;
        let stages = cluster.wait_ready().await.stages.len();
        assert_eq!(stages, memory.len());
        // All at once, beside a generation, so that they share steps with it and each other.
        let generation = cluster
            .node(0)
            .generate(raw_request(PROMPT, 8))
            .await
            .unwrap();
        let mut pending = Vec::new();
        for text in texts {
            let request = exo_core::GenerationRequest::embedding(text);
            pending.push(cluster.node(stages - 1).generate(request).await.unwrap());
        }
        for ((events, reference), text) in pending.into_iter().zip(&references).zip(texts) {
            let (values, finished) = exo_testkit::collect_embedding(events).await.unwrap();
            assert!(
                farthest(&values, reference) < 1e-4,
                "{stages} stages, {text:?}: {values:?} against {reference:?}"
            );
            assert!(finished.token_ids.is_empty());
            assert!(finished.prompt_tokens > 0);
        }
        let (_, finished) = collect(generation).await.unwrap();
        assert_eq!(finished.token_ids.len(), 8);
        // Every stage freed the requests' keys and values.
        cluster.wait_idle().await;
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompt_log_probabilities_come_from_the_last_stage_before_the_first_token() {
    let model = TestModel::tiny(6, 19);
    // The tiny vocabulary has no space.
    let text = "score_every_token,of;this_prompt:sent_in_chunks";
    let reference = model.reference_prompt_logprobs(text);
    assert!(reference.len() > 12, "a prompt of several chunks");
    let options = Options {
        prefill_chunk: 5,
        step_rows: 4,
        ..Options::default()
    };
    let cluster = TestCluster::start_with(&model, &[GIB, GIB], options).await;
    assert_eq!(cluster.wait_ready().await.stages.len(), 2);
    let request = exo_core::GenerationRequest {
        prompt_logprobs: Some(2),
        ..raw_request(text, 3)
    };
    let mut events = cluster.node(0).generate(request).await.unwrap();
    let scored = match events.recv().await {
        Some(Ok(GenerationEvent::PromptLogprobs(p))) => p,
        other => panic!("the prompt's scores come first, got {other:?}"),
    };
    assert_eq!(scored.rest.len(), reference.len());
    for (i, (entry, expected)) in scored.rest.iter().zip(&reference).enumerate() {
        assert!(
            (entry.chosen.logprob - expected).abs() < 1e-4,
            "position {}: {} against {expected}",
            i + 1,
            entry.chosen.logprob
        );
        assert_eq!(entry.top.len(), 2);
        assert!(entry.top[0].logprob >= entry.top[1].logprob);
        assert!(entry.top[0].logprob >= entry.chosen.logprob - 1e-6);
    }
    // The texts of the prompt's tokens make the prompt.
    let joined: String = std::iter::once(&scored.first)
        .chain(scored.rest.iter().map(|e| &e.chosen))
        .map(|t| t.token.as_str())
        .collect();
    assert_eq!(joined, text);
    let (_, finished) = collect(events).await.unwrap();
    assert_eq!(finished.token_ids.len(), 3);

    // A prompt of token ids runs as they are; one outside the vocabulary is refused.
    let ids = vec![10, 20, 30, 40];
    let request = exo_core::GenerationRequest {
        prompt_logprobs: Some(0),
        ..exo_core::GenerationRequest::new(exo_core::Prompt::Tokens(ids.clone()))
    };
    let mut events = cluster.node(1).generate(request).await.unwrap();
    match events.recv().await {
        Some(Ok(GenerationEvent::PromptLogprobs(p))) => assert_eq!(p.rest.len(), ids.len() - 1),
        other => panic!("the prompt's scores come first, got {other:?}"),
    }
    collect(events).await.unwrap();
    let outside = exo_core::GenerationRequest::new(exo_core::Prompt::Tokens(vec![1, 96]));
    match cluster.node(0).generate(outside).await {
        Err(GenerationError::Invalid { param, message }) => {
            assert_eq!(param.as_deref(), Some("prompt"));
            assert!(message.contains("token 96"), "{message}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    cluster.wait_idle().await;
    cluster.shutdown().await;
}
