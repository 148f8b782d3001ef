//! What this node holds: its shard of the plan (loaded only when the plan gives it layers,
//! reused when only the ring around it changed) and the worker that computes on it, one per
//! plan epoch. A worker of an older plan keeps serving the requests it has and stops when they
//! end; it takes no new ones.

pub(crate) mod link;
pub(crate) mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use exo_core::{Epoch, LayerRange, NodeId, Stage};
use exo_model::{Checkpoint, ModelConfig, ShardSpec, TensorId};
use exo_shard::{Device, LlamaShard, Weights};
use exo_transport::{AssignReport, Assignment, NodeStatus};
use tokio::sync::watch;

use crate::fetch::ModelStore;
use crate::grammar::ModelGrammars;
use crate::plan::PlanState;
use crate::stage::link::{LinkSettings, LinkTarget};
use crate::stage::worker::{WorkerHandle, WorkerMsg, WorkerSpec};
use crate::tasks::Tasks;

/// The model this node serves, as its stages load it, and how they batch.
#[derive(Debug)]
pub(crate) struct ModelSource {
    pub(crate) path: PathBuf,
    pub(crate) name: String,
    pub(crate) config: ModelConfig,
    pub(crate) device: Device,
    pub(crate) weights: Weights,
    /// Most prompt rows a worker's step computes.
    pub(crate) step_rows: usize,
    /// Memory this node offers the cluster, if known: what its weights leave of it bounds the
    /// keys and values its requests may reserve.
    pub(crate) memory_offered: Option<u64>,
    /// The model's grammars, for constrained requests.
    pub(crate) grammars: Arc<ModelGrammars>,
    /// The model in the store, when the node keeps one: a shard's chunks the node lacks are
    /// fetched from peers before it loads.
    pub(crate) store: Option<Arc<ModelStore>>,
}

/// What a node keeps of the memory it offers for the process and its buffers, not for keys
/// and values: an eighth of the offer, between 16 and 64 MiB. (A fixed 64 MiB left a node
/// offering 120 MiB for half of the default model no room for a second request's keys and
/// values, so it served one request at a time.)
fn memory_margin(offered: u64) -> u64 {
    (offered / 8).clamp(16 << 20, 64 << 20)
}

/// The shard this node holds for one plan epoch.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) epoch: Epoch,
    pub(crate) stages: Vec<Stage>,
    pub(crate) index: usize,
    pub(crate) shard: Arc<LlamaShard>,
    pub(crate) weight_bytes: u64,
}

impl Held {
    fn is_last(&self) -> bool {
        self.index + 1 == self.stages.len()
    }
}

/// How long an assignment of a plan this node does not follow yet waits for its own planner
/// to come to it (planning waits for membership to settle first).
const FOLLOW_WAIT: Duration = Duration::from_secs(5);

/// Why this node cannot hold what it was assigned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HoldError {
    /// The assignment is for another model.
    #[error("this node serves model `{serves}`, not `{asked}`")]
    WrongModel { serves: String, asked: String },
    /// The assignment gives this node no stage.
    #[error("node {node} is not part of plan {epoch}")]
    NotInPlan { node: NodeId, epoch: Epoch },
    /// Loading the layers failed.
    #[error("loading layers {layers}: {reason}")]
    Load { layers: LayerRange, reason: String },
    /// The assignment is not the plan this node follows (a stale one, or one this node has
    /// not come to within the wait).
    #[error("node {node} follows {ours}, not plan {asked}")]
    OtherPlan {
        node: NodeId,
        ours: String,
        asked: Epoch,
    },
}

/// A load under way: its layers, and the checkpoint it reads, whose read counter says how far
/// it got.
#[derive(Debug)]
struct Loading {
    layers: LayerRange,
    checkpoint: Arc<Checkpoint>,
    total_bytes: u64,
}

impl Loading {
    fn fraction(&self) -> f64 {
        let read = self.checkpoint.read_stats().bytes;
        (read as f64 / self.total_bytes.max(1) as f64).clamp(0.0, 1.0)
    }
}

/// Stored bytes of the tensors a shard of `spec` reads: what a load's progress is measured
/// against.
fn shard_bytes(checkpoint: &Checkpoint, spec: &ShardSpec) -> u64 {
    let bytes = |id| checkpoint.stored_bytes(id).unwrap_or(0);
    let parts = checkpoint.config().layer_parts();
    let mut total: u64 = spec
        .layers
        .clone()
        .flat_map(|layer| {
            parts
                .iter()
                .map(move |&part| TensorId::Layer { layer, part })
        })
        .filter(|&id| checkpoint.has_tensor(id))
        .map(bytes)
        .sum();
    if spec.embedding {
        total += bytes(TensorId::Embedding);
    }
    if spec.head {
        total += bytes(TensorId::FinalNorm);
        if checkpoint.has_tensor(TensorId::Head) {
            total += bytes(TensorId::Head);
        } else if !spec.embedding {
            total += bytes(TensorId::Embedding);
        }
    }
    total
}

