//! The stage worker: one thread per held shard. It owns everything that computes on the shard:
//! a KV cache (and, on the last stage, a sampler) per request, and a queue of work that every
//! link into the stage feeds. Frames go in; activations go on to the next stage in one frame
//! per frame received, and sampled tokens and failures go straight to each request's origin.
//!
//! This is where batching (several requests' rows in one pass over the weights) and
//! tensor-parallel collectives will land; today each entry of a frame runs on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use exo_core::{
    Activations, Epoch, FailureKind, NodeId, RequestId, Stage, StageFailure, StepEntry, StepFrame,
    StepInput, TokenOut,
};
use exo_shard::{KvCache, LlamaShard, Sampler};
use tokio::sync::mpsc;

use crate::inbox::Inboxes;
use crate::stage::StageMeter;

/// Identifies one inbound link of a worker (requests end with the link they came over).
pub(crate) type LinkId = u64;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// What a worker is asked to do.
#[derive(Debug)]
pub(crate) enum WorkerMsg {
    /// A frame that arrived over `link`.
    Frame { link: LinkId, frame: StepFrame },
    /// `link` closed: end every request that came over it.
    LinkClosed(LinkId),
    /// Deliver what this stage has for requests from `origin` to `sink`.
    Subscribe { origin: NodeId, sink: DeliverySink },
    /// The link to the next stage failed: every request here fails with it.
    DownstreamFailed(StageFailure),
    /// A newer plan holds this node's layers: take no new requests, and stop once the
    /// running ones end.
    Retire,
    /// Stop now (the node is shutting down).
    Stop,
}

/// Where a worker delivers tokens and failures for one origin.
#[derive(Clone, Debug)]
pub(crate) enum DeliverySink {
    /// The origin is this node.
    Local(Arc<Inboxes>),
    /// The origin's subscription stream.
    Remote(mpsc::UnboundedSender<Vec<TokenOut>>),
}

impl DeliverySink {
    /// Delivers `items`; `false` once the origin has gone away.
    fn deliver(&self, items: Vec<TokenOut>) -> bool {
        match self {
            DeliverySink::Local(inboxes) => {
                inboxes.deliver(items);
                true
            }
            DeliverySink::Remote(tx) => tx.send(items).is_ok(),
        }
    }
}

/// A cloneable handle on a worker's queue.
#[derive(Clone, Debug)]
pub(crate) struct WorkerHandle {
    tx: mpsc::UnboundedSender<WorkerMsg>,
}

impl WorkerHandle {
    /// Queues `msg`; `false` once the worker has stopped.
    pub(crate) fn send(&self, msg: WorkerMsg) -> bool {
        self.tx.send(msg).is_ok()
    }

