//! What a node holds and how it answers the shard service: assignments, and each request's
//! steps through its layers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use exo_model::{ChatTemplate, Checkpoint, ModelConfig, ShardSpec, Tokenizer};
use exo_shard::{Device, KvCache, LlamaShard, Sampler, SamplingParams, Weights};
use exo_transport::{
    Activations, AssignReport, Assignment, Code, Error as TError, ForwardSession, GenerateCall,
    GenerateEvent, NodeStatus, RequestOpen, SentCounters, ShardClient, ShardHandler, StageRef,
    StageSession, Step, StepInput, TokenReply, WireDtype,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::planning::ActivePlan;

type TResult<T> = exo_transport::Result<T>;

/// The shard a node holds for one plan epoch.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) epoch: u64,
    pub(crate) stages: Vec<StageRef>,
    pub(crate) index: usize,
    pub(crate) shard: Arc<LlamaShard>,
    pub(crate) weight_bytes: u64,
}

impl Held {
    fn is_last(&self) -> bool {
        self.index + 1 == self.stages.len()
    }
}

/// Everything the shard service and the origin share on one node.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) node_id: String,
    pub(crate) model_name: String,
    pub(crate) model_path: PathBuf,
    pub(crate) config: ModelConfig,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) device: Device,
    pub(crate) weights: Weights,
    pub(crate) wire: WireDtype,
    pub(crate) default_max_tokens: usize,
    /// Largest prompt chunk sent in one frame.
    pub(crate) prefill_chunk: usize,
    pub(crate) held: RwLock<Option<Arc<Held>>>,
    /// The epoch of the held shard (0: none), for waiters.
    pub(crate) held_epoch: tokio::sync::watch::Sender<u64>,
    /// Serialises loads, so that two assignments never hold two shards at once.
    pub(crate) loading: tokio::sync::Mutex<()>,
    pub(crate) plan: tokio::sync::watch::Sender<crate::PlanState>,
    pub(crate) clients: crate::clients::ClientPool,
    pub(crate) sent: Arc<SentCounters>,
    pub(crate) active: Arc<AtomicU32>,
    /// The last plan epoch every stage confirmed holding (0: none yet).
    pub(crate) assigned_epoch: std::sync::atomic::AtomicU64,
}

fn service_error(code: Code, message: impl Into<String>) -> TError {
    TError::service(code, message)
}

/// A failure of a later stage, as told to this stage's caller: its code kept, the stage named.
pub(crate) fn stage_error(stage: &StageRef, e: TError) -> TError {
    service_error(
        e.code(),
        format!(
            "stage of node {} (layers {:?}): {e}",
            stage.node_id, stage.layers
        ),
    )
}

/// The model id clients use: the file name without `.gguf`.
pub(crate) fn model_id(name: &str) -> String {
    name.strip_suffix(".gguf").unwrap_or(name).to_owned()
}

/// Maps a shard failure to what the caller is told.
fn shard_error(e: exo_shard::Error) -> TError {
    use exo_shard::Error as E;
    match e {
        E::Shape { .. } | E::TokenOutOfRange { .. } | E::Sampling(_) | E::CacheMismatch { .. } => {
            TError::invalid(e.to_string())
        }
        E::ContextFull { .. } => service_error(Code::ResourceExhausted, e.to_string()),
        other => service_error(Code::Internal, other.to_string()),
    }
}

impl Runtime {
    pub(crate) fn held(&self) -> Option<Arc<Held>> {
        self.held.read().ok().and_then(|h| h.clone())
    }

    fn set_held(&self, held: Option<Arc<Held>>) {
        let epoch = held.as_ref().map_or(0, |h| h.epoch);
        if let Ok(mut slot) = self.held.write() {
            *slot = held;
        }
        self.held_epoch.send_replace(epoch);
    }

    /// A client for `endpoint`, connecting on first use.
    pub(crate) async fn client(&self, endpoint: &str) -> TResult<ShardClient> {
        self.clients.get(endpoint).await
    }

    /// Forgets a connection that failed, so the next call dials again.
    pub(crate) fn forget_client(&self, endpoint: &str) {
        self.clients.forget(endpoint);
    }

