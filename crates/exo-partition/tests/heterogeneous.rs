//! Worked heterogeneous clusters: ours against the baseline, tensor-parallel groups, errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use exo_partition::{
    ClusterProfile, Error, LinkProfile, ModelProfile, NodeProfile, Plan, RequestProfile, Strategy,
    plan,
};

fn ours(model: &ModelProfile, cluster: &ClusterProfile, request: &RequestProfile) -> Plan {
    plan(model, cluster, request, Strategy::CostOptimal).unwrap()
}

fn baseline(model: &ModelProfile, cluster: &ClusterProfile, request: &RequestProfile) -> Plan {
    plan(model, cluster, request, Strategy::MemoryWeighted).unwrap()
}

fn excluded(plan: &Plan) -> Vec<&str> {
    plan.excluded.iter().map(|e| e.node.as_str()).collect()
}

#[test]
fn ours_beats_the_baseline_on_every_worked_example_and_names_who_it_left_out() {
    for s in scenarios() {
        let base = baseline(&s.model, &s.cluster, &s.request);
        let ours = ours(&s.model, &s.cluster, &s.request);
        assert!(
            ours.predicted.decode_tokens_per_s > base.predicted.decode_tokens_per_s,
            "{}: ours {:.2} tokens/s, baseline {:.2}\n{ours}\n{base}",
            s.name,
            ours.predicted.decode_tokens_per_s,
            base.predicted.decode_tokens_per_s,
        );
        assert!(ours.fits_memory(), "{}", s.name);
        assert_eq!(excluded(&ours), s.left_out, "{}:\n{ours}", s.name);
        for node in s.left_out {
            let line = format!("{node} left out: ");
            assert!(
                ours.explanation.iter().any(|l| l.starts_with(&line)),
                "{}: no line for {node}:\n{ours}",
                s.name
            );
        }
    }
}

#[test]
fn fast_desktop_runs_alone_and_the_pi_on_a_slow_link_is_left_out_for_it() {
    // 64 GiB fast + 16 GiB slow + 4 GiB on a slow link.
    let s = &scenarios()[0];
    let ours = ours(&s.model, &s.cluster, &s.request);
    assert_eq!(ours.stages.len(), 1);
    assert_eq!(ours.stages[0].lead().unwrap().as_str(), "desktop");
    let pi = ours
        .excluded
        .iter()
        .find(|e| e.node.as_str() == "pi")
        .unwrap();
    assert!(pi.reason.contains("12.0 ms latency"), "{}", pi.reason);
    assert!(
        pi.reason.contains("fits without its memory"),
        "{}",
        pi.reason
    );
    assert!(pi.added_time_per_token_s.unwrap() > 0.01);
    // The baseline gives the Pi layers and the head, and pays for it.
    let base = baseline(&s.model, &s.cluster, &s.request);
    assert!(base.nodes().any(|n| n.as_str() == "pi"));
    assert!(ours.predicted.decode_tokens_per_s > 5.0 * base.predicted.decode_tokens_per_s);
}

#[test]
fn big_model_goes_on_the_two_desktops_that_hold_it() {
    let s = &scenarios()[1];
    let ours = ours(&s.model, &s.cluster, &s.request);
    let nodes: Vec<&str> = ours.nodes().map(|n| n.as_str()).collect();
    assert_eq!(nodes, ["desk-a", "desk-b"]);
    // The first desktop is filled before the second is used.
    assert!(ours.stages[0].layers.len() > ours.stages[1].layers.len());
}

fn pair(link: (f64, f64)) -> ClusterProfile {
    let mut links = Vec::new();
    common::link(&mut links, "mini-a", "mini-b", link);
    ClusterProfile::new(vec![mac_mini("mini-a", 24), mac_mini("mini-b", 24)], links)
}