    /// Whether the worker still runs.
    pub(crate) fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// A new inbound link into the worker.
    pub(crate) fn link(&self) -> WorkerLink {
        WorkerLink {
            worker: self.clone(),
            link: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// One inbound link into a worker; dropping it closes the link.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    worker: WorkerHandle,
    link: LinkId,
}

impl WorkerLink {
    /// Queues a frame; `false` once the worker has stopped.
    pub(crate) fn send(&self, frame: StepFrame) -> bool {
        self.worker.send(WorkerMsg::Frame {
            link: self.link,
            frame,
        })
    }
}

impl Drop for WorkerLink {
    fn drop(&mut self) {
        self.worker.send(WorkerMsg::LinkClosed(self.link));
    }
}

/// What a worker serves: this node's stage of one plan.
#[derive(Debug)]
pub(crate) struct WorkerSpec {
    pub(crate) node: NodeId,
    pub(crate) epoch: Epoch,
    pub(crate) index: usize,
    pub(crate) stages: Vec<Stage>,
    pub(crate) shard: Arc<LlamaShard>,
    /// Requests with state on this node, across its workers (for status).
    pub(crate) active: Arc<AtomicU32>,
    /// Steps, positions and compute time, across its workers (for the live view).
    pub(crate) meter: Arc<StageMeter>,
}

/// Starts a worker on its own thread. `downstream` is the next stage's link (none for the
/// last stage); `queue` is the channel its handle feeds, made beforehand so that the link's
/// pump can report to the worker.
pub(crate) fn spawn(
    spec: WorkerSpec,
    downstream: Option<mpsc::Sender<StepFrame>>,
    queue: (WorkerHandle, mpsc::UnboundedReceiver<WorkerMsg>),
) -> std::io::Result<WorkerHandle> {
    let (handle, rx) = queue;
    let name = format!("stage-{}", spec.index);
    let mut worker = Worker {
        last: spec.index + 1 == spec.stages.len(),
        spec,
        downstream,
        requests: HashMap::new(),
        subscribers: HashMap::new(),
        retiring: false,
        x: Vec::new(),
        logits: Vec::new(),
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || worker.run(rx))?;
    Ok(handle)
}

/// A worker's queue, before the worker starts.
pub(crate) fn queue() -> (WorkerHandle, mpsc::UnboundedReceiver<WorkerMsg>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (WorkerHandle { tx }, rx)
}

/// One request on this stage.
struct Request {
    cache: KvCache,
    sampler: Option<Sampler>,
    origin: NodeId,
    link: LinkId,
    _active: ActiveGuard,
}

struct ActiveGuard(Arc<AtomicU32>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicU32>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Worker {
    spec: WorkerSpec,
    last: bool,
    downstream: Option<mpsc::Sender<StepFrame>>,
    requests: HashMap<RequestId, Request>,
    subscribers: HashMap<NodeId, DeliverySink>,
    retiring: bool,
    /// Activations of the entry being computed, reused.
    x: Vec<f32>,
    /// The last stage's logits, reused.
    logits: Vec<f32>,
}

/// What one frame produces.
#[derive(Default)]
struct Output {
    entries: Vec<StepEntry>,
    values: Vec<f32>,
    deliveries: HashMap<NodeId, Vec<TokenOut>>,
}

impl Worker {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<WorkerMsg>) {
        tracing::debug!(epoch = %self.spec.epoch, stage = self.spec.index, "stage worker started");
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                WorkerMsg::Frame { link, frame } => self.frame(link, frame),
                WorkerMsg::LinkClosed(link) => self.link_closed(link),
                WorkerMsg::Subscribe { origin, sink } => {
                    self.subscribers.insert(origin, sink);
                }
                WorkerMsg::DownstreamFailed(failure) => self.downstream_failed(&failure),
                WorkerMsg::Retire => self.retiring = true,
                WorkerMsg::Stop => break,
            }
            if self.retiring && self.requests.is_empty() {
                break;
            }
        }
        tracing::debug!(epoch = %self.spec.epoch, stage = self.spec.index, "stage worker stopped");
    }

    fn failure(&self, kind: FailureKind, reason: impl Into<String>) -> StageFailure {
        let stage = &self.spec.stages[self.spec.index];
        StageFailure {
            node: self.spec.node.clone(),
            stage: self.spec.index as u32,
            layers: stage.layers,
            epoch: self.spec.epoch,
            kind,
            reason: reason.into(),
        }
    }

