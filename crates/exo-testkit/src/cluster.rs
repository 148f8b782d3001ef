//! N real nodes in one test process on a tiny random model.
//!
//! Each node is an `exo_cluster::Node`: membership over libp2p's memory transport (no sockets,
//! no mDNS), its shard service on loopback, and the real stage workers and origin. Plans are
//! chosen with the planner's memory-weighted strategy, so the memory each node offers decides
//! the split: equal shares split the layers equally, and a node offering more takes more.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use exo_cluster::{ActivePlan, ClusterConfig, Node, PlanState, Strategy};
use exo_core::{
    Finished, GenerationError, GenerationEvent, GenerationRequest, Prompt, SamplingParams,
};
use exo_model::{ModelConfig, testing};
use exo_shard::{BackendKind, Engine, TextOptions, Weights};
use exo_topology::{ClusterKey, Multiaddr, TopologyConfig};
use exo_transport::WireDtype;

/// A tiny random Llama written as a GGUF file (f32 tensors, a byte-level tokenizer of
/// printable characters), kept in a temporary folder for as long as this lives.
#[derive(Debug)]
pub struct TestModel {
    _dir: tempfile::TempDir,
    /// The file.
    pub path: PathBuf,
    /// Its configuration.
    pub config: ModelConfig,
}

impl TestModel {
    /// A model of `layers` layers from `seed`.
    pub fn tiny(layers: usize, seed: u64) -> TestModel {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("tiny-{layers}.gguf"));
        let config = testing::tiny_config(layers);
        testing::write_gguf(&path, &config, seed).unwrap();
        TestModel {
            _dir: dir,
            path,
            config,
        }
    }

    /// The model's name as the cluster serves it.
    pub fn id(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// What one process running every layer generates for `prompt` (raw text, greedy unless
    /// `sampling` says otherwise, end-of-sequence ignored): the reference a cluster must match.
    pub fn reference(
        &self,
        prompt: &str,
        max_tokens: usize,
        sampling: SamplingParams,
        weights: Weights,
    ) -> Vec<u32> {
        let engine = self.engine(weights);
        let options = TextOptions {
            max_tokens,
            sampling,
            stop: Vec::new(),
            ignore_eos: true,
        };
        engine
            .generate_text(prompt, &options, &mut |_| {})
            .unwrap()
            .ids
    }
}

impl TestModel {
    /// The whole model in one process, on the CPU, holding weights as `weights` says.
    fn engine(&self, weights: Weights) -> Engine {
        let device = BackendKind::Flex.device().unwrap();
        Engine::load(&self.path, &device, weights).unwrap()
    }

    /// The embedding one process computes for `text` (taken as is, as the cluster takes an
    /// embedding request's text).
    pub fn reference_embedding(&self, text: &str) -> Vec<f32> {
        let engine = self.engine(Weights::Stored);
        let ids = engine.tokenizer().encode_plain(text).unwrap();
        engine.embed_ids(&ids).unwrap()
    }

    /// The log-probability one process gives each token of `text` after the first, under
    /// the tokens before it.
    pub fn reference_prompt_logprobs(&self, text: &str) -> Vec<f32> {
        let engine = self.engine(Weights::Stored);
        let ids = engine.tokenizer().encode_plain(text).unwrap();
        let shard = engine.shard();
        let mut x = Vec::new();
        shard.embed_into(&ids, &mut x).unwrap();
        let mut cache = shard.new_cache();
        shard.forward_in_place(&mut x, &mut cache).unwrap();
        let mut logits = Vec::new();
        shard.logits_rows(&x, &mut cache, &mut logits).unwrap();
        let vocab = logits.len() / ids.len();
        logits
            .chunks_exact(vocab)
            .zip(&ids[1..])
            .map(|(row, &next)| {
                let (lse, _) = exo_shard::log_probabilities(row, 0);
                row[next as usize] - lse
            })
            .collect()
    }
}

