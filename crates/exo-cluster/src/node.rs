//! Starting a node: bind the shard service, join the cluster, then keep a plan in step with
//! membership, hold this node's part of it, and keep a route to it warm (which is what makes
//! the node ready).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exo_api::Readiness;
use exo_core::{GenerationError, GenerationRequest, NodeId};
use exo_model::Checkpoint;
use exo_partition::{ModelProfile, Strategy};
use exo_shard::{Device, Weights};
use exo_store::{Entry, Store};
use exo_topology::{ModelFile, Topology, TopologyConfig};
use exo_transport::{Assignment, Credential, Limits, NodeStatus, SentCounters, WireDtype};
use futures::StreamExt;
use tokio::sync::watch;

use crate::clients::ClientPool;
use crate::error::{Error, Result};
use crate::fetch::{ModelStore, announced_chunks, from_peers, locate};
use crate::grammar::ModelGrammars;
use crate::origin::request::ResumePolicy;
use crate::origin::{OriginModel, Origins, model_id};
use crate::plan::{ActivePlan, PlanState, model_profile, plan_cluster};
use crate::service::Service;
use crate::stage::link::LinkSettings;
use crate::stage::{ModelSource, StageStats, Stages};
use crate::tasks::Tasks;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The model file (`.gguf`) or Hugging Face folder this node serves.
    pub model: PathBuf,
    /// Membership settings (home folder, cluster key, peers, mDNS, memory limit). Its
    /// `grpc_endpoint` and `models` are filled in by [`Node::start`].
    pub topology: TopologyConfig,
    /// Where the shard service listens (`0.0.0.0:52417`; tests use `127.0.0.1:0`).
    pub grpc_listen: SocketAddr,
    /// The device that runs this node's layers.
    pub device: Device,
    /// How weights are held.
    pub weights: Weights,
    /// How activations travel to the next stage.
    pub wire: WireDtype,
    /// Tokens of KV cache the plan reserves per request (capped by the model's context), and
    /// so the most tokens (prompt plus completion) one request may use.
    pub plan_context: usize,
    /// Tokens generated when a request does not say; `None`, the default: as many as fit the
    /// context (as OpenAI's API and llama-server do), so an answer ends at its end-of-sequence
    /// token, a stop string, or a full context.
    pub default_max_tokens: Option<usize>,
    /// Largest prompt chunk sent to the first stage in one frame.
    pub prefill_chunk: usize,
    /// Most prompt rows a stage computes in one step beside the decode tokens of the running
    /// requests: bounds how long a prompt arriving stalls the streams that are decoding.
    pub step_rows: usize,
    /// How long membership must be quiet before the node plans again.
    pub settle: Duration,
    /// Frame size limits.
    pub limits: Limits,
    /// How the planner places layers (every node of a cluster must use the same).
    pub strategy: Strategy,
    /// The least time a request waits for its next token before it counts its route as
    /// stalled and finds the stage that does not answer (the bound grows with the measured
    /// time between tokens: 20 times it).
    pub stall_timeout: Duration,
    /// How long a request whose stage was lost waits for a plan without it, to replay its
    /// tokens there and go on; past that its stream ends with an error naming why.
    pub resume_within: Duration,
    /// The model store (`$EXO_HOME/store`): where a model fetched from peers is kept, and what
    /// lets this node send its model's chunks to peers that lack them. With a store, `model`
    /// may be a name (the file name, with or without `.gguf`) that is no path here: the store's
    /// copy, or else a peer's. `None`: neither.
    pub store: Option<Store>,
    /// The most bytes per second this node sends to peers fetching chunks (`None`: no cap).
    pub upload_limit: Option<u64>,
    /// Test hook: flip a byte of every chunk this node sends (a peer that corrupts data).
    #[doc(hidden)]
    pub corrupt_chunks: bool,
}