    fn frame(&mut self, link: LinkId, frame: StepFrame) {
        let started = Instant::now();
        let mut out = Output::default();
        let mut row = 0usize;
        for entry in &frame.entries {
            let rows = entry.rows as usize;
            let first_row = row;
            row += rows;
            if let Some(start) = &entry.start
                && !self.start(entry.request, link, start, &mut out)
            {
                continue;
            }
            if !self.requests.contains_key(&entry.request) {
                // Ended or failed here before: later stages only need to hear it is over.
                if entry.end && !self.last {
                    out.entries.push(StepEntry::end(entry.request));
                }
                continue;
            }
            if rows > 0
                && let Err(reason) = self.compute(entry, &frame.input, first_row, &mut out)
            {
                let failure = self.failure(FailureKind::Failed, reason);
                self.fail(entry.request, failure, &mut out);
                continue;
            }
            if rows == 0 && !self.last {
                out.entries.push(entry.clone());
            }
            if entry.end {
                self.requests.remove(&entry.request);
            }
        }
        let positions = frame.entries.iter().map(|e| u64::from(e.rows)).sum();
        let decode = frame.entries.iter().all(|e| e.rows <= 1);
        self.spec.meter.record(positions, decode, started.elapsed());
        self.send(out);
    }

    /// Sets up a request that starts here; `false` (with the failure reported) if it cannot.
    fn start(
        &mut self,
        request: RequestId,
        link: LinkId,
        start: &exo_core::RequestStart,
        out: &mut Output,
    ) -> bool {
        let refused = if self.retiring {
            Some(format!(
                "this node now holds a newer plan than {}",
                self.spec.epoch
            ))
        } else if self.requests.contains_key(&request) {
            Some(format!("request {request} started twice"))
        } else if !self.subscribers.contains_key(&start.origin) {
            Some(format!(
                "origin {} has not subscribed to this stage's deliveries",
                start.origin
            ))
        } else {
            None
        };
        if let Some(reason) = refused {
            out.deliveries
                .entry(start.origin.clone())
                .or_default()
                .push(TokenOut::Failed {
                    request,
                    failure: self.failure(FailureKind::Refused, reason),
                });
            if !self.last {
                out.entries.push(StepEntry::end(request));
            }
            return false;
        }
        let shard = &self.spec.shard;
        let mut cache = shard.new_cache();
        shard.reserve(&mut cache, start.positions as usize);
        let sampler = if self.last {
            match Sampler::new(start.sampling) {
                Ok(s) => Some(s),
                Err(e) => {
                    out.deliveries
                        .entry(start.origin.clone())
                        .or_default()
                        .push(TokenOut::Failed {
                            request,
                            failure: self.failure(FailureKind::Failed, e.to_string()),
                        });
                    return false;
                }
            }
        } else {
            None
        };
        self.requests.insert(
            request,
            Request {
                cache,
                sampler,
                origin: start.origin.clone(),
                link,
                _active: ActiveGuard::new(&self.spec.active),
            },
        );
        true
    }

    /// Runs one entry's rows through the shard.
    fn compute(
        &mut self,
        entry: &StepEntry,
        input: &StepInput,
        first_row: usize,
        out: &mut Output,
    ) -> Result<(), String> {
        let shard = Arc::clone(&self.spec.shard);
        let rows = entry.rows as usize;
        let last = self.last;
        let Some(request) = self.requests.get_mut(&entry.request) else {
            return Ok(());
        };
        if entry.position as usize != request.cache.len() {
            return Err(format!(
                "request {} sent position {} but this stage holds {} of its positions",
                entry.request,
                entry.position,
                request.cache.len()
            ));
        }
        match input {
            StepInput::Tokens(ids) if shard.has_embedding() => {
                let ids = ids.get(first_row..first_row + rows).unwrap_or_default();
                shard
                    .embed_into(ids, &mut self.x)
                    .map_err(|e| e.to_string())?;
            }
            StepInput::Hidden(a) if !shard.has_embedding() => {
                let hidden = shard.hidden_size();
                if a.hidden != hidden {
                    return Err(format!(
                        "activations are {} wide but the model's hidden size is {hidden}",
                        a.hidden
                    ));
                }
                let values = a
                    .values
                    .get(first_row * hidden..(first_row + rows) * hidden)
                    .unwrap_or_default();
                self.x.clear();
                self.x.extend_from_slice(values);
            }
            StepInput::Tokens(_) => {
                return Err("token ids sent to a stage that does not embed tokens".to_owned());
            }
            StepInput::Hidden(_) => {
                return Err("activations sent to the first stage".to_owned());
            }
        }
        shard
            .forward_in_place(&mut self.x, &mut request.cache)
            .map_err(|e| e.to_string())?;
        if !last {
            out.values.extend_from_slice(&self.x);
            out.entries.push(entry.clone());
            return Ok(());
        }
        if entry.sample {
            shard
                .logits_into(&self.x, &mut request.cache, &mut self.logits)
                .map_err(|e| e.to_string())?;
            let Some(sampler) = request.sampler.as_mut() else {
                return Err("the last stage has no sampler".to_owned());
            };
            let token = sampler.sample(&self.logits).map_err(|e| e.to_string())?;
            out.deliveries
                .entry(request.origin.clone())
                .or_default()
                .push(TokenOut::Token {
                    request: entry.request,
                    token,
                    position: entry.position + entry.rows,
                });
        }
        Ok(())
    }