#[test]
fn equal_nodes_on_a_fast_link_form_a_tensor_group_that_decodes_faster() {
    let model = llama3_8b_f16();
    let request = RequestProfile::new(4096, 512);
    let group = ours(&model, &pair(THUNDERBOLT), &request);
    assert_eq!(group.stages.len(), 1);
    let stage = &group.stages[0];
    assert!(stage.is_tensor_parallel());
    let heads: Vec<u32> = stage.members.iter().map(|m| m.kv_heads).collect();
    assert_eq!(heads, [4, 4]);
    assert_eq!(stage.members[0].mlp_columns, 7168);
    let alone = ours(
        &model,
        &ClusterProfile::new(vec![mac_mini("mini-a", 24)], vec![]),
        &request,
    );
    assert!(
        group.predicted.time_per_token_s < 0.6 * alone.predicted.time_per_token_s,
        "group {} s, alone {} s",
        group.predicted.time_per_token_s,
        alone.predicted.time_per_token_s
    );
    assert!(group.predicted.all_reduce_s > 0.0);
    assert!(
        group
            .explanation
            .iter()
            .any(|l| l.contains("tensor-parallel group"))
    );
}

#[test]
fn a_runtime_without_tensor_parallelism_gets_pipeline_stages_only() {
    let model = llama3_8b_f16();
    let request = RequestProfile::new(4096, 512);
    let mut cluster = pair(THUNDERBOLT);
    cluster.max_tensor_parallel = 1;
    let plan = ours(&model, &cluster, &request);
    assert!(
        plan.stages.iter().all(|s| !s.is_tensor_parallel()),
        "{plan}"
    );
    // A pipeline split of a model that fits on one node only adds hops: it stays on one.
    assert_eq!(plan.nodes().count(), 1, "{plan}");
}

#[test]
fn equal_nodes_on_a_slow_link_do_not_form_a_tensor_group() {
    let model = llama3_8b_f16();
    let request = RequestProfile::new(4096, 512);
    let plan = ours(&model, &pair(WIFI), &request);
    assert!(
        plan.stages.iter().all(|s| !s.is_tensor_parallel()),
        "{plan}"
    );
    let alone = ours(
        &model,
        &ClusterProfile::new(vec![mac_mini("mini-a", 24)], vec![]),
        &request,
    );
    assert_eq!(
        plan.predicted.time_per_token_s,
        alone.predicted.time_per_token_s
    );
    assert_eq!(excluded(&plan), ["mini-b"]);
}

#[test]
fn uneven_nodes_on_a_fast_link_get_uneven_whole_head_shares() {
    let model = llama3_8b_f16();
    let mut links = Vec::new();
    common::link(&mut links, "mini", "laptop", THUNDERBOLT);
    let cluster = ClusterProfile::new(vec![mac_mini("mini", 24), laptop("laptop", 24)], links);
    let plan = ours(&model, &cluster, &RequestProfile::new(4096, 512));
    let stage = &plan.stages[0];
    assert!(stage.is_tensor_parallel(), "{plan}");
    let share = |id: &str| {
        stage
            .members
            .iter()
            .find(|m| m.node.as_str() == id)
            .unwrap()
            .kv_heads
    };
    // The Mac reads memory twice as fast as the laptop.
    assert_eq!((share("mini"), share("laptop")), (5, 3));
}

#[test]
fn ring_crosses_between_rooms_only_twice() {
    // Four laptops in two rooms; every node is needed for the weights and the link between
    // rooms is slow. Memory order interleaves the rooms, so the baseline crosses four times.
    let s = scenarios()
        .into_iter()
        .find(|s| s.name == "two rooms, pipeline")
        .unwrap();
    let (model, cluster, request) = (&s.model, &s.cluster, &s.request);
    let crossings = |plan: &Plan| {
        let leads: Vec<&str> = plan
            .stages
            .iter()
            .map(|s| s.lead().unwrap().as_str())
            .collect();
        (0..leads.len())
            .filter(|&i| leads[i][..1] != leads[(i + 1) % leads.len()][..1])
            .count()
    };
    let ours = ours(model, cluster, request);
    let base = baseline(model, cluster, request);
    assert_eq!(ours.nodes().count(), 4, "{ours}");
    assert!(
        ours.stages.iter().all(|s| !s.is_tensor_parallel()),
        "{ours}"
    );
    assert_eq!(crossings(&base), 4, "{base}");
    assert_eq!(crossings(&ours), 2, "{ours}");
    assert!(ours.predicted.decode_tokens_per_s > base.predicted.decode_tokens_per_s);
}