/// How the nodes of a [`TestCluster`] run.
#[derive(Clone, Debug)]
pub struct Options {
    /// How weights are held (the CPU kernels by default).
    pub weights: Weights,
    /// How activations travel (f32 by default, so that any split gives exactly the same
    /// answer as one process).
    pub wire: WireDtype,
    /// Largest prompt chunk the origin sends in one frame.
    pub prefill_chunk: usize,
    /// Most prompt rows a stage computes in one step.
    pub step_rows: usize,
    /// How the planner places layers (memory-weighted by default, so the memory each node
    /// offers decides the split).
    pub strategy: Strategy,
    /// How long a request whose stage was lost waits for a plan without it.
    pub resume_within: Duration,
    /// The least time without a token before a request counts its route as stalled.
    pub stall_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            weights: Weights::Stored,
            wire: WireDtype::F32,
            prefill_chunk: 512,
            step_rows: 64,
            strategy: Strategy::MemoryWeighted,
            resume_within: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// One node of a [`TestCluster`].
#[derive(Debug)]
pub struct TestNode {
    /// The node.
    pub node: Arc<Node>,
    /// Its membership address.
    pub address: Multiaddr,
    _home: tempfile::TempDir,
}

impl TestNode {
    /// The node's home folder.
    pub fn home(&self) -> &std::path::Path {
        self._home.path()
    }
}

/// Nodes in this process that found each other and agree on a plan.
#[derive(Debug)]
pub struct TestCluster {
    /// The nodes, in the order they were started.
    pub nodes: Vec<TestNode>,
    key: ClusterKey,
    options: Options,
}

fn memory_port() -> u64 {
    rand::random_range(1_000_000..u64::MAX / 2)
}

impl TestCluster {
    /// Starts one node per entry of `memory` (the bytes each offers) serving `model`, each
    /// dialling the ones before it, and waits until all of them are ready on one plan.
    pub async fn start(model: &TestModel, memory: &[u64]) -> TestCluster {
        Self::start_with(model, memory, Options::default()).await
    }

    /// A cluster of no nodes yet, for tests that add nodes one at a time
    /// ([`TestCluster::add_node`]).
    pub fn empty(options: Options) -> TestCluster {
        TestCluster {
            nodes: Vec::new(),
            key: ClusterKey::generate(),
            options,
        }
    }

