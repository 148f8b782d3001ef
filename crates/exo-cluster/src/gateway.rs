//! A gateway: joins the cluster as an observer (it computes nothing and is never given
//! layers), serves the HTTP API, and forwards each request to a node that serves the model.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use exo_api::{ApiConfig, ClusterView, Generation, ModelCard, PlanView, Readiness, StageView};
use exo_core::{GenerationError, GenerationEvent, GenerationRequest, ToolSyntax};
use exo_topology::{NodeRole, Topology, TopologyConfig, TopologyEvent, TopologySnapshot};
use exo_transport::{Credential, GenerateStream, Limits, NodeStatus};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use crate::clients::ClientPool;
use crate::engine::now_s;
use crate::error::{Error, Result};
use crate::live::{self, LiveView, ViewSource};
use crate::origin::model_id;
use crate::plan::reachable;
use crate::views::{self, Reports, Tracker, ViewInput};

/// Everything a gateway needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Membership settings; the gateway joins as an observer whatever `role` says.
    pub topology: TopologyConfig,
    /// Where the HTTP API listens.
    pub api_listen: SocketAddr,
    /// The API's settings (key, CORS, queue).
    pub api: ApiConfig,
    /// Frame size limits for calls to nodes.
    pub limits: Limits,
}

/// Serves the API for the cluster's nodes, forwarding every request to one of them.
#[derive(Debug)]
pub struct GatewayEngine {
    views: Arc<GatewayViews>,
    live: Option<LiveView>,
    next: AtomicUsize,
    created: u64,
}

/// What the gateway knows of the cluster: membership, kept up to date by a background task,
/// and connections to the nodes.
#[derive(Debug)]
struct GatewayViews {
    topology: Topology,
    snapshot: Mutex<Option<TopologySnapshot>>,
    clients: ClientPool,
    tracker: Mutex<Tracker>,
}

/// A worker the gateway can send requests to.
struct Worker {
    id: String,
    endpoint: String,
    models: Vec<String>,
    /// The tool-call syntax of each model's template, by model id, where it takes tools.
    tool_syntax: Vec<(String, ToolSyntax)>,
}

impl GatewayEngine {
    /// An engine that forwards through `topology`'s cluster, keeping its view of the members
    /// up to date on a background task, and a live view of the cluster for the web page.
    pub async fn start(topology: Topology, limits: Limits) -> Result<Self> {
        let credential = Credential::new(topology.derive_secret(Credential::PURPOSE));
        let (first, mut events) = topology.subscribe().await?;
        let views = Arc::new(GatewayViews {
            topology: topology.clone(),
            snapshot: Mutex::new(Some(first)),
            clients: ClientPool::new(credential, limits),
            tracker: Mutex::default(),
        });
        let (watch, view) = (topology.clone(), Arc::clone(&views));
        tokio::spawn(async move {
            while events.next().await.is_some() {
                let Ok(now) = watch.snapshot().await else {
                    return;
                };
                view.keep(now);
            }
        });
        let wakes = Box::pin(async move {
            match topology.events().await {
                Ok(events) => live::membership(events),
                Err(e) => {
                    tracing::warn!(error = %e, "the live view will not follow membership");
                    futures::stream::empty().boxed()
                }
            }
        });
        let source: Arc<dyn ViewSource> = views.clone();
        Ok(GatewayEngine {
            live: live::start(source, wakes),
            views,
            next: AtomicUsize::new(0),
            created: now_s(),
        })
    }