    /// Holds this node's part of `assignment`, loading it unless the same layers are held.
    pub(crate) async fn hold(&self, assignment: &Assignment) -> TResult<AssignReport> {
        if assignment.model != self.model_name {
            return Err(service_error(
                Code::NotFound,
                format!(
                    "this node serves model `{}`, not `{}`",
                    self.model_name, assignment.model
                ),
            ));
        }
        let Some(index) = assignment
            .stages
            .iter()
            .position(|s| s.node_id == self.node_id)
        else {
            return Err(service_error(
                Code::FailedPrecondition,
                format!(
                    "node {} is not part of plan epoch {}",
                    self.node_id, assignment.epoch
                ),
            ));
        };
        let layers = assignment.stages[index].layers.clone();
        let last = index + 1 == assignment.stages.len();
        let _loading = self.loading.lock().await;
        if let Some(held) = self.held() {
            if held.epoch == assignment.epoch {
                return Ok(self.report(&held, 0.0));
            }
            let same_part = held.shard.layer_range()
                == (layers.start as usize..layers.end as usize)
                && (held.index == 0) == (index == 0)
                && held.is_last() == last;
            if same_part {
                // Same layers, same role: keep the weights, take the new ring.
                let held = Arc::new(Held {
                    epoch: assignment.epoch,
                    stages: assignment.stages.clone(),
                    index,
                    shard: Arc::clone(&held.shard),
                    weight_bytes: held.weight_bytes,
                });
                self.set_held(Some(Arc::clone(&held)));
                return Ok(self.report(&held, 0.0));
            }
        }
        self.load(assignment, index).await
    }

    async fn load(&self, assignment: &Assignment, index: usize) -> TResult<AssignReport> {
        let stage = &assignment.stages[index];
        let spec = ShardSpec {
            layers: stage.layers.start as usize..stage.layers.end as usize,
            embedding: index == 0,
            head: index + 1 == assignment.stages.len(),
        };
        // Free the old shard first: a node never holds two.
        self.set_held(None);
        let started = Instant::now();
        let (path, device, weights) = (self.model_path.clone(), self.device.clone(), self.weights);
        let spec_for_load = spec.clone();
        let shard = tokio::task::spawn_blocking(move || {
            let checkpoint = Checkpoint::open(&path)?;
            LlamaShard::load_with(&checkpoint, &spec_for_load, &device, weights)
        })
        .await
        .map_err(|e| service_error(Code::Internal, format!("loading task failed: {e}")))?
        .map_err(|e| {
            service_error(
                Code::Internal,
                format!("loading layers {:?}: {e}", spec.layers),
            )
        })?;
        let weight_bytes = shard
            .native_weight_bytes()
            .map(|b| b as u64)
            .unwrap_or_else(|| (spec.layers.len() * self.config.layer_params() * 4) as u64);
        let held = Arc::new(Held {
            epoch: assignment.epoch,
            stages: assignment.stages.clone(),
            index,
            shard: Arc::new(shard),
            weight_bytes,
        });
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            epoch = assignment.epoch,
            layers = ?spec.layers,
            embedding = spec.embedding,
            head = spec.head,
            weight_mib = weight_bytes as f64 / (1 << 20) as f64,
            seconds,
            "loaded shard"
        );
        self.set_held(Some(Arc::clone(&held)));
        Ok(self.report(&held, seconds))
    }

    fn report(&self, held: &Held, load_seconds: f64) -> AssignReport {
        let layers = held.shard.layer_range();
        AssignReport {
            epoch: held.epoch,
            layers: layers.start as u32..layers.end as u32,
            weight_bytes: held.weight_bytes,
            load_seconds,
        }
    }

    /// Drops the held shard (this node is not in the plan any more).
    pub(crate) async fn release(&self) {
        let _loading = self.loading.lock().await;
        if self.held().is_some() {
            tracing::info!("this node holds no layers in the current plan; freeing its shard");
            self.set_held(None);
        }
    }

    /// The shard held for `epoch`. When this node's own plan has that epoch, waits for its
    /// load to finish; otherwise waits a moment for this node to see the same membership.
    async fn held_for(&self, epoch: u64) -> TResult<Arc<Held>> {
        let mut held_changes = self.held_epoch.subscribe();
        let mut plan_changes = self.plan.subscribe();
        let started = Instant::now();
        loop {
            if let Some(held) = self.held().filter(|h| h.epoch == epoch) {
                return Ok(held);
            }
            let expected_here =
                matches!(&*self.plan.borrow(), crate::PlanState::Ready(p) if p.epoch == epoch);
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
        Err(service_error(
            Code::FailedPrecondition,
            format!(
                "node {} holds plan epoch {}, the request was routed by epoch {epoch}",
                self.node_id,
                self.held().map_or(0, |h| h.epoch)
            ),
        ))
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let held = self.held();
        let layers = held.as_ref().map(|h| h.shard.layer_range()).unwrap_or(0..0);
        NodeStatus {
            node_id: self.node_id.clone(),
            model: self.model_name.clone(),
            epoch: held.as_ref().map_or(0, |h| h.epoch),
            layers: layers.start as u32..layers.end as u32,
            ready: held.is_some(),
            active_requests: self.active.load(Ordering::Relaxed),
            weight_bytes: held.as_ref().map_or(0, |h| h.weight_bytes),
            resident_bytes: resident_bytes(),
            activation_bytes_sent: self.sent.bytes.load(Ordering::Relaxed),
            activation_frames_sent: self.sent.frames.load(Ordering::Relaxed),
            activation_positions_sent: self.sent.positions.load(Ordering::Relaxed),
        }
    }
}