/// This node's stages.
#[derive(Debug)]
pub(crate) struct Stages {
    node: NodeId,
    source: ModelSource,
    held: RwLock<Option<Arc<Held>>>,
    /// The epoch of the held shard, for waiters.
    held_epoch: watch::Sender<Option<Epoch>>,
    workers: Mutex<HashMap<Epoch, WorkerHandle>>,
    /// Serialises loads, so that two assignments never load at once.
    loading: tokio::sync::Mutex<()>,
    plan: watch::Receiver<PlanState>,
    active: Arc<AtomicU32>,
    stats: Arc<worker::StepStats>,
    /// The load under way, if any.
    load: Mutex<Option<Loading>>,
    /// Bumped when a load starts or ends, for the live view.
    changes: watch::Sender<u64>,
    links: LinkSettings,
    tasks: Tasks,
}

/// What this node's stage workers have computed since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageStats {
    /// Steps run.
    pub steps: u64,
    /// Rows computed (prompt and decode).
    pub rows: u64,
    /// Request pieces computed: a step of `n` requests counts `n`.
    pub pieces: u64,
    /// The most requests one step computed together.
    pub max_batch: u64,
    /// Seconds spent computing steps.
    pub busy_s: f64,
}

impl Stages {
    pub(crate) fn new(
        node: NodeId,
        source: ModelSource,
        plan: watch::Receiver<PlanState>,
        links: LinkSettings,
        tasks: Tasks,
    ) -> Self {
        Stages {
            node,
            source,
            held: RwLock::new(None),
            held_epoch: watch::channel(None).0,
            workers: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
            plan,
            active: Arc::default(),
            stats: Arc::default(),
            load: Mutex::new(None),
            changes: watch::channel(0).0,
            links,
            tasks,
        }
    }

    /// The model in the store, when the node keeps one.
    pub(crate) fn store(&self) -> Option<&Arc<ModelStore>> {
        self.source.store.as_ref()
    }

    /// Changes whenever a load starts or ends, or the held shard changes.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The shard held now, if any.
    pub(crate) fn held(&self) -> Option<Arc<Held>> {
        self.held.read().ok().and_then(|h| h.clone())
    }

    /// What the workers have computed.
    pub(crate) fn stats(&self) -> StageStats {
        let s = &self.stats;
        StageStats {
            steps: s.steps.load(Ordering::Relaxed),
            rows: s.rows.load(Ordering::Relaxed),
            pieces: s.pieces.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
            busy_s: s.busy_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Requests with state on this node.
    pub(crate) fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Holds this node's part of `assignment`, loading it unless the same layers are held,
    /// and starts its worker.
    pub(crate) async fn hold(&self, assignment: &Assignment) -> Result<AssignReport, HoldError> {
        if assignment.model != self.source.name {
            return Err(HoldError::WrongModel {
                serves: self.source.name.clone(),
                asked: assignment.model.clone(),
            });
        }
        let Some(index) = assignment.stages.iter().position(|s| s.node == self.node) else {
            return Err(HoldError::NotInPlan {
                node: self.node.clone(),
                epoch: assignment.epoch,
            });
        };
        let layers = assignment.stages[index].layers;
        let last = index + 1 == assignment.stages.len();
        // Only the plan this node follows itself. Another one is either newer (this node's own
        // planner comes to it within moments: wait for that) or stale (an origin still
        // building a route to a plan that lost a node): holding a stale one would drop the
        // shard of the plan in force, and with it the requests running there.
        self.wait_to_follow(assignment.epoch).await?;
        let _loading = self.loading.lock().await;
        self.follows(assignment.epoch)?;
        let mut load_seconds = 0.0;
        let shard = match self.held() {
            Some(held) if held.epoch == assignment.epoch => return Ok(report(&held, 0.0)),
            // Same layers, same role: keep the weights, take the new ring.
            Some(held)
                if held.shard.layer_range() == layers.to_range()
                    && (held.index == 0) == (index == 0)
                    && held.is_last() == last =>
            {
                (Arc::clone(&held.shard), held.weight_bytes)
            }
            _ => {
                // Free the old shard first: a node never loads a second one beside it. Its
                // worker retires now, and lets go of the weights at once unless requests are
                // still running on it (they finish first).
                self.set_held(None);
                self.retire_workers();
                let started = Instant::now();
                let loaded = self.load(assignment, index).await?;
                load_seconds = started.elapsed().as_secs_f64();
                loaded
            }
        };
        let held = Arc::new(Held {
            epoch: assignment.epoch,
            stages: assignment.stages.clone(),
            index,
            shard: shard.0,
            weight_bytes: shard.1,
        });
        self.start_worker(&held).map_err(|e| HoldError::Load {
            layers,
            reason: format!("starting the stage's worker thread: {e}"),
        })?;
        self.set_held(Some(Arc::clone(&held)));
        Ok(report(&held, load_seconds))
    }

    /// `Ok` when this node's own plan is `epoch`; otherwise why not.
    fn follows(&self, epoch: Epoch) -> Result<(), HoldError> {
        let ours = match &*self.plan.borrow() {
            PlanState::Ready(p) if p.epoch == epoch => return Ok(()),
            PlanState::Ready(p) => format!("plan {}", p.epoch),
            PlanState::Waiting(_) => "no plan".to_owned(),
        };
        Err(HoldError::OtherPlan {
            node: self.node.clone(),
            ours,
            asked: epoch,
        })
    }

    /// Waits (at most [`FOLLOW_WAIT`]) until this node's own plan is `epoch`.
    async fn wait_to_follow(&self, epoch: Epoch) -> Result<(), HoldError> {
        let mut changes = self.plan.clone();
        let deadline = tokio::time::Instant::now() + FOLLOW_WAIT;
        loop {
            changes.borrow_and_update();
            let refused = match self.follows(epoch) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Err(refused) },
                () = tokio::time::sleep_until(deadline) => return Err(refused),
            }
        }
    }