    /// [`TestCluster::start`] with other options.
    pub async fn start_with(model: &TestModel, memory: &[u64], options: Options) -> TestCluster {
        let mut cluster = TestCluster::empty(options);
        for &bytes in memory {
            cluster.add_node(model, bytes).await;
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Starts one more node offering `memory` bytes; it dials every node already here.
    /// Returns its index. (Call [`TestCluster::wait_ready`] to wait for the new plan.)
    pub async fn add_node(&mut self, model: &TestModel, memory: u64) -> usize {
        self.add_node_with(model.path.clone(), memory, |_| {}).await
    }

    /// [`TestCluster::add_node`] for the model at `model` (a path, or with a store a model's
    /// name), with `configure` changing the node's configuration last (its home folder is
    /// `config.topology.home`).
    pub async fn add_node_with(
        &mut self,
        model: PathBuf,
        memory: u64,
        configure: impl FnOnce(&mut ClusterConfig),
    ) -> usize {
        let home = tempfile::tempdir().unwrap();
        self.add_node_in(home, model, memory, configure).await
    }

    /// [`TestCluster::add_node_with`] in the home folder `home` (a node started again where
    /// an earlier one ran).
    pub async fn add_node_in(
        &mut self,
        home: tempfile::TempDir,
        model: PathBuf,
        memory: u64,
        configure: impl FnOnce(&mut ClusterConfig),
    ) -> usize {
        let port = memory_port();
        let mut topology = TopologyConfig::in_memory(home.path(), port);
        topology.cluster_key = Some(self.key.clone());
        topology.memory_limit = Some(memory);
        topology.static_peers = self.nodes.iter().map(|n| n.address.clone()).collect();
        let device = BackendKind::Flex.device().unwrap();
        let mut config = ClusterConfig::new(model, topology, device);
        config.grpc_listen = "127.0.0.1:0".parse().unwrap();
        config.weights = self.options.weights;
        config.wire = self.options.wire;
        config.prefill_chunk = self.options.prefill_chunk;
        config.step_rows = self.options.step_rows;
        // The tiny models' whole context: tests ask for up to a few hundred positions.
        config.plan_context = 256;
        config.settle = Duration::from_millis(200);
        config.strategy = self.options.strategy;
        config.resume_within = self.options.resume_within;
        config.stall_timeout = self.options.stall_timeout;
        configure(&mut config);
        // A node that names a model it lacks waits for a peer that has it: bounded here.
        let node = tokio::time::timeout(Duration::from_secs(60), Node::start(config))
            .await
            .unwrap_or_else(|_| panic!("a test node did not start within 60 s"))
            .unwrap_or_else(|e| panic!("starting a test node: {e}"));
        self.nodes.push(TestNode {
            node: Arc::new(node),
            address: format!("/memory/{port}").parse().unwrap(),
            _home: home,
        });
        self.nodes.len() - 1
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Arc<Node> {
        &self.nodes[i].node
    }

    /// Waits (at most 60 s) until every node plans with the same epoch, every node of the
    /// cluster takes part in it, and every node is ready; returns the plan.
    pub async fn wait_ready(&self) -> Arc<ActivePlan> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let plans: Vec<Option<Arc<ActivePlan>>> = self
                .nodes
                .iter()
                .map(|n| match n.node.plan_state() {
                    PlanState::Ready(p) => Some(p),
                    PlanState::Waiting(_) => None,
                })
                .collect();
            let agreed = plans.first().cloned().flatten().filter(|p| {
                p.stages.len() == self.nodes.len()
                    && plans
                        .iter()
                        .all(|q| q.as_ref().is_some_and(|q| q.epoch == p.epoch))
            });
            let ready = self
                .nodes
                .iter()
                .all(|n| n.node.readiness() == exo_api::Readiness::Ready);
            if let Some(plan) = agreed
                && ready
            {
                return plan;
            }
            if tokio::time::Instant::now() > deadline {
                let states: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("{:?} / {:?}", n.node.plan_state(), n.node.readiness()))
                    .collect();
                panic!("no common ready plan within 60 s: {states:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most 10 s) until no node holds state for any request.
    pub async fn wait_idle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let active: Vec<u32> = self
                .nodes
                .iter()
                .map(|n| n.node.status().active_requests)
                .collect();
            if active.iter().all(|&a| a == 0) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "requests still held 10 s after they ended: {active:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `i` the way a clean exit does (it leaves the cluster); the others re-plan.
    pub async fn stop_node(&mut self, i: usize) {
        let node = self.nodes.remove(i);
        node.node.shutdown().await.unwrap();
    }

    /// Stops node `i` and gives back its home folder, to start a node there again.
    pub async fn stop_node_keeping_home(&mut self, i: usize) -> tempfile::TempDir {
        let node = self.nodes.remove(i);
        node.node.shutdown().await.unwrap();
        node._home
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.node.shutdown().await.unwrap();
        }
    }
}

/// A greedy request for raw text that ignores end-of-sequence, for parity checks.
pub fn raw_request(prompt: &str, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerationRequest::new(Prompt::Text(prompt.to_owned()))
    }
}

/// Reads a generation to its end: the text and the final event, or the failure.
pub async fn collect(
    mut events: exo_api::Generation,
) -> Result<(String, Finished), GenerationError> {
    let mut text = String::new();
    let within = Duration::from_secs(60);
    loop {
        let item = tokio::time::timeout(within, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {within:?}; text so far: {text:?}"));
        match item {
            Some(Ok(GenerationEvent::Text(t))) => text.push_str(&t),
            Some(Ok(
                GenerationEvent::Logprob(_)
                | GenerationEvent::Embedding(_)
                | GenerationEvent::PromptLogprobs(_),
            )) => {}
            Some(Ok(GenerationEvent::Finished(f))) => return Ok((text, f)),
            Some(Err(e)) => return Err(e),
            None => panic!("the generation ended without a final event; text: {text:?}"),
        }
    }
}

/// Reads an embedding request to its end: the vector (checked to come before the final
/// event, with no text), or the failure.
pub async fn collect_embedding(
    mut events: exo_api::Generation,
) -> Result<(Vec<f32>, Finished), GenerationError> {
    let within = Duration::from_secs(60);
    let mut embedding = None;
    loop {
        let item = tokio::time::timeout(within, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {within:?}"));
        match item {
            Some(Ok(GenerationEvent::Embedding(values))) => embedding = Some(values),
            Some(Ok(GenerationEvent::Finished(f))) => {
                let values = embedding.expect("the embedding came before the final event");
                return Ok((values, f));
            }
            Some(Ok(other)) => panic!("an embedding request gave {other:?}"),
            Some(Err(e)) => return Err(e),
            None => panic!("the embedding request ended without a final event"),
        }
    }
}