#[test]
fn too_little_memory_names_the_shortfall_and_the_largest_context_that_fits() {
    let model = llama3_8b_q4();
    let cluster = ClusterProfile::new(vec![laptop("laptop", 4), pi5("pi", 2)], vec![]);
    let request = RequestProfile::new(32_768, 512);
    let Err(Error::InsufficientMemory(short)) =
        plan(&model, &cluster, &request, Strategy::CostOptimal)
    else {
        panic!("expected a shortfall");
    };
    assert_eq!(short.available_bytes, 6 * GIB);
    assert_eq!(
        short.needed_bytes,
        model.weight_bytes() + model.kv_reserve_bytes(&request)
    );
    assert_eq!(
        short.shortfall_bytes,
        short.needed_bytes - short.available_bytes
    );
    let context = short.max_context_that_fits.unwrap();
    let fits = |context: u64| {
        let request = RequestProfile::new(context, context.min(512));
        plan(&model, &cluster, &request, Strategy::CostOptimal).is_ok()
    };
    assert!(fits(context));
    assert!(!fits(context + 1));
    let message = Error::InsufficientMemory(short.clone()).to_string();
    assert!(
        message.starts_with("cluster offers 6.0 GiB but the model needs"),
        "{message}"
    );
    assert!(message.contains(&format!(
        "the largest context that fits is {context} tokens"
    )));
    // The baseline refuses the same cluster with the same figures.
    let Err(Error::InsufficientMemory(base)) =
        plan(&model, &cluster, &request, Strategy::MemoryWeighted)
    else {
        panic!("expected a shortfall");
    };
    assert_eq!(base, short);
}

#[test]
fn weights_that_do_not_fit_at_all_name_the_largest_model_that_would() {
    let model = llama3_70b_q4();
    let cluster = ClusterProfile::new(vec![desktop("desktop", 16), laptop("laptop", 8)], vec![]);
    let request = RequestProfile::new(4096, 512);
    let err = plan(&model, &cluster, &request, Strategy::CostOptimal).unwrap_err();
    let Error::InsufficientMemory(short) = &err else {
        panic!("{err}")
    };
    assert_eq!(short.max_context_that_fits, None);
    assert!(short.max_layers_that_fit > 0 && short.max_layers_that_fit < 80);
    assert!(short.max_model_bytes_that_fit <= short.available_bytes);
    let mut smaller = model.clone();
    smaller.layers = short.max_layers_that_fit;
    assert!(plan(&smaller, &cluster, &request, Strategy::CostOptimal).is_ok());
    smaller.layers += 1;
    assert!(plan(&smaller, &cluster, &request, Strategy::CostOptimal).is_err());
    assert!(
        err.to_string()
            .contains("the largest model of this shape that fits has"),
        "{err}"
    );
}

#[test]
fn enough_memory_in_total_but_not_for_whole_layers_is_explained() {
    let model = ModelProfile {
        layers: 4,
        layer_weight_bytes: 1_000_000_000,
        embedding_bytes: 1_000,
        head_bytes: 1_000,
        layer_flops_per_token: 2_000_000_000,
        hidden_size: 1024,
        intermediate_size: 4096,
        attention_heads: 8,
        kv_heads: 2,
        kv_bytes_per_token_per_layer: 0,
        vocab_size: 1000,
        activation_bytes: 2,
    };
    // Three nodes of 1.6 GB hold 4.8 GB, but one 1 GB layer each; no links were measured,
    // so tensor-parallel groups (which could split a layer) do not pay off.
    let nodes = ["a", "b", "c"]
        .map(|id| NodeProfile::new(id, 1_600_000_000, 1e12, 100e9, "ndarray"))
        .to_vec();
    let cluster = ClusterProfile::new(nodes, vec![]);
    let err = plan(
        &model,
        &cluster,
        &RequestProfile::new(16, 16),
        Strategy::CostOptimal,
    )
    .unwrap_err();
    let Error::InsufficientMemory(short) = &err else {
        panic!("{err}")
    };
    assert_eq!(short.max_layers_that_fit, 3);
    assert_eq!(short.shortfall_bytes, 1_000_000_000);
    assert!(
        err.to_string().contains("whole layers for only 3 of 4"),
        "{err}"
    );
}

