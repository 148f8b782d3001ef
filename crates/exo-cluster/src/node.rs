//! Starting a node: bind the shard service, join the cluster, then keep a plan in step with
//! membership and hold this node's part of it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use exo_model::Checkpoint;
use exo_partition::ModelProfile;
use exo_shard::{Device, Weights};
use exo_topology::{ModelFile, Topology, TopologyConfig};
use exo_transport::{Assignment, Credential, GenerateCall, GenerateEvent, Limits, WireDtype};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::planning::{ActivePlan, model_profile, plan_cluster};
use crate::runtime::{Handler, Runtime};

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
    /// Tokens of KV cache the plan reserves per request (capped by the model's context).
    pub plan_context: usize,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: usize,
    /// How long membership must be quiet before the node plans again.
    pub settle: Duration,
    /// Frame size limits.
    pub limits: Limits,
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
            default_max_tokens: 256,
            settle: Duration::from_millis(500),
            limits: Limits::default(),
        }
    }
}

/// Whether the cluster can serve the model now.
#[derive(Clone, Debug)]
pub enum PlanState {
    /// Not yet, and why (`not enough memory across nodes: ...`).
    Waiting(String),
    /// Serving by this plan.
    Ready(Arc<ActivePlan>),
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    runtime: Arc<Runtime>,
    topology: Topology,
    endpoint: String,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Node {
    /// Loads the tokenizer, binds the shard service, joins the cluster and starts planning.
    /// Layers are loaded once a plan gives this node some.
    pub async fn start(config: ClusterConfig) -> Result<Node> {
        let path = config.model.clone();
        let (checkpoint_info, profile) = {
            let (weights, wire) = (config.weights, config.wire);
            tokio::task::spawn_blocking(move || -> Result<_> {
                let checkpoint = Checkpoint::open(&path)?;
                let tokenizer = checkpoint.tokenizer()?;
                let template = checkpoint.chat_template()?;
                let profile = model_profile(&checkpoint, weights, wire);
                Ok((
                    (
                        checkpoint.name(),
                        checkpoint.config().clone(),
                        tokenizer,
                        template,
                    ),
                    profile,
                ))
            })
            .await
            .map_err(|e| Error::Config(format!("loading the model's metadata: {e}")))??
        };
        let (name, model_config, tokenizer, template) = checkpoint_info;
        let model_file = ModelFile {
            name: name.clone(),
            bytes: model_bytes(&config.model),
            sha256: None,
        };

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

        let mut topology_config = config.topology.clone();
        topology_config.grpc_endpoint = Some(endpoint.clone());
        topology_config.models = vec![model_file.clone()];
        let topology = Topology::start(topology_config).await?;
        let node_id = topology.local_id().as_str().to_owned();

        let (plan_tx, _) = watch::channel(PlanState::Waiting("planning has not run yet".into()));
        let (held_epoch, _) = watch::channel(0);
        let runtime = Arc::new(Runtime {
            node_id,
            model_name: name,
            model_path: config.model.clone(),
            config: model_config,
            tokenizer,
            template,
            device: config.device.clone(),
            weights: config.weights,
            wire: config.wire,
            default_max_tokens: config.default_max_tokens,
            prefill_chunk: 512,
            held: RwLock::new(None),
            held_epoch,
            loading: tokio::sync::Mutex::new(()),
            plan: plan_tx,
            clients: crate::clients::ClientPool::new(
                Credential::new(topology.derive_secret(Credential::PURPOSE)),
                config.limits,
            ),
            sent: Arc::default(),
            active: Arc::new(AtomicU32::new(0)),
            assigned_epoch: std::sync::atomic::AtomicU64::new(0),
        });

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let handler: Arc<dyn exo_transport::ShardHandler> =
                Arc::new(Handler(Arc::clone(&runtime)));
            let (credential, limits) = (runtime.clients.credential().clone(), config.limits);
            async move {
                let shutdown = async move {
                    let _ = stopped.await;
                };
                if let Err(e) =
                    exo_transport::serve(listener, handler, credential, limits, shutdown).await
                {
                    tracing::error!(error = %e, "shard service stopped");
                }
            }
        });
        let planner = tokio::spawn(plan_loop(
            Arc::clone(&runtime),
            topology.clone(),
            model_file,
            profile,
            config
                .plan_context
                .min(runtime.config.max_position_embeddings) as u64,
            config.settle,
        ));
        tracing::info!(%endpoint, node = %runtime.node_id, model = %runtime.model_name, "shard service listening");
        Ok(Node {
            runtime,
            topology,
            endpoint,
            stop: Mutex::new(Some(stop)),
            tasks: Mutex::new(vec![server, planner]),
        })
    }

    /// Where this node's shard service listens.
    pub fn grpc_endpoint(&self) -> &str {
        &self.endpoint
    }

    /// This node's identity.
    pub fn node_id(&self) -> &str {
        &self.runtime.node_id
    }

    /// The model this node serves (its file or folder name).
    pub fn model_name(&self) -> &str {
        &self.runtime.model_name
    }

    /// The model's context length.
    pub fn context_length(&self) -> usize {
        self.runtime.config.max_position_embeddings
    }

    /// Whether `model` names the model this node serves (with or without `.gguf`).
    pub fn serves_model(&self, model: &str) -> bool {
        self.runtime.model_matches(model)
    }

    /// Tokens `prompt` takes once templated.
    pub fn count_prompt_tokens(
        &self,
        prompt: &exo_transport::Prompt,
    ) -> exo_transport::Result<usize> {
        self.runtime.prompt_ids(prompt).map(|ids| ids.len())
    }

    /// The membership client.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The current plan, or why there is none.
    pub fn plan_state(&self) -> PlanState {
        self.runtime.plan.borrow().clone()
    }

    /// Changes of [`Node::plan_state`].
    pub fn plan_changes(&self) -> watch::Receiver<PlanState> {
        self.runtime.plan.subscribe()
    }

    /// Generates with this node as the origin. Dropping the receiver cancels the request.
    pub async fn generate(
        &self,
        call: GenerateCall,
    ) -> exo_transport::Result<mpsc::Receiver<exo_transport::Result<GenerateEvent>>> {
        crate::origin::start(Arc::clone(&self.runtime), call).await
    }

    /// Stops serving and leaves the cluster (the others see it go at once).
    pub async fn shutdown(&self) -> Result<()> {
        if let Some(stop) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        let mut tasks = tasks.into_iter();
        let server = tasks.next();
        tasks.for_each(|t| t.abort());
        if let Some(server) = server {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        self.topology.clone().shutdown().await?;
        Ok(())
    }
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

/// Plans again whenever membership changes (after it has been quiet for `settle`), publishes
/// the plan and holds this node's part of it.
async fn plan_loop(
    runtime: Arc<Runtime>,
    topology: Topology,
    model: ModelFile,
    profile: ModelProfile,
    context: u64,
    settle: Duration,
) {
    let mut events = match topology.events().await {
        Ok(events) => events,
        Err(e) => {
            tracing::error!(error = %e, "cannot follow membership; the plan will not change");
            return;
        }
    };
    let mut last_epoch = 0u64;
    let mut last_reason = String::new();
    loop {
        // Let a burst of joins settle before planning.
        tokio::time::sleep(settle).await;
        let snapshot = match topology.snapshot().await {
            Ok(s) => s,
            Err(_) => return,
        };
        match plan_cluster(&snapshot, &model, &profile, context) {
            Ok(plan) if plan.epoch == last_epoch => {}
            Ok(plan) => {
                last_epoch = plan.epoch;
                last_reason.clear();
                log_plan(&runtime.node_id, &plan);
                let plan = Arc::new(plan);
                runtime
                    .plan
                    .send_replace(PlanState::Ready(Arc::clone(&plan)));
                if plan.index_of(&runtime.node_id).is_some() {
                    let assignment = Assignment {
                        model: plan.model.clone(),
                        epoch: plan.epoch,
                        stages: plan.stages.clone(),
                    };
                    let runtime = Arc::clone(&runtime);
                    tokio::spawn(async move {
                        if let Err(e) = runtime.hold(&assignment).await {
                            tracing::error!(error = %e, "cannot load this node's layers");
                        }
                    });
                } else {
                    runtime.release().await;
                }
            }
            Err(reason) => {
                if reason != last_reason {
                    tracing::warn!(%reason, "the cluster cannot serve the model yet");
                    last_reason.clone_from(&reason);
                }
                last_epoch = 0;
                runtime.plan.send_replace(PlanState::Waiting(reason));
            }
        }
        // Wait for the next change of membership.
        if events.next().await.is_none() {
            return;
        }
    }
}

fn log_plan(me: &str, plan: &ActivePlan) {
    let Some(index) = plan.index_of(me) else {
        tracing::info!(
            epoch = plan.epoch,
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
            |s| s.node_id.clone(),
        );
    let after = plan.stages.get(index + 1).map_or_else(
        || "none (samples the token)".to_owned(),
        |s| s.node_id.clone(),
    );
    tracing::info!(
        epoch = plan.epoch,
        stage = index,
        stages = plan.stages.len(),
        layers = ?stage.layers,
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