/// Resident memory of this process (Linux; 0 elsewhere).
pub(crate) fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The part of a request's state that the compute thread needs.
struct Compute {
    held: Arc<Held>,
    cache: KvCache,
    sampler: Option<Sampler>,
    /// The last stage's logits buffer, reused from step to step.
    logits: Vec<f32>,
}

/// One request on this stage.
struct Session {
    compute: Option<Compute>,
    next: Option<(ForwardSession, StageRef)>,
    runtime: Arc<Runtime>,
    _active: ActiveGuard,
}

struct ActiveGuard(Arc<AtomicU32>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Output {
    Hidden(Activations),
    Token(Option<u32>),
}

impl Session {
    async fn run(&mut self, step: Step) -> TResult<Option<TokenReply>> {
        let mut compute = self.compute.take().ok_or_else(|| {
            service_error(Code::Internal, "an earlier step of this request failed")
        })?;
        let expected = compute.cache.len();
        if step.position as usize != expected {
            return Err(TError::invalid(format!(
                "frame starts at position {} but this stage holds {expected} positions of the request",
                step.position
            )));
        }
        let positions = step.input.positions();
        let sample = step.sample;
        let (result, compute) = tokio::task::spawn_blocking(move || {
            let result = compute_step(&mut compute, step.input, sample);
            (result, compute)
        })
        .await
        .map_err(|e| service_error(Code::Internal, format!("compute task failed: {e}")))?;
        self.compute = Some(compute);
        let position = (expected + positions) as u32;
        match result? {
            Output::Token(token) => Ok(token.map(|token| TokenReply { token, position })),
            Output::Hidden(activations) => {
                let Some((next, stage)) = self.next.as_mut() else {
                    return Err(service_error(Code::Internal, "no next stage to send to"));
                };
                let step = Step {
                    position: expected as u32,
                    input: StepInput::Hidden(activations),
                    sample,
                };
                let context = |e: TError| {
                    self.runtime.forget_client(&stage.endpoint);
                    stage_error(stage, e)
                };
                if let Err(e) = next.send(&step).await {
                    return Err(context(e));
                }
                if !sample {
                    return Ok(None);
                }
                match next.next_token().await {
                    Ok(reply) => Ok(Some(reply)),
                    Err(e) => Err(context(e)),
                }
            }
        }
    }
}

fn compute_step(compute: &mut Compute, input: StepInput, sample: bool) -> TResult<Output> {
    let shard = &compute.held.shard;
    let hidden = shard.hidden_size();
    // Host buffers throughout: activations arrive and leave as plain values.
    let mut x: Vec<f32> = match input {
        StepInput::Tokens(ids) => {
            if !shard.has_embedding() {
                return Err(TError::invalid(
                    "token ids sent to a stage that does not embed tokens (send activations)",
                ));
            }
            let mut x = Vec::new();
            shard.embed_into(&ids, &mut x).map_err(shard_error)?;
            x
        }
        StepInput::Hidden(a) => {
            if shard.has_embedding() {
                return Err(TError::invalid(
                    "activations sent to the first stage (send token ids)",
                ));
            }
            if a.hidden != hidden {
                return Err(TError::invalid(format!(
                    "activations are {} wide but the model's hidden size is {}",
                    a.hidden, hidden
                )));
            }
            a.values
        }
    };
    shard
        .forward_in_place(&mut x, &mut compute.cache)
        .map_err(shard_error)?;
    if !compute.held.is_last() {
        return Ok(Output::Hidden(Activations {
            positions: x.len() / hidden,
            hidden,
            values: x,
        }));
    }
    if !sample {
        return Ok(Output::Token(None));
    }
    shard
        .logits_into(&x, &mut compute.cache, &mut compute.logits)
        .map_err(shard_error)?;
    let sampler = compute
        .sampler
        .as_mut()
        .ok_or_else(|| service_error(Code::Internal, "the last stage has no sampler"))?;
    Ok(Output::Token(Some(
        sampler.sample(&compute.logits).map_err(shard_error)?,
    )))
}

impl StageSession for Session {
    fn step(&mut self, step: Step) -> BoxFuture<'_, TResult<Option<TokenReply>>> {
        Box::pin(self.run(step))
    }
}