#[test]
fn baseline_that_overruns_a_node_is_reported_while_ours_fits() {
    // Long contexts: the baseline splits by memory and forgets the KV cache and the head.
    let model = llama3_8b_q4();
    let cluster = ClusterProfile::new(
        vec![desktop("desktop", 20), pi5("pi", 5)],
        star(&[("desktop", GIGABIT), ("pi", GIGABIT)]),
    );
    let mut request = RequestProfile::new(32_768, 512);
    request.concurrent_requests = 5;
    let base = baseline(&model, &cluster, &request);
    assert!(!base.fits_memory(), "{base}");
    assert_eq!(base.overruns[0].node.as_str(), "pi");
    assert!(base.overruns[0].needed_bytes > base.overruns[0].offered_bytes);
    assert!(
        base.explanation
            .iter()
            .any(|l| l.starts_with("pi would need"))
    );
    let ours = ours(&model, &cluster, &request);
    assert!(ours.fits_memory());
}

#[test]
fn unmeasured_links_are_assumed_poor_and_said_so() {
    let model = llama3_8b_q4();
    let cluster = ClusterProfile::new(vec![desktop("desktop", 64), laptop("stranger", 16)], vec![]);
    let plan = ours(&model, &cluster, &RequestProfile::new(4096, 512));
    let stranger = &plan.excluded[0];
    assert_eq!(stranger.node.as_str(), "stranger");
    assert!(
        stranger.reason.contains("unmeasured"),
        "{}",
        stranger.reason
    );
    assert!(
        stranger.reason.contains("5.00 ms latency"),
        "{}",
        stranger.reason
    );
}

#[test]
fn node_without_room_for_a_layer_is_left_out_for_its_memory() {
    let model = llama3_8b_q4();
    let cluster = ClusterProfile::new(
        vec![
            desktop("desktop", 64),
            NodeProfile::new("tiny", 1 << 20, 1e9, 1e9, "ndarray"),
        ],
        vec![LinkProfile::new("desktop", "tiny", 1e-4, 1e9)],
    );
    let plan = ours(&model, &cluster, &RequestProfile::new(4096, 512));
    let tiny = &plan.excluded[0];
    assert!(
        tiny.reason.starts_with("it offers 1.0 MiB but one layer"),
        "{}",
        tiny.reason
    );
    assert_eq!(tiny.added_time_per_token_s, None);
}

#[test]
fn invalid_inputs_are_refused_naming_what_is_wrong() {
    let model = llama3_8b_q4();
    let request = RequestProfile::new(4096, 512);
    let nodes = || vec![desktop("a", 16), laptop("b", 16)];
    let check =
        |model: &ModelProfile, cluster: &ClusterProfile, request: &RequestProfile, want: &str| {
            let err = plan(model, cluster, request, Strategy::CostOptimal).unwrap_err();
            assert_eq!(err.to_string(), want);
        };
    let mut zero = model.clone();
    zero.layers = 0;
    check(
        &zero,
        &ClusterProfile::new(nodes(), vec![]),
        &request,
        "invalid model profile: layers is zero",
    );
    check(
        &model,
        &ClusterProfile::new(vec![], vec![]),
        &request,
        "cluster has no nodes",
    );
    check(
        &model,
        &ClusterProfile::new(vec![desktop("a", 16), laptop("a", 16)], vec![]),
        &request,
        "node id a is listed more than once",
    );
    let mut nan = nodes();
    nan[1].mem_bandwidth_bytes_per_s = f64::NAN;
    check(
        &model,
        &ClusterProfile::new(nan, vec![]),
        &request,
        "node b: mem_bandwidth_bytes_per_s is NaN, expected a positive finite number",
    );
    check(
        &model,
        &ClusterProfile::new(nodes(), vec![LinkProfile::new("a", "c", 1e-3, 1e8)]),
        &request,
        "link a -> c names unknown node c",
    );
    check(
        &model,
        &ClusterProfile::new(nodes(), vec![LinkProfile::new("a", "a", 1e-3, 1e8)]),
        &request,
        "link a -> a: goes from a node to itself",
    );
    check(
        &model,
        &ClusterProfile::new(nodes(), vec![LinkProfile::new("a", "b", 1e-3, 0.0)]),
        &request,
        "link a -> b: bandwidth_bytes_per_s is 0, expected a positive finite number",
    );
    check(
        &model,
        &ClusterProfile::new(nodes(), vec![]),
        &RequestProfile::new(0, 0),
        "invalid request profile: context_len is zero",
    );
}