impl ClusterConfig {
    /// Defaults for serving `model` with membership `topology`.
    pub fn new(model: PathBuf, topology: TopologyConfig, device: Device) -> Self {
        ClusterConfig {
            model,
            topology,
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 52417)),
            device,
            weights: Weights::Stored,
            wire: WireDtype::F16,
            plan_context: 2048,
            default_max_tokens: None,
            prefill_chunk: 512,
            step_rows: 64,
            settle: Duration::from_millis(500),
            limits: Limits::default(),
            strategy: Strategy::CostOptimal,
            stall_timeout: Duration::from_secs(10),
            resume_within: Duration::from_secs(20),
            store: None,
            upload_limit: None,
            corrupt_chunks: false,
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    topology: Topology,
    endpoint: String,
    /// The address the shard service is bound to (`endpoint` names it).
    grpc_addr: SocketAddr,
    stages: Arc<Stages>,
    origins: Arc<Origins>,
    plan: watch::Receiver<PlanState>,
    ready: watch::Receiver<Readiness>,
    tasks: Tasks,
    stopped: Mutex<bool>,
}

impl Node {
    /// Loads the tokenizer, binds the shard service, joins the cluster and starts planning.
    /// Layers are loaded once a plan gives this node some. A model named but not at hand (no
    /// such file, nothing in the store) is learned from a peer that announces it: the node
    /// waits for one, takes its manifest and the file's header, and fetches its layers once a
    /// plan gives it some.
    pub async fn start(config: ClusterConfig) -> Result<Node> {
        let listener = tokio::net::TcpListener::bind(config.grpc_listen)
            .await
            .map_err(|source| Error::Listen {
                address: config.grpc_listen.to_string(),
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| Error::Listen {
            address: config.grpc_listen.to_string(),
            source,
        })?;
        let endpoint = format!("http://{bound}");

        let (path, store) = (config.model.clone(), config.store.clone());
        let located = tokio::task::spawn_blocking(move || locate(&path, store.as_ref()))
            .await
            .map_err(|e| Error::Config(format!("looking for the model: {e}")))??;
        let (weights, wire) = (config.weights, config.wire);
        let mut topology_config = config.topology.clone();
        topology_config.grpc_endpoint = Some(endpoint.clone());
        // A model at hand is announced from the start; one learned from a peer once known.
        let at_hand = match &located {
            Some(found) => {
                let meta = read_model(found.path.clone(), weights, wire).await?;
                let file = model_file(&meta, found.entry.as_ref());
                topology_config.models = vec![file.clone()];
                Some((meta, file))
            }
            None => {
                topology_config.models = Vec::new();
                None
            }
        };
        let topology = Topology::start(topology_config).await?;
        let id = NodeId::from(topology.local_id().as_str());
        let credential = Credential::new(topology.derive_secret(Credential::PURPOSE));
        let clients = Arc::new(ClientPool::new(credential.clone(), config.limits));
        let store_of = |entry: Entry, store: exo_store::Store| {
            Arc::new(ModelStore::new(
                Arc::new(entry),
                store,
                id.clone(),
                topology.clone(),
                Arc::clone(&clients),
                config.upload_limit,
                config.corrupt_chunks,
            ))
        };
        let (model_path, model_store, meta, model_file) = match (located, at_hand) {
            (Some(found), Some((meta, file))) => {
                let model_store = found
                    .entry
                    .zip(config.store.clone())
                    .map(|(entry, store)| store_of(entry, store));
                (found.path, model_store, meta, file)
            }
            _ => {
                let Some(store) = config.store.clone() else {
                    return Err(Error::Config(format!(
                        "{}: no such model file",
                        config.model.display()
                    )));
                };
                let name = config.model.to_string_lossy().into_owned();
                let entry = from_peers(&topology, &clients, &store, &name).await?;
                let model_store = store_of(entry, store);
                model_store
                    .ensure_chunks(&model_store.entry.manifest().header(), "the file's header")
                    .await
                    .map_err(|e| Error::Config(format!("fetching the header of {name}: {e}")))?;
                let path = model_store.entry.path().to_owned();
                let meta = read_model(path.clone(), weights, wire).await?;
                let file = model_file(&meta, Some(&model_store.entry));
                let announced = file.clone();
                topology
                    .update_profile(move |p| p.models = vec![announced])
                    .await?;
                (path, Some(model_store), meta, file)
            }
        };
        let ModelMeta {
            name,
            config: model_config,
            tokenizer,
            template,
            profile,
            ..
        } = meta;
        // What this node offers (its limit, cgroup and free memory), as the planner sees it.
        let offered = topology.snapshot().await?.local.memory;
        let memory_offered = offered.available_bytes.or(offered.total_bytes);

        let tasks = Tasks::default();
        let (plan_tx, plan) = watch::channel(PlanState::Waiting("planning has not run yet".into()));
        let (ready_tx, ready) =
            watch::channel(Readiness::NotReady("planning has not run yet".into()));
        let links = LinkSettings {
            clients,
            wire: config.wire,
            sent: Arc::new(SentCounters::default()),
        };
        // A request may use what the plan reserves keys and values for, no more: the planner
        // gives every stage room for `plan_context` positions, and stages admit requests only
        // while what they reserved fits the memory they offer.
        let context = model_config
            .max_position_embeddings
            .min(config.plan_context.max(1));
        let longest_token_bytes = tokenizer.longest_token_bytes();
        let eos = model_config.eos_token_ids.clone();
        let grammars = Arc::new(ModelGrammars::new(tokenizer.clone(), eos.clone()));
        let stages = Arc::new(Stages::new(
            id.clone(),
            ModelSource {
                path: model_path,
                name: name.clone(),
                config: model_config,
                device: config.device.clone(),
                weights: config.weights,
                step_rows: config.step_rows,
                memory_offered,
                grammars: Arc::clone(&grammars),
                store: model_store.clone(),
            },
            plan.clone(),
            links.clone(),
            tasks.clone(),
        ));
        let origins = Arc::new(Origins::new(
            id.clone(),
            Arc::new(OriginModel {
                name: name.clone(),
                tokenizer,
                template,
                eos,
                grammars,
                token_bytes: std::sync::OnceLock::new(),
                context,
                longest_token_bytes,
                default_max_tokens: config.default_max_tokens,
                prefill_chunk: config.prefill_chunk,
            }),
            Arc::clone(&stages),
            links,
            tasks.clone(),
            plan.clone(),
            ResumePolicy {
                stall_floor: config.stall_timeout,
                within: config.resume_within,
                ..ResumePolicy::default()
            },
        ));

        let chunk_count = model_store
            .as_ref()
            .map(|s| s.entry.manifest().chunk_count());
        let service = Arc::new(Service {
            stages: Arc::clone(&stages),
            origins: Arc::clone(&origins),
            store: model_store,
        });
        let (limits, stop) = (config.limits, tasks.clone());
        tasks.spawn_detached(async move {
            let graceful = {
                let stop = stop.clone();
                async move { stop.cancelled().await }
            };
            let serve = exo_transport::serve(listener, service, credential, limits, graceful);
            // Other nodes' streams into this one may stay open: after a moment's grace the
            // server is dropped, which closes them.
            let hard_stop = async move {
                stop.cancelled().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            };
            tokio::select! {
                served = serve => if let Err(e) = served {
                    tracing::error!(error = %e, "shard service stopped");
                },
                () = hard_stop => {}
            }
        });
        let planner = Planner {
            node: id.clone(),
            stages: Arc::clone(&stages),
            origins: Arc::clone(&origins),
            topology: topology.clone(),
            model: model_file,
            chunks: chunk_count,
            profile,
            context: context as u64,
            settle: config.settle,
            strategy: config.strategy,
            plan: plan_tx,
            ready: ready_tx,
            tasks: tasks.clone(),
        };
        tasks.spawn(planner.run());
        tracing::info!(%endpoint, node = %id, model = %name, "shard service listening");
        Ok(Node {
            id,
            topology,
            endpoint,
            grpc_addr: bound,
            stages,
            origins,
            plan,
            ready,
            tasks,
            stopped: Mutex::new(false),
        })
    }

    /// Where this node's shard service listens.
    pub fn grpc_endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The address the shard service is bound to: `grpc_listen` with the port taken when it
    /// asked for any (port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// This node's identity.
    pub fn node_id(&self) -> &NodeId {
        &self.id
    }

    /// The model this node serves (its file or folder name).
    pub fn model_name(&self) -> &str {
        &self.origins.model.name
    }

    /// The id clients use for the model (the file name without `.gguf`).
    pub fn model_id(&self) -> String {
        model_id(self.model_name())
    }

    /// The most bytes of text a prompt that fits the context can hold (every token standing
    /// for the longest entry of the vocabulary): a bound for request bodies.
    pub fn max_prompt_bytes(&self) -> usize {
        self.origins
            .model
            .context
            .saturating_mul(self.origins.model.longest_token_bytes)
    }

    /// How the model's chat template writes tool calls, when it takes tools.
    pub fn tool_syntax(&self) -> Option<exo_core::ToolSyntax> {
        self.origins
            .model
            .template
            .as_ref()
            .and_then(exo_model::ChatTemplate::tool_syntax)
    }

    /// The most tokens one request may use: the model's context length, or the plan's
    /// (`plan_context`) when that is smaller.
    pub fn context_length(&self) -> usize {
        self.origins.model.context
    }

    /// The membership client.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The current plan, or why there is none.
    pub fn plan_state(&self) -> PlanState {
        self.plan.borrow().clone()
    }

    /// Changes of [`Node::plan_state`].
    pub fn plan_changes(&self) -> watch::Receiver<PlanState> {
        self.plan.clone()
    }

    /// Whether this node can serve a request now: a plan exists, every stage of it holds its
    /// layers, and this node reaches them all.
    pub fn readiness(&self) -> Readiness {
        self.ready.borrow().clone()
    }

    /// Changes of [`Node::readiness`].
    pub fn readiness_changes(&self) -> watch::Receiver<Readiness> {
        self.ready.clone()
    }

    /// What this node holds, as its shard service reports it.
    pub fn status(&self) -> NodeStatus {
        self.stages.status()
    }

    /// Changes whenever this node starts or ends loading layers, or holds other ones.
    pub(crate) fn stage_changes(&self) -> watch::Receiver<u64> {
        self.stages.changes()
    }

    /// The connections to other nodes' shard services.
    pub(crate) fn clients(&self) -> &ClientPool {
        &self.origins.links.clients
    }

    /// Requests that came in at this node and were moved onto another plan (replayed there)
    /// after one of their stages was lost or stopped answering.
    pub fn resumed_requests(&self) -> u64 {
        self.origins
            .resumed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Chunk bytes of the model this node sent to peers and received from them (verified)
    /// since it started: `(sent, received)`; zeros without a store.
    pub fn chunk_traffic(&self) -> (u64, u64) {
        self.stages.store().map_or((0, 0), |s| {
            (
                s.traffic.sent.load(std::sync::atomic::Ordering::Relaxed),
                s.traffic
                    .received
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// The model in this node's store (`None` without one): its manifest hash and the chunks
    /// held now.
    pub fn store_entry(&self) -> Option<(String, exo_store::ChunkSet, exo_store::Manifest)> {
        self.stages.store().map(|s| {
            (
                s.entry.hash().to_owned(),
                s.entry.held(),
                s.entry.manifest().clone(),
            )
        })
    }

    /// What this node's stage workers have computed (steps, rows, batch sizes, busy time).
    pub fn stage_stats(&self) -> StageStats {
        self.stages.stats()
    }

    /// Generates with this node as the origin. Dropping the receiver cancels the request on
    /// every stage.
    pub async fn generate(
        &self,
        request: GenerationRequest,
    ) -> std::result::Result<exo_api::Generation, GenerationError> {
        self.origins.start(request).await
    }

    /// Stops serving and leaves the cluster (the others see it go at once). Requests in flight
    /// end; the shard service gets a moment to close its streams.
    pub async fn shutdown(&self) -> Result<()> {
        if let Ok(mut stopped) = self.stopped.lock() {
            if *stopped {
                return Ok(());
            }
            *stopped = true;
        }
        // Leaving drains: the stage workers stop first (the links into them close, so every
        // origin with a request here moves it onto another plan at once), and the node says
        // goodbye to membership, so the others plan without it; then its tasks end.
        self.stages.stop();
        let left = self.topology.clone().shutdown().await;
        self.tasks.shut_down(Duration::from_secs(5)).await;
        left?;
        Ok(())
    }
}

/// What a node reads of its model's file before it joins: names, configuration, tokenizer,
/// template, the planner's profile, and what it announces.
struct ModelMeta {
    name: String,
    config: exo_model::ModelConfig,
    tokenizer: exo_model::Tokenizer,
    template: Option<exo_model::ChatTemplate>,
    profile: ModelProfile,
    file: ModelFile,
}

/// Reads the metadata of the model at `path` (headers only) on a blocking thread.
async fn read_model(path: PathBuf, weights: Weights, wire: WireDtype) -> Result<ModelMeta> {
    tokio::task::spawn_blocking(move || -> Result<ModelMeta> {
        let checkpoint = Checkpoint::open(&path)?;
        let tokenizer = checkpoint.tokenizer()?;
        let template = checkpoint.chat_template_with(&tokenizer)?;
        let profile = model_profile(&checkpoint, weights, wire);
        let file = ModelFile {
            name: checkpoint.name(),
            bytes: model_bytes(&path),
            tool_syntax: template
                .as_ref()
                .and_then(exo_model::ChatTemplate::tool_syntax)
                .map(|s| s.name().to_owned()),
            ..ModelFile::default()
        };
        Ok(ModelMeta {
            name: checkpoint.name(),
            config: checkpoint.config().clone(),
            tokenizer,
            template,
            profile,
            file,
        })
    })
    .await
    .map_err(|e| Error::Config(format!("loading the model's metadata: {e}")))?
}

/// What this node announces of its model: the file, and the store's manifest and chunks when
/// it keeps one.
fn model_file(meta: &ModelMeta, entry: Option<&Entry>) -> ModelFile {
    let mut file = meta.file.clone();
    if let Some(entry) = entry {
        // What the store keeps of a folder (not, say, a README beside the weights): the same
        // length on every node that has the model.
        file.bytes = entry.manifest().bytes;
        file.manifest = Some(entry.hash().to_owned());
        file.chunks = announced_chunks(entry);
    }
    file
}

fn model_bytes(path: &std::path::Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

/// Keeps the plan in step with membership.
struct Planner {
    node: NodeId,
    stages: Arc<Stages>,
    origins: Arc<Origins>,
    topology: Topology,
    model: ModelFile,
    /// The model's chunk count, when this node keeps it in its store.
    chunks: Option<u32>,
    profile: ModelProfile,
    context: u64,
    settle: Duration,
    strategy: Strategy,
    plan: watch::Sender<PlanState>,
    ready: watch::Sender<Readiness>,
    tasks: Tasks,
}

impl Planner {
    /// Plans again whenever membership changes (after it has been quiet for `settle`),
    /// publishes the plan, holds this node's part of it and keeps a route to it warm.
    async fn run(self) {
        let mut events = match self.topology.events().await {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow membership; the plan will not change");
                return;
            }
        };
        let mut last_epoch = None;
        let mut last_reason = String::new();
        // Work that belongs to the current plan, cancelled when it changes.
        let mut current = self.tasks.child();
        loop {
            // Let a burst of joins settle before planning.
            tokio::time::sleep(self.settle).await;
            let Ok(snapshot) = self.topology.snapshot().await else {
                return;
            };
            match plan_cluster(
                &snapshot,
                &self.model,
                self.chunks,
                &self.profile,
                self.context,
                self.strategy,
            ) {
                Ok(plan) if Some(plan.epoch) == last_epoch => {}
                Ok(plan) => {
                    last_epoch = Some(plan.epoch);
                    last_reason.clear();
                    log_plan(&self.node, &plan);
                    let plan = Arc::new(plan);
                    self.plan.send_replace(PlanState::Ready(Arc::clone(&plan)));
                    current.cancel();
                    current = self.tasks.child();
                    self.follow(&current, plan);
                }
                Err(reason) => {
                    if reason != last_reason {
                        tracing::warn!(%reason, "the cluster cannot serve the model yet");
                        last_reason.clone_from(&reason);
                    }
                    last_epoch = None;
                    current.cancel();
                    self.plan.send_replace(PlanState::Waiting(reason.clone()));
                    self.ready.send_replace(Readiness::NotReady(reason));
                }
            }
            // Wait for the next change of membership.
            if events.next().await.is_none() {
                return;
            }
        }
    }

    /// Holds this node's part of `plan` and keeps the route to it warm, on `tasks`.
    fn follow(&self, tasks: &Tasks, plan: Arc<ActivePlan>) {
        let stages = Arc::clone(&self.stages);
        let (origins, ready) = (Arc::clone(&self.origins), self.ready.clone());
        let in_plan = plan.index_of(&self.node).is_some();
        let assignment = Assignment {
            model: plan.model.clone(),
            epoch: plan.epoch,
            stages: plan.stages.clone(),
        };
        tasks.spawn(async move {
            if in_plan {
                if let Err(e) = stages.hold(&assignment).await {
                    tracing::error!(error = %e, "cannot load this node's layers");
                }
            } else {
                stages.release().await;
            }
            keep_ready(&origins, &plan, &ready).await;
        });
    }
}

/// Builds the route to `plan` until it works, says the node is ready, and starts again when
/// the route breaks (a stage was lost), until the plan changes.
async fn keep_ready(origins: &Origins, plan: &Arc<ActivePlan>, ready: &watch::Sender<Readiness>) {
    loop {
        ready.send_replace(Readiness::NotReady(format!(
            "plan {}: waiting for its {} stage(s) to hold their layers",
            plan.epoch,
            plan.stages.len()
        )));
        match origins.route(plan).await {
            Ok(route) => {
                ready.send_replace(Readiness::Ready);
                tracing::info!(
                    epoch = %plan.epoch,
                    stages = plan.stages.len(),
                    model = %model_id(&plan.model),
                    "ready: the cluster serves the model"
                );
                let failure = route.until_broken().await;
                ready.send_replace(Readiness::NotReady(failure.to_string()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "the plan's route is not up yet");
                ready.send_replace(Readiness::NotReady(e.to_string()));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn log_plan(me: &NodeId, plan: &ActivePlan) {
    let Some(index) = plan.index_of(me) else {
        tracing::info!(
            epoch = %plan.epoch,
            stages = plan.stages.len(),
            "joined plan without layers (this node is left out)"
        );
        for line in &plan.plan.explanation {
            tracing::info!("plan: {line}");
        }
        return;
    };
    let stage = &plan.stages[index];
    let before = index
        .checked_sub(1)
        .and_then(|i| plan.stages.get(i))
        .map_or_else(
            || "the origin of each request".to_owned(),
            |s| s.node.to_string(),
        );
    let after = plan.stages.get(index + 1).map_or_else(
        || "none (samples the token and sends it to the origin)".to_owned(),
        |s| s.node.to_string(),
    );
    tracing::info!(
        epoch = %plan.epoch,
        stage = index,
        stages = plan.stages.len(),
        layers = %stage.layers,
        %before,
        %after,
        predicted_tokens_per_s = plan.plan.predicted.decode_tokens_per_s,
        "joined plan"
    );
    for line in &plan.plan.explanation {
        tracing::info!("plan: {line}");
    }
}

/// Runs a node until `shutdown` resolves, then leaves the cluster.
pub async fn run(config: ClusterConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let node = Node::start(config).await?;
    shutdown.await;
    node.shutdown().await
}

/// Ctrl-C, or SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