    fn workers(&self) -> Vec<Worker> {
        let Some(snapshot) = self.views.snapshot() else {
            return Vec::new();
        };
        let mut workers: Vec<Worker> = snapshot
            .nodes
            .iter()
            .filter(|p| p.profile.role == NodeRole::Worker)
            .filter_map(|p| {
                Some(Worker {
                    id: p.profile.id.as_str().to_owned(),
                    endpoint: reachable(p.profile.grpc_endpoint.as_deref()?, &p.addresses),
                    models: p.profile.models.iter().map(|m| model_id(&m.name)).collect(),
                    tool_syntax: p
                        .profile
                        .models
                        .iter()
                        .filter_map(|m| {
                            let syntax = ToolSyntax::from_name(m.tool_syntax.as_deref()?)?;
                            Some((model_id(&m.name), syntax))
                        })
                        .collect(),
                })
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        workers
    }

    /// The membership client.
    pub fn topology(&self) -> &Topology {
        &self.views.topology
    }
}

impl GatewayViews {
    fn snapshot(&self) -> Option<TopologySnapshot> {
        self.snapshot.lock().ok().and_then(|s| s.clone())
    }

    fn keep(&self, snapshot: TopologySnapshot) {
        if let Ok(mut slot) = self.snapshot.lock() {
            *slot = Some(snapshot);
        }
    }

    /// The cluster as the nodes report it to the gateway: the plan is what they hold.
    async fn build(&self) -> ClusterView {
        let snapshot = match self.topology.snapshot().await {
            Ok(now) => {
                self.keep(now.clone());
                Some(now)
            }
            Err(_) => self.snapshot(),
        };
        let reports = match &snapshot {
            Some(snapshot) => views::reports(&self.clients, snapshot).await,
            None => Reports::new(),
        };
        let plan = plan_from(&reports);
        let workers = snapshot.as_ref().map_or(0, |s| {
            s.nodes
                .iter()
                .filter(|p| p.profile.role == NodeRole::Worker)
                .count()
        });
        let status = if plan.is_some() {
            "ready".to_owned()
        } else if workers == 0 {
            "waiting: no node has joined the cluster yet".to_owned()
        } else {
            "waiting: no node holds layers yet".to_owned()
        };
        let input = ViewInput {
            snapshot: snapshot.as_ref(),
            reports: &reports,
            ready: plan.is_some(),
            plan,
            epoch: None,
            status,
        };
        match self.tracker.lock() {
            Ok(mut tracker) => tracker.view(input, Instant::now()),
            Err(poisoned) => poisoned.into_inner().view(input, Instant::now()),
        }
    }
}

impl ViewSource for GatewayViews {
    fn view(&self) -> BoxFuture<'_, ClusterView> {
        Box::pin(self.build())
    }

    fn observe(&self, event: &TopologyEvent) {
        if let Ok(mut tracker) = self.tracker.lock() {
            tracker.observe(event, Instant::now());
        }
    }
}

/// The plan in force as the nodes report what they hold (the gateway does not plan).
fn plan_from(reports: &Reports) -> Option<PlanView> {
    let mut stages = Vec::new();
    let mut epoch = None;
    let mut model = String::new();
    let mut held: Vec<&NodeStatus> = reports.values().filter(|r| r.ready).collect();
    held.sort_by_key(|r| r.layers.start);
    for status in held {
        epoch = status.epoch;
        model = model_id(&status.model);
        stages.push(StageView {
            node: status.node_id.clone(),
            layers_start: status.layers.start,
            layers_end: status.layers.end,
            embeds: status.layers.start == 0,
            has_head: false,
            ..StageView::default()
        });
    }
    if let Some(last) = stages.last_mut() {
        last.has_head = true;
    }
    (!stages.is_empty()).then(|| PlanView {
        epoch: epoch
            .map(|e: exo_core::Epoch| e.to_string())
            .unwrap_or_default(),
        model,
        stages,
        predicted_decode_tokens_per_s: None,
        predicted_time_to_first_token_ms: None,
        explanation: vec!["as reported by the nodes to this gateway".to_owned()],
    })
}

/// Every model some worker serves, sorted, once each.
fn model_ids(workers: &[Worker]) -> Vec<String> {
    let mut ids: Vec<String> = workers.iter().flat_map(|w| w.models.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

impl exo_api::Engine for GatewayEngine {
    fn models(&self) -> Vec<ModelCard> {
        let workers = self.workers();
        model_ids(&workers)
            .into_iter()
            .map(|id| ModelCard {
                tool_syntax: workers
                    .iter()
                    .flat_map(|w| &w.tool_syntax)
                    .find(|(model, _)| *model == id)
                    .map(|(_, syntax)| *syntax),
                id,
                created: self.created,
                owned_by: "exo-rs".to_owned(),
                // The gateway does not read models; nodes check the context.
                context_length: 0,
            })
            .collect()
    }

    fn cluster(&self) -> BoxFuture<'_, ClusterView> {
        self.views.view()
    }

    fn cluster_events(&self) -> Option<watch::Receiver<ClusterView>> {
        self.live.as_ref().map(LiveView::subscribe)
    }

    fn readiness(&self) -> Readiness {
        if self.workers().is_empty() {
            Readiness::NotReady("no node has joined the cluster yet".to_owned())
        } else {
            Readiness::Ready
        }
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, std::result::Result<Generation, GenerationError>> {
        Box::pin(async move {
            let workers = self.workers();
            let available = model_ids(&workers);
            let wanted = model_id(&request.model);
            let serving: Vec<&Worker> = workers
                .iter()
                .filter(|w| w.models.contains(&wanted))
                .collect();
            if serving.is_empty() {
                if workers.is_empty() {
                    return Err(GenerationError::Unavailable(
                        "no node has joined the cluster yet".to_owned(),
                    ));
                }
                return Err(GenerationError::UnknownModel {
                    model: request.model.clone(),
                    available,
                });
            }
            // Choices of one answer go to one node, which may compute their prompt once.
            let start = match request.share_prefill {
                Some(key) => key as usize,
                None => self.next.fetch_add(1, Ordering::Relaxed),
            };
            let mut last_error = None;
            // Try the nodes in turn, so one that just left does not fail the request.
            for i in 0..serving.len() {
                let worker = serving[(start + i) % serving.len()];
                let outcome = async {
                    self.views
                        .clients
                        .get(&worker.endpoint)
                        .await?
                        .generate(&request)
                        .await
                }
                .await;
                match outcome {
                    Ok(stream) => {
                        tracing::debug!(node = %worker.id, "forwarded a request");
                        return Ok(relay(stream, worker.id.clone()));
                    }
                    // Try the next node: this one may just have left.
                    Err(e) => {
                        self.views.clients.forget(&worker.endpoint);
                        last_error = Some(format!("node {}: {e}", worker.id));
                    }
                }
            }
            if let Some(error) = &last_error {
                tracing::warn!(%error, "no node could take a request");
            }
            Err(GenerationError::Unavailable(
                "no node of the cluster could take the request; retry".to_owned(),
            ))
        })
    }
}

/// Streams a node's generation to the API until the API drops its receiver (which drops the
/// stream, cancelling the generation on the node).
fn relay(mut stream: GenerateStream, node: String) -> Generation {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                () = tx.closed() => return,
            };
            let item = match item {
                Ok(Some(item)) => item,
                Ok(None) => Err(GenerationError::Internal(format!(
                    "node {node} ended the generation without a final event"
                ))),
                Err(e) => {
                    tracing::warn!(%node, error = %e, "the node serving a request went away");
                    Err(GenerationError::Unavailable(
                        "the node serving the request went away; retry".to_owned(),
                    ))
                }
            };
            // Only the final event or an error ends a generation (log-probabilities, an
            // embedding or the prompt's scores come before it).
            let last = matches!(item, Ok(GenerationEvent::Finished(_)) | Err(_));
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// Runs a gateway until `shutdown` resolves.
pub async fn run_gateway(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use futures::FutureExt;
    let shutdown = Box::pin(shutdown).shared();
    let mut topology = config.topology;
    topology.role = NodeRole::Observer;
    // A gateway may share its device, and its home, with a node: not that node's identity.
    topology.ephemeral_identity = true;
    topology.backend = "none".to_owned();
    topology.grpc_endpoint = None;
    topology.models = Vec::new();
    let listen_error = |source| Error::Listen {
        address: config.api_listen.to_string(),
        source,
    };
    // A member may rotate the cluster key (`exo-node revoke`): the gateway then joins again
    // with the new key, and serves on.
    loop {
        let listener = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .map_err(listen_error)?;
        let membership = Topology::start(topology.clone()).await?;
        let engine = Arc::new(GatewayEngine::start(membership.clone(), config.limits).await?);
        tracing::info!(address = %config.api_listen, "gateway serving the API");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let until = {
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    () = shutdown => {}
                    _ = stopped => {}
                }
            }
        };
        let mut served = tokio::spawn(exo_api::serve(listener, engine, config.api.clone(), until));
        let rotated = membership.rotated();
        let rotation = tokio::select! {
            outcome = &mut served => {
                membership.shutdown().await?;
                return match outcome {
                    Ok(result) => result.map_err(listen_error),
                    Err(e) => Err(Error::Listen {
                        address: config.api_listen.to_string(),
                        source: std::io::Error::other(e),
                    }),
                };
            }
            rotation = rotated => rotation,
        };
        let _ = stop.send(());
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut served)
            .await
            .is_err()
        {
            served.abort();
            let _ = served.await;
        }
        membership.shutdown().await?;
        let saved = exo_topology::save_cluster_key(&topology.home, &rotation.key, true)?;
        tracing::warn!(
            by = %rotation.by, fingerprint = %rotation.key.fingerprint(),
            saved = %saved.display(),
            "a member rotated the cluster key; the gateway joins again with it"
        );
        topology.cluster_key = Some(rotation.key);
    }
}