#[test]
fn a_single_node_cluster_gets_one_stage_with_everything() {
    let model = llama3_8b_q4();
    let plan = ours(
        &model,
        &ClusterProfile::new(vec![laptop("laptop", 16)], vec![]),
        &RequestProfile::new(4096, 512),
    );
    assert_eq!(plan.stages.len(), 1);
    let stage = &plan.stages[0];
    assert!(stage.holds_embedding && stage.holds_head);
    assert_eq!(stage.layers.len(), 32);
    assert_eq!(stage.members[0].kv_heads, 8);
    assert_eq!(plan.predicted.link_s, 0.0);
    assert!(plan.excluded.is_empty());
}

#[test]
fn the_default_model_plans_on_one_core_like_nodes() {
    // SmolLM2-135M Q4_1 on two one-core nodes over loopback: the mission's tensor-parallel
    // target setting. A group must form, and be predicted well over 1.7x one node.
    let model = ModelProfile::llama(&exo_partition::LlamaShape::smollm2_135m(5.0)).unwrap();
    let core = |id: &str| NodeProfile::new(id, 1 << 30, 50e9, 10e9, "ndarray");
    let cluster = ClusterProfile::new(
        vec![core("core-0"), core("core-1")],
        vec![LinkProfile::new("core-0", "core-1", 5e-6, 5e9)],
    );
    let request = RequestProfile::new(2048, 64);
    let pair = ours(&model, &cluster, &request);
    let one = ours(
        &model,
        &ClusterProfile::new(vec![core("core-0")], vec![]),
        &request,
    );
    assert!(pair.stages[0].is_tensor_parallel(), "{pair}");
    assert!(pair.predicted.decode_tokens_per_s > 1.5 * one.predicted.decode_tokens_per_s);
}

#[test]
fn equal_pipeline_stages_give_the_head_stage_fewer_layers() {
    // The default model on two equal one-core nodes that cannot hold it alone, pipeline only:
    // every split has the same single-stream time, but under load the slowest stage sets the
    // pace, and the last stage also computes the head (49,152 x 576, about eight layers' worth).
    let model = ModelProfile::llama(&exo_partition::LlamaShape::smollm2_135m(5.0)).unwrap();
    let core = |id: &str| NodeProfile::new(id, 100 << 20, 50e9, 10e9, "ndarray");
    let mut cluster = ClusterProfile::new(
        vec![core("core-0"), core("core-1")],
        vec![LinkProfile::new("core-0", "core-1", 5e-6, 5e9)],
    );
    cluster.max_tensor_parallel = 1;
    let request = RequestProfile::new(256, 64);
    let plan = ours(&model, &cluster, &request);
    assert_eq!(plan.stages.len(), 2, "{plan}");
    let (first, last) = (&plan.stages[0], &plan.stages[1]);
    assert!(first.holds_embedding && last.holds_head, "{plan}");
    // Balanced: 19 and 11 layers (the search alone left one layer beside the head).
    assert!(
        first.layers.len() > last.layers.len() + 4 && last.layers.len() >= 8,
        "the stages should take equal time, the head's with fewer layers: {plan}"
    );
}