    async fn load(
        &self,
        assignment: &Assignment,
        index: usize,
    ) -> Result<(Arc<LlamaShard>, u64), HoldError> {
        let stage = &assignment.stages[index];
        let spec = ShardSpec {
            layers: stage.layers.to_range(),
            embedding: index == 0,
            head: index + 1 == assignment.stages.len(),
        };
        let (path, device, weights) = (
            self.source.path.clone(),
            self.source.device.clone(),
            self.source.weights,
        );
        let failed = |reason: String| HoldError::Load {
            layers: stage.layers,
            reason,
        };
        if let Some(store) = &self.source.store {
            let parts = exo_store::ShardParts {
                layers: spec.layers.clone(),
                embedding: spec.embedding,
                head: spec.head,
            };
            self.changed();
            let fetched = store.ensure(&parts).await;
            self.changed();
            fetched.map_err(|e| failed(format!("fetching its chunks from peers: {e}")))?;
        }
        let checkpoint = tokio::task::spawn_blocking(move || Checkpoint::open(&path))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        let checkpoint = Arc::new(checkpoint);
        self.set_loading(Some(Loading {
            layers: stage.layers,
            checkpoint: Arc::clone(&checkpoint),
            total_bytes: shard_bytes(&checkpoint, &spec),
        }));
        let for_load = spec.clone();
        let shard = tokio::task::spawn_blocking(move || {
            LlamaShard::load_with(&checkpoint, &for_load, &device, weights)
        })
        .await;
        self.set_loading(None);
        let shard = shard
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(failed)?;
        let weight_bytes = shard.native_weight_bytes().map_or_else(
            || (spec.layers.len() * self.source.config.layer_params() * 4) as u64,
            |b| b as u64,
        );
        tracing::info!(
            epoch = %assignment.epoch,
            layers = %stage.layers,
            embedding = spec.embedding,
            head = spec.head,
            weight_mib = weight_bytes as f64 / (1 << 20) as f64,
            "loaded shard"
        );
        Ok((Arc::new(shard), weight_bytes))
    }

    fn set_loading(&self, loading: Option<Loading>) {
        if let Ok(mut slot) = self.load.lock() {
            *slot = loading;
        }
        self.changed();
    }

    /// Starts the worker of `held` (with its link to the next stage) and retires older ones.
    fn start_worker(&self, held: &Held) -> std::io::Result<()> {
        let (handle, rx) = worker::queue(worker::InputShape {
            embeds: held.shard.has_embedding(),
            hidden: held.shard.hidden_size(),
        });
        let downstream = held.stages.get(held.index + 1).map(|next| {
            let target = LinkTarget {
                stage: next.clone(),
                index: (held.index + 1) as u32,
                epoch: held.epoch,
                from: self.node.clone(),
            };
            let worker = handle.clone();
            link::spawn_pump(&self.tasks, &self.links, target, move |failure| {
                worker.send(WorkerMsg::DownstreamFailed(failure));
            })
        });
        let spec = WorkerSpec {
            node: self.node.clone(),
            epoch: held.epoch,
            index: held.index,
            stages: held.stages.clone(),
            shard: Arc::clone(&held.shard),
            active: Arc::clone(&self.active),
            step_rows: self.source.step_rows,
            stats: Arc::clone(&self.stats),
            grammars: Arc::clone(&self.source.grammars),
            kv_positions: self.source.memory_offered.map(|offered| {
                let room = offered.saturating_sub(held.weight_bytes + memory_margin(offered));
                room / (held.shard.kv_bytes_per_position().max(1) as u64)
            }),
        };
        let handle = worker::spawn(spec, downstream, (handle, rx))?;
        self.retire_workers();
        if let Ok(mut workers) = self.workers.lock() {
            workers.insert(held.epoch, handle);
        }
        Ok(())
    }

