//! Models over the LAN, in one process: nodes that have no model file learn it from a peer
//! that has it and fetch exactly the chunks of their own shard.
//!
//! - a node with an empty store serves its stage, and the cluster answers like one process;
//!   it received exactly its shard's chunks and the header, nothing else;
//! - a peer that corrupts what it sends is dropped as a source and the chunks come from
//!   another; nothing corrupt reaches the store;
//! - a node stopped in the middle of its fetch, started again on the same store, fetches only
//!   the chunks it did not have;
//! - a new plan that moves a node's layers fetches only the chunks it did not hold, and a store
//!   at its limit gives back the layers of the earlier plan.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use exo_cluster::{ClusterConfig, Store};
use exo_core::SamplingParams;
use exo_shard::Weights;
use exo_store::{ChunkSet, Manifest, ShardParts};
use exo_testkit::cluster::Options;
use exo_testkit::{TestCluster, TestModel, collect, raw_request};

const GIB: u64 = 1 << 30;
const PROMPT: &str = "fetch,me;from_peers";

/// Gives the node a store in its home folder; imports are described in `chunk` bytes.
fn with_store(chunk: u64) -> impl FnOnce(&mut ClusterConfig) {
    move |config| {
        let root = config.topology.home.join("store");
        config.store = Some(Store::open(&root, None).unwrap().with_chunk_bytes(chunk));
    }
}

/// A cluster of a node holding the model at `holds` and one that names it `names` with an empty
/// store; `holder` and `fetcher` configure them further (both get a store, in `chunk` bytes).
async fn holder_and_fetcher(
    holds: &Path,
    names: &str,
    chunk: u64,
    holder: impl FnOnce(&mut ClusterConfig),
    fetcher: impl FnOnce(&mut ClusterConfig),
) -> TestCluster {
    let mut cluster = TestCluster::empty(Options::default());
    cluster
        .add_node_with(holds.to_owned(), GIB, |config| {
            with_store(chunk)(config);
            holder(config);
        })
        .await;
    cluster
        .add_node_with(PathBuf::from(names), GIB, |config| {
            with_store(chunk)(config);
            fetcher(config);
        })
        .await;
    cluster
}

async fn ids_from(cluster: &TestCluster, node: usize, prompt: &str) -> Vec<u32> {
    let events = cluster
        .node(node)
        .generate(raw_request(prompt, 12))
        .await
        .unwrap();
    collect(events).await.unwrap().1.token_ids
}

/// Checks that requests at each of `origins` get `reference`'s tokens.
async fn answers_like(cluster: &TestCluster, origins: &[usize], reference: &[u32]) {
    for &origin in origins {
        assert_eq!(
            ids_from(cluster, origin, PROMPT).await,
            reference,
            "at node {origin}"
        );
    }
}

/// The chunks node `i`'s stage reads, by the plan.
fn shard_chunks(cluster: &TestCluster, i: usize, manifest: &Manifest) -> ChunkSet {
    let exo_cluster::PlanState::Ready(plan) = cluster.node(i).plan_state() else {
        panic!("no plan");
    };
    let index = plan.index_of(cluster.node(i).node_id()).unwrap();
    let layers = plan.stages[index].layers;
    manifest.chunks_for_shard(&ShardParts {
        layers: layers.start as usize..layers.end as usize,
        embedding: index == 0,
        head: index + 1 == plan.stages.len(),
    })
}

/// Checks every chunk `i` holds against the original file, byte for byte.
fn held_chunks_are_the_files(cluster: &TestCluster, i: usize, original: &Path) {
    let (_, held, manifest) = cluster.node(i).store_entry().unwrap();
    let bytes = std::fs::read(original).unwrap();
    let root = manifest.name.clone();
    let copy_path = find_copy(cluster, i, &root);
    let copy = std::fs::read(copy_path).unwrap();
    for index in held.iter() {
        let c = &manifest.chunks[index as usize];
        let range = c.offset as usize..(c.offset + c.len) as usize;
        assert_eq!(copy[range.clone()], bytes[range], "chunk {index}");
    }
}