    /// Ends `request` here with `failure`, tells its origin, and frees it on later stages.
    fn fail(&mut self, request: RequestId, failure: StageFailure, out: &mut Output) {
        tracing::debug!(%request, %failure, "request failed on this stage");
        if let Some(state) = self.requests.remove(&request) {
            out.deliveries
                .entry(state.origin)
                .or_default()
                .push(TokenOut::Failed { request, failure });
        }
        if !self.last {
            out.entries.push(StepEntry::end(request));
        }
    }

    fn link_closed(&mut self, link: LinkId) {
        let ended: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.link == link)
            .map(|(id, _)| *id)
            .collect();
        if ended.is_empty() {
            return;
        }
        tracing::debug!(requests = ended.len(), "a link closed; ending its requests");
        let mut out = Output::default();
        for request in ended {
            self.requests.remove(&request);
            if !self.last {
                out.entries.push(StepEntry::end(request));
            }
        }
        self.send(out);
    }

    fn downstream_failed(&mut self, failure: &StageFailure) {
        if self.requests.is_empty() {
            return;
        }
        tracing::warn!(%failure, requests = self.requests.len(), "the next stage failed");
        let mut out = Output::default();
        for (request, state) in self.requests.drain() {
            out.deliveries
                .entry(state.origin)
                .or_default()
                .push(TokenOut::Failed {
                    request,
                    failure: failure.clone(),
                });
        }
        self.deliver(out.deliveries);
    }

    /// Sends what a frame produced: activations on, deliveries to origins.
    fn send(&mut self, out: Output) {
        let Output {
            mut entries,
            values,
            deliveries,
        } = out;
        let abandoned = self.deliver(deliveries);
        if !self.last {
            entries.extend(abandoned.into_iter().map(StepEntry::end));
        }
        if entries.is_empty() {
            return;
        }
        let Some(downstream) = &self.downstream else {
            return;
        };
        let hidden = self.spec.shard.hidden_size();
        let frame = StepFrame {
            entries,
            input: StepInput::Hidden(Activations {
                rows: values.len() / hidden.max(1),
                hidden,
                values,
            }),
        };
        if downstream.blocking_send(frame).is_err() {
            tracing::debug!("the link to the next stage is gone");
        }
    }

    /// Delivers to each origin; returns the requests ended because their origin is gone.
    fn deliver(&mut self, deliveries: HashMap<NodeId, Vec<TokenOut>>) -> Vec<RequestId> {
        let mut abandoned = Vec::new();
        for (origin, items) in deliveries {
            let delivered = self
                .subscribers
                .get(&origin)
                .is_some_and(|sink| sink.deliver(items));
            if !delivered {
                // The origin is gone: nobody waits for its requests any more.
                self.subscribers.remove(&origin);
                self.requests.retain(|id, r| {
                    let keep = r.origin != origin;
                    if !keep {
                        abandoned.push(*id);
                    }
                    keep
                });
            }
        }
        abandoned
    }
}