    /// Tells every worker to take no new requests and stop once its running ones end.
    fn retire_workers(&self) {
        if let Ok(mut workers) = self.workers.lock() {
            workers.retain(|_, w| w.is_running());
            for old in workers.values() {
                old.send(WorkerMsg::Retire);
            }
        }
    }

    fn set_held(&self, held: Option<Arc<Held>>) {
        let epoch = held.as_ref().map(|h| h.epoch);
        if let Ok(mut slot) = self.held.write() {
            *slot = held;
        }
        self.held_epoch.send_replace(epoch);
        self.changed();
    }

    /// Drops the held shard (this node is not in the plan any more); running requests finish
    /// on the retiring worker.
    pub(crate) async fn release(&self) {
        let _loading = self.loading.lock().await;
        if self.held().is_some() {
            tracing::info!("this node holds no layers in the current plan; freeing its shard");
            self.set_held(None);
            self.retire_workers();
        }
    }

    /// The worker of `epoch`. When this node's own plan has that epoch, waits for its load;
    /// otherwise waits a moment for this node to see the same membership.
    pub(crate) async fn worker(&self, epoch: Epoch) -> Result<WorkerHandle, String> {
        let mut held_changes = self.held_epoch.subscribe();
        let mut plan_changes = self.plan.clone();
        let started = Instant::now();
        loop {
            let found = self
                .workers
                .lock()
                .ok()
                .and_then(|w| w.get(&epoch).filter(|w| w.is_running()).cloned());
            if let Some(worker) = found {
                return Ok(worker);
            }
            let expected_here =
                matches!(&*plan_changes.borrow(), PlanState::Ready(p) if p.epoch == epoch);
            let patience = if expected_here {
                Duration::from_secs(120)
            } else {
                Duration::from_secs(3)
            };
            let Some(left) = patience.checked_sub(started.elapsed()) else {
                break;
            };
            tokio::select! {
                _ = held_changes.changed() => {}
                _ = plan_changes.changed() => {}
                () = tokio::time::sleep(left) => {}
            }
        }
        Err(format!(
            "node {} holds plan {}, not plan {epoch}",
            self.node,
            self.held()
                .map_or_else(|| "none".to_owned(), |h| h.epoch.to_string())
        ))
    }

    /// Stops every worker now (the node is shutting down).
    pub(crate) fn stop(&self) {
        if let Ok(mut workers) = self.workers.lock() {
            for w in workers.values() {
                w.send(WorkerMsg::Stop);
            }
            workers.clear();
        }
        self.set_held(None);
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let held = self.held();
        let sent = &self.links.sent;
        let (loading, loading_fraction) = self
            .load
            .lock()
            .ok()
            .and_then(|slot| slot.as_ref().map(|l| (Some(l.layers), l.fraction())))
            .unwrap_or((None, 0.0));
        NodeStatus {
            node_id: self.node.as_str().to_owned(),
            model: self.source.name.clone(),
            epoch: held.as_ref().map(|h| h.epoch),
            layers: held
                .as_ref()
                .map(|h| h.stages[h.index].layers)
                .unwrap_or_default(),
            ready: held.is_some(),
            active_requests: self.active_requests(),
            weight_bytes: held.as_ref().map_or(0, |h| h.weight_bytes),
            resident_bytes: resident_bytes(),
            activation_bytes_sent: sent.bytes.load(Ordering::Relaxed),
            activation_frames_sent: sent.frames.load(Ordering::Relaxed),
            activation_positions_sent: sent.positions.load(Ordering::Relaxed),
            loading,
            loading_fraction,
            steps_computed: self.stats.steps.load(Ordering::Relaxed),
            positions_computed: self.stats.rows.load(Ordering::Relaxed),
            compute_nanos: self.stats.busy_us.load(Ordering::Relaxed) * 1000,
            decode_steps: self.stats.decode_steps.load(Ordering::Relaxed),
            decode_nanos: self.stats.decode_us.load(Ordering::Relaxed) * 1000,
            fetch: self.source.store.as_ref().and_then(|s| s.status()),
        }
    }
}

fn report(held: &Held, load_seconds: f64) -> AssignReport {
    AssignReport {
        epoch: held.epoch,
        layers: held.stages[held.index].layers,
        weight_bytes: held.weight_bytes,
        load_seconds,
    }
}

/// Resident memory of this process, on every platform (0 where it cannot be read).
pub(crate) fn resident_bytes() -> u64 {
    exo_topology::process_memory().resident_bytes.unwrap_or(0)
}