/// The shard service of a node: a cloneable handle on its runtime.
#[derive(Clone, Debug)]
pub(crate) struct Handler(pub(crate) Arc<Runtime>);

impl ShardHandler for Handler {
    fn assign(&self, assignment: Assignment) -> BoxFuture<'_, TResult<AssignReport>> {
        Box::pin(async move { self.0.hold(&assignment).await })
    }

    fn status(&self) -> BoxFuture<'_, NodeStatus> {
        Box::pin(async move { self.0.status() })
    }

    fn open(&self, open: RequestOpen) -> BoxFuture<'_, TResult<Box<dyn StageSession>>> {
        Box::pin(async move {
            let runtime = &self.0;
            let held = runtime.held_for(open.epoch).await?;
            let sampler = if held.is_last() {
                let params = SamplingParams {
                    temperature: open.sampling.temperature,
                    top_k: open.sampling.top_k as usize,
                    top_p: open.sampling.top_p,
                    seed: open.sampling.seed,
                };
                Some(Sampler::new(params).map_err(shard_error)?)
            } else {
                None
            };
            let next = match held.stages.get(held.index + 1) {
                None => None,
                Some(stage) => {
                    let opened = async {
                        runtime
                            .client(&stage.endpoint)
                            .await?
                            .open(open.clone(), runtime.wire, Arc::clone(&runtime.sent))
                            .await
                    }
                    .await;
                    match opened {
                        Ok(session) => Some((session, stage.clone())),
                        Err(e) => {
                            runtime.forget_client(&stage.endpoint);
                            return Err(stage_error(stage, e));
                        }
                    }
                }
            };
            runtime.active.fetch_add(1, Ordering::Relaxed);
            let session = Session {
                compute: Some(Compute {
                    cache: held.shard.new_cache(),
                    held,
                    sampler,
                    logits: Vec::new(),
                }),
                next,
                runtime: Arc::clone(runtime),
                _active: ActiveGuard(Arc::clone(&runtime.active)),
            };
            Ok(Box::new(session) as Box<dyn StageSession>)
        })
    }

    fn generate(
        &self,
        call: GenerateCall,
    ) -> BoxFuture<'_, TResult<mpsc::Receiver<TResult<GenerateEvent>>>> {
        Box::pin(async move { crate::origin::start(Arc::clone(&self.0), call).await })
    }
}

impl Runtime {
    /// The current plan, or why there is none.
    pub(crate) fn active_plan(&self) -> TResult<Arc<ActivePlan>> {
        match &*self.plan.borrow() {
            crate::PlanState::Ready(plan) => Ok(Arc::clone(plan)),
            crate::PlanState::Waiting(reason) => Err(service_error(
                Code::Unavailable,
                format!(
                    "the cluster cannot serve `{}` now: {reason}",
                    self.model_name
                ),
            )),
        }
    }
}