fn find_copy(cluster: &TestCluster, i: usize, name: &str) -> PathBuf {
    let (hash, _, _) = cluster.node(i).store_entry().unwrap();
    let home = cluster.nodes[i].home();
    home.join("store").join(hash).join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_an_empty_store_serves_its_stage_and_answers_like_one_process() {
    let model = TestModel::tiny(4, 21);
    let reference = model.reference(PROMPT, 12, SamplingParams::greedy(), Weights::Stored);
    // The second node names the model by its file's name (the others use the model's name);
    // it has no file and nothing in its store.
    let name = format!("{}.gguf", model.id());
    let cluster = holder_and_fetcher(&model.path, &name, 512, |_| {}, |_| {}).await;
    cluster.wait_ready().await;
    answers_like(&cluster, &[0, 1], &reference).await;
    let (hash, held, manifest) = cluster.node(1).store_entry().unwrap();
    assert_eq!(
        Some(&hash),
        cluster.node(0).store_entry().map(|e| e.0).as_ref()
    );
    // Exactly its shard's chunks (with the header): not the other node's layers.
    let wanted = shard_chunks(&cluster, 1, &manifest);
    assert_eq!(held, wanted);
    assert!(held.len() < u64::from(manifest.chunk_count()));
    let (_, received) = cluster.node(1).chunk_traffic();
    assert_eq!(received, manifest.bytes_of(&wanted));
    let (sent, _) = cluster.node(0).chunk_traffic();
    assert_eq!(sent, received);
    held_chunks_are_the_files(&cluster, 1, &model.path);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_corrupts_chunks_is_dropped_and_the_chunks_come_from_another() {
    let model = TestModel::tiny(4, 22);
    let reference = model.reference(PROMPT, 12, SamplingParams::greedy(), Weights::Stored);
    let mut cluster = TestCluster::empty(Options::default());
    cluster
        .add_node_with(model.path.clone(), GIB, with_store(256))
        .await;
    cluster
        .add_node_with(model.path.clone(), GIB, |config| {
            with_store(256)(config);
            config.corrupt_chunks = true;
        })
        .await;
    cluster.wait_ready().await;
    cluster
        .add_node_with(PathBuf::from(model.id()), GIB, with_store(256))
        .await;
    cluster.wait_ready().await;
    answers_like(&cluster, &[0, 2], &reference).await;
    held_chunks_are_the_files(&cluster, 2, &model.path);
    let (_, held, manifest) = cluster.node(2).store_entry().unwrap();
    assert_eq!(held, shard_chunks(&cluster, 2, &manifest));
    // The corrupting peer sent something (and was caught), the honest one the rest.
    let (corrupt_sent, _) = cluster.node(1).chunk_traffic();
    let (honest_sent, _) = cluster.node(0).chunk_traffic();
    assert!(corrupt_sent > 0, "the corrupting peer was never asked");
    assert_eq!(honest_sent, manifest.bytes_of(&held));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_cut_short_resumes_with_only_the_missing_chunks() {
    let model = TestModel::tiny(4, 23);
    let reference = model.reference(PROMPT, 12, SamplingParams::greedy(), Weights::Stored);
    // The source sends slowly (4 KiB/s), so the fetch is still running when the node stops.
    let slow = |config: &mut ClusterConfig| config.upload_limit = Some(4 << 10);
    let mut cluster = holder_and_fetcher(&model.path, &model.id(), 256, slow, |_| {}).await;
    // Wait until some chunks are durable (made so every 2 s), then stop the node mid-fetch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let store_root = cluster.nodes[1].home().join("store");
    let held_on_disk = || {
        Store::open(&store_root, None)
            .unwrap()
            .find(&model.id())
            .unwrap()
            .map_or(0, |e| e.held().len())
    };
    let header = cluster.node(1).store_entry().unwrap().2.header().len();
    while held_on_disk() <= header + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fetch made no progress"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, received_before) = cluster.node(1).chunk_traffic();
    let home = cluster.stop_node_keeping_home(1).await;
    let kept = Store::open(&home.path().join("store"), None)
        .unwrap()
        .find(&model.id())
        .unwrap()
        .unwrap()
        .held();
    // Start it again where it ran, with the source at full speed.
    cluster.stop_node(0).await;
    cluster
        .add_node_with(model.path.clone(), GIB, with_store(256))
        .await;
    cluster
        .add_node_in(home, PathBuf::from(model.id()), GIB, with_store(256))
        .await;
    cluster.wait_ready().await;
    assert_eq!(ids_from(&cluster, 1, PROMPT).await, reference);
    let (_, held, manifest) = cluster.node(1).store_entry().unwrap();
    let wanted = shard_chunks(&cluster, 1, &manifest);
    let (_, received_after) = cluster.node(1).chunk_traffic();
    // It fetched what it lacked of its shard, and nothing it kept.
    let lacking = wanted.difference(&kept);
    assert_eq!(received_after, manifest.bytes_of(&lacking));
    assert!(received_after < manifest.bytes_of(&wanted));
    assert!(received_before > 0);
    assert!(wanted.iter().all(|i| held.contains(i)));
    held_chunks_are_the_files(&cluster, 1, &model.path);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_plan_that_moves_layers_fetches_only_the_new_ones() {
    let model = TestModel::tiny(6, 24);
    let reference = model.reference(PROMPT, 12, SamplingParams::greedy(), Weights::Stored);
    let mut cluster = holder_and_fetcher(&model.path, &model.id(), 256, |_| {}, |_| {}).await;
    cluster.wait_ready().await;
    let (_, before, manifest) = cluster.node(1).store_entry().unwrap();
    let (_, received_before) = cluster.node(1).chunk_traffic();
    // A third node joins: the layers are split three ways and node 1's move.
    cluster
        .add_node_with(model.path.clone(), GIB, with_store(256))
        .await;
    cluster.wait_ready().await;
    assert_eq!(ids_from(&cluster, 1, PROMPT).await, reference);
    let wanted = shard_chunks(&cluster, 1, &manifest);
    let new = wanted.difference(&before);
    // (Which layers node 1 gets depends on the ring's order, so `new` may be empty: then it
    // fetched nothing.)
    let (_, received_after) = cluster.node(1).chunk_traffic();
    assert_eq!(received_after - received_before, manifest.bytes_of(&new));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hugging_face_folder_travels_file_by_file_and_the_cluster_answers_like_one_process() {
    let model = TestModel::tiny(4, 25);
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny-hf");
    let checkpoint = exo_model::Checkpoint::open(&model.path).unwrap();
    exo_model::export_hf(&checkpoint, &folder, exo_model::ExportDtype::F32).unwrap();
    let device = exo_shard::BackendKind::Flex.device().unwrap();
    let engine = exo_shard::Engine::load(&folder, &device, Weights::Stored).unwrap();
    let options = exo_shard::TextOptions {
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        ignore_eos: true,
    };
    let reference = engine
        .generate_text(PROMPT, &options, &mut |_| {})
        .unwrap()
        .ids;
    let cluster = holder_and_fetcher(&folder, "tiny-hf", 512, |_| {}, |_| {}).await;
    cluster.wait_ready().await;
    answers_like(&cluster, &[0, 1], &reference).await;
    let (_, held, manifest) = cluster.node(1).store_entry().unwrap();
    assert!(manifest.folder);
    assert_eq!(held, shard_chunks(&cluster, 1, &manifest));
    let (_, received) = cluster.node(1).chunk_traffic();
    assert_eq!(received, manifest.bytes_of(&held));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_at_its_limit_gives_back_layers_of_an_earlier_plan() {
    let model = TestModel::tiny(6, 26);
    let reference = model.reference(PROMPT, 12, SamplingParams::greedy(), Weights::Stored);
    let bytes = std::fs::metadata(&model.path).unwrap().len();
    // Room for a little more than half the model: once the plan moves node 1's layers, the new
    // ones fit only if the old ones go.
    let limit = bytes * 6 / 10;
    let limited = move |config: &mut ClusterConfig| {
        let root = config.topology.home.join("store");
        config.store = Some(
            Store::open(&root, Some(limit))
                .unwrap()
                .with_chunk_bytes(256),
        );
    };
    let mut cluster = holder_and_fetcher(&model.path, &model.id(), 256, |_| {}, limited).await;
    let source = 0;
    cluster.wait_ready().await;
    // The holder leaves and two new holders join: a new three-way plan. (Where node 1's new
    // layers fall depends on the ring's order: when they are not among its old ones, they fit
    // only once the old ones are given back; the store's own test covers that every time.)
    cluster.stop_node(source).await;
    cluster
        .add_node_with(model.path.clone(), GIB, with_store(256))
        .await;
    cluster
        .add_node_with(model.path.clone(), GIB, with_store(256))
        .await;
    cluster.wait_ready().await;
    assert_eq!(ids_from(&cluster, 0, PROMPT).await, reference);
    let (_, held, manifest) = cluster.node(0).store_entry().unwrap();
    assert!(
        manifest.bytes_of(&held) <= limit,
        "{} held",
        manifest.bytes_of(&held)
    );
    let wanted = shard_chunks(&cluster, 0, &manifest);
    assert!(wanted.iter().all(|i| held.contains(i)));
    cluster.shutdown().await;
}
