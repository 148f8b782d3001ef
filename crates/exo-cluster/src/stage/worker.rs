//! The stage worker: one thread per held shard and plan epoch. It owns everything that
//! computes on the shard: a KV cache (and, on the last stage, a sampler) per request, and a
//! queue of work that every link into the stage feeds.
//!
//! It batches continuously. Each step takes, from every request with work waiting, its next
//! piece: a decode token, or a chunk of a prompt within the step's row budget (so a long prompt
//! arriving does not stall the streams that are decoding), and runs every layer once for all of
//! them, attention per request over its own keys and values. Requests join and leave between
//! steps. The activations of a step go on to the next stage in one frame; sampled tokens and
//! failures go straight to each request's origin. A request starts only when the keys and values
//! it may need fit the stage's budget; until then it waits, first come first served.
//!
//! The first stage shapes the batches. Tokens come back from the origins one request at a
//! time, a moment apart; a step taken at the first arrival would compute a few requests, and
//! the rest in the next step, for ever (measured: 4.8 of 8 streams per step). So before a step
//! it waits briefly ([`GATHER_MAX`] at most) for requests whose tokens are on their way back:
//! on a one-stage plan all of them, on longer plans those of the groups already back (a group
//! is the requests of one step; its tokens come back together). And on a plan of `N` stages
//! it splits the decoding requests into `N` groups (a step takes at most `ceil(decoding / N)`
//! decode tokens), so that while one group is on a later stage the first stage computes the
//! next, and every stage is busy.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use exo_core::{
    Activations, Epoch, FailureKind, NodeId, RequestId, RequestStart, Stage, StageFailure,
    StepEntry, StepFrame, StepInput, TokenLogprob, TokenOut,
};
use exo_grammar::Guide;
use exo_shard::{KvCache, LlamaShard, MeanPool, Sampler};
use tokio::sync::mpsc;

use crate::grammar::ModelGrammars;
use crate::inbox::Inboxes;

/// The longest the first stage waits, before a step, for tokens on their way back.
const GATHER_MAX: Duration = Duration::from_millis(3);
/// The shortest such wait (a step of a tiny model can take microseconds).
const GATHER_MIN: Duration = Duration::from_micros(500);

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

/// What the rows of frames sent to a stage must look like.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InputShape {
    /// The stage embeds tokens: it takes token ids, the others activations.
    pub(crate) embeds: bool,
    /// The activations' width.
    pub(crate) hidden: usize,
}

/// A cloneable handle on a worker's queue.
#[derive(Clone, Debug)]
pub(crate) struct WorkerHandle {
    tx: mpsc::UnboundedSender<WorkerMsg>,
    shape: InputShape,
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

/// Why a link refused a frame.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkRefusal {
    /// The frame's rows are not what this stage takes.
    #[error("{0}")]
    Malformed(String),
    /// The stage's worker has stopped.
    #[error("this node's stage of the plan has stopped")]
    Stopped,
}

impl WorkerLink {
    /// Checks a frame against what the stage takes and queues it.
    pub(crate) fn send(&self, frame: StepFrame) -> Result<(), LinkRefusal> {
        let shape = self.worker.shape;
        match &frame.input {
            StepInput::Tokens(ids) if !ids.is_empty() && !shape.embeds => {
                return Err(LinkRefusal::Malformed(
                    "token ids sent to a stage that does not embed tokens (send activations)"
                        .into(),
                ));
            }
            StepInput::Hidden(a) if a.rows > 0 && shape.embeds => {
                return Err(LinkRefusal::Malformed(
                    "activations sent to the first stage (send token ids)".into(),
                ));
            }
            StepInput::Hidden(a) if a.rows > 0 && a.hidden != shape.hidden => {
                return Err(LinkRefusal::Malformed(format!(
                    "activations are {} wide but the model's hidden size is {}",
                    a.hidden, shape.hidden
                )));
            }
            _ => {}
        }
        if self.worker.send(WorkerMsg::Frame {
            link: self.link,
            frame,
        }) {
            Ok(())
        } else {
            Err(LinkRefusal::Stopped)
        }
    }
}

impl Drop for WorkerLink {
    fn drop(&mut self) {
        self.worker.send(WorkerMsg::LinkClosed(self.link));
    }
}

/// What the workers of a node have done, for status and benchmarks.
#[derive(Debug, Default)]
pub(crate) struct StepStats {
    /// Steps run.
    pub(crate) steps: AtomicU64,
    /// Rows computed (prompt and decode).
    pub(crate) rows: AtomicU64,
    /// Request pieces computed (a step of `n` requests counts `n`).
    pub(crate) pieces: AtomicU64,
    /// The most requests one step has computed together.
    pub(crate) max_batch: AtomicU64,
    /// Time spent computing steps, microseconds.
    pub(crate) busy_us: AtomicU64,
    /// Steps in which every request advanced one position (no prompt rows).
    pub(crate) decode_steps: AtomicU64,
    /// Time spent computing those, microseconds.
    pub(crate) decode_us: AtomicU64,
}

/// What a worker serves: this node's stage of one plan, and how it batches.
#[derive(Debug)]
pub(crate) struct WorkerSpec {
    pub(crate) node: NodeId,
    pub(crate) epoch: Epoch,
    pub(crate) index: usize,
    pub(crate) stages: Vec<Stage>,
    pub(crate) shard: Arc<LlamaShard>,
    /// Requests with state on this node, across its workers (for status).
    pub(crate) active: Arc<AtomicU32>,
    /// Most prompt rows one step computes (decode tokens always go in).
    pub(crate) step_rows: usize,
    /// Positions of keys and values the requests here may reserve in all (`None`: no bound);
    /// one request at a time is always admitted.
    pub(crate) kv_positions: Option<u64>,
    /// Where the worker counts its steps.
    pub(crate) stats: Arc<StepStats>,
    /// The model's grammars, for constrained requests (last stage).
    pub(crate) grammars: Arc<ModelGrammars>,
}

/// A worker's queue, before the worker starts.
pub(crate) fn queue(shape: InputShape) -> (WorkerHandle, mpsc::UnboundedReceiver<WorkerMsg>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (WorkerHandle { tx, shape }, rx)
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
    // The first stage waits for returning tokens with a timer of its own thread.
    let timer = if spec.index == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok()
    } else {
        None
    };
    let mut worker = Worker {
        last: spec.index + 1 == spec.stages.len(),
        timer,
        steps: 0,
        last_step: Duration::ZERO,
        #[cfg(test)]
        panic_next_step: false,
        spec,
        downstream,
        requests: HashMap::new(),
        waiting: HashMap::new(),
        order: VecDeque::new(),
        reserved: 0,
        subscribers: HashMap::new(),
        retiring: false,
        x: Vec::new(),
        tokens: Vec::new(),
        sample_rows: Vec::new(),
        logits: Vec::new(),
        normed: Vec::new(),
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || worker.run(rx))?;
    Ok(handle)
}

/// One request admitted on this stage.
struct Request {
    cache: KvCache,
    sampler: Option<Sampler>,
    /// The grammar its tokens must follow (last stage, constrained requests).
    guide: Option<Guide>,
    /// Whether to report its tokens' log-probabilities, with how many alternatives.
    logprobs: Option<u32>,
    origin: NodeId,
    link: LinkId,
    /// Positions reserved against the stage's budget.
    positions: u64,
    /// Its last piece sampled and its next has not come yet (first stage).
    expecting: bool,
    /// The step that computed its last piece (first stage): its group.
    group: u64,
    /// The request asks for its prompt's embedding instead of tokens; on the last stage, the
    /// pooling so far.
    embedding: Option<MeanPool>,
    /// The request asks for its prompt tokens' log-probabilities (last stage): how many
    /// alternatives, and the prompt's ids.
    prompt_logprobs: Option<(u32, Vec<u32>)>,
    _active: ActiveGuard,
}

/// Prompt rows whose logits are computed at once when a request scores its prompt (the
/// logits of 16 rows of a 262k vocabulary take 16 MiB).
const PROMPT_SCORE_ROWS: usize = 16;

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

/// Rows of one request's entry, waiting to be computed.
#[derive(Debug)]
struct Work {
    link: LinkId,
    position: u32,
    input: WorkInput,
    sample: bool,
    start: Option<RequestStart>,
    end: bool,
}

#[derive(Debug)]
enum WorkInput {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

impl Work {
    fn rows(&self, hidden: usize) -> usize {
        match &self.input {
            WorkInput::Tokens(t) => t.len(),
            WorkInput::Hidden(v) => v.len() / hidden.max(1),
        }
    }

    /// Splits off the first `rows` rows as a piece of its own; the rest stays, at the
    /// positions after them, keeping the entry's end and sampling.
    fn split_front(&mut self, rows: usize, hidden: usize) -> Work {
        let input = match &mut self.input {
            WorkInput::Tokens(t) => WorkInput::Tokens(t.drain(..rows).collect()),
            WorkInput::Hidden(v) => WorkInput::Hidden(v.drain(..rows * hidden).collect()),
        };
        let front = Work {
            link: self.link,
            position: self.position,
            input,
            sample: false,
            start: self.start.take(),
            end: false,
        };
        // Saturating: a position near u32::MAX from a peer then fails the position check.
        self.position = self
            .position
            .saturating_add(u32::try_from(rows).unwrap_or(u32::MAX));
        front
    }
}

struct Worker {
    spec: WorkerSpec,
    last: bool,
    downstream: Option<mpsc::Sender<StepFrame>>,
    /// Admitted requests.
    requests: HashMap<RequestId, Request>,
    /// Work waiting, per request (admitted or not yet).
    waiting: HashMap<RequestId, VecDeque<Work>>,
    /// Requests with work waiting, in the order their work arrived.
    order: VecDeque<RequestId>,
    /// Positions the admitted requests reserved.
    reserved: u64,
    subscribers: HashMap<NodeId, DeliverySink>,
    retiring: bool,
    /// A step's activations, reused.
    x: Vec<f32>,
    /// A step's token ids (first stage), reused.
    tokens: Vec<u32>,
    /// The last rows of the requests that sample, reused.
    sample_rows: Vec<f32>,
    /// Their logits, reused.
    logits: Vec<f32>,
    /// Rows after the final norm (requests that embed), reused.
    normed: Vec<f32>,
    /// The first stage's timer for gathering a batch (`None` elsewhere).
    timer: Option<tokio::runtime::Runtime>,
    /// Steps run (the id of the next step's group).
    steps: u64,
    /// How long the last step took.
    last_step: Duration,
    /// Tests: the next step panics.
    #[cfg(test)]
    panic_next_step: bool,
}

/// How the first stage's next batch looks.
struct BatchShape {
    /// Admitted requests whose next piece is a decode token waiting here.
    ready: usize,
    /// Admitted requests whose token is out and whose next piece has not come.
    expecting: usize,
    /// Of those, the ones worth waiting for: on their way back now.
    near: usize,
}

/// What one step produces.
#[derive(Default)]
struct Output {
    entries: Vec<StepEntry>,
    values: Vec<f32>,
    deliveries: HashMap<NodeId, Vec<TokenOut>>,
}

/// One request's piece of a step.
struct Piece {
    request: RequestId,
    work: Work,
    rows: usize,
}

impl Worker {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<WorkerMsg>) {
        tracing::debug!(epoch = %self.spec.epoch, stage = self.spec.index, "stage worker started");
        'run: loop {
            if !self.runnable() {
                match rx.blocking_recv() {
                    Some(msg) => {
                        if !self.handle(msg) {
                            break 'run;
                        }
                    }
                    None => break 'run,
                }
            }
            // Everything that has arrived joins this step.
            while let Ok(msg) = rx.try_recv() {
                if !self.handle(msg) {
                    break 'run;
                }
            }
            if self.runnable() {
                if !self.gather(&mut rx) {
                    break 'run;
                }
                self.guarded_step();
            }
            if self.retiring && self.requests.is_empty() && self.waiting.is_empty() {
                break;
            }
        }
        tracing::debug!(epoch = %self.spec.epoch, stage = self.spec.index, "stage worker stopped");
    }

    /// On the first stage, waits a moment for the requests whose tokens are on their way back,
    /// so that they join this step (see the module documentation); `false` to stop now.
    fn gather(&mut self, rx: &mut mpsc::UnboundedReceiver<WorkerMsg>) -> bool {
        let bound = (self.last_step / 4).clamp(GATHER_MIN, GATHER_MAX);
        let deadline = Instant::now() + bound;
        loop {
            let Some(timer) = &self.timer else {
                return true;
            };
            let shape = self.batch_shape();
            if shape.near == 0 || shape.ready >= self.decode_cap(&shape) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            // The timeout is made inside the timer's runtime, whose clock it needs.
            match timer.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
                Ok(Some(msg)) => {
                    if !self.handle(msg) {
                        return false;
                    }
                }
                // Closed: the run loop finds out on its next receive.
                Ok(None) | Err(_) => return true,
            }
        }
    }

    /// The first stage's decoding requests: those ready, and those whose token is out.
    fn batch_shape(&self) -> BatchShape {
        let hidden = self.hidden();
        let mut shape = BatchShape {
            ready: 0,
            expecting: 0,
            near: 0,
        };
        let mut back = std::collections::HashSet::new();
        for (id, request) in &self.requests {
            match self.waiting.get(id).and_then(VecDeque::front) {
                Some(work) if work.rows(hidden) == 1 => {
                    shape.ready += 1;
                    back.insert(request.group);
                }
                Some(_) => {}
                None if request.expecting => shape.expecting += 1,
                None => {}
            }
        }
        shape.near = if self.spec.stages.len() <= 1 {
            shape.expecting
        } else {
            self.requests
                .iter()
                .filter(|(id, r)| {
                    r.expecting && !self.waiting.contains_key(id) && back.contains(&r.group)
                })
                .count()
        };
        shape
    }

    /// The most decode tokens a first-stage step takes: a share of the decoding requests, one
    /// group per stage, so that every stage of a longer plan has a group to compute.
    fn decode_cap(&self, shape: &BatchShape) -> usize {
        let stages = self.spec.stages.len().max(1);
        (shape.ready + shape.expecting).div_ceil(stages).max(1)
    }

    /// Takes one message; `false` to stop now.
    fn handle(&mut self, msg: WorkerMsg) -> bool {
        match msg {
            WorkerMsg::Frame { link, frame } => self.enqueue(link, frame),
            WorkerMsg::LinkClosed(link) => self.link_closed(link),
            WorkerMsg::Subscribe { origin, sink } => {
                self.subscribers.insert(origin, sink);
            }
            WorkerMsg::DownstreamFailed(failure) => self.downstream_failed(&failure),
            WorkerMsg::Retire => self.retiring = true,
            WorkerMsg::Stop => return false,
        }
        true
    }

    fn hidden(&self) -> usize {
        self.spec.shard.hidden_size()
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

    /// Splits a frame into each request's work.
    fn enqueue(&mut self, link: LinkId, frame: StepFrame) {
        let hidden = self.hidden();
        let mut row = 0usize;
        for entry in frame.entries {
            let rows = entry.rows as usize;
            let input = match &frame.input {
                StepInput::Tokens(ids) => {
                    WorkInput::Tokens(ids.get(row..row + rows).unwrap_or_default().to_vec())
                }
                StepInput::Hidden(a) => WorkInput::Hidden(
                    a.values
                        .get(row * hidden..(row + rows) * hidden)
                        .unwrap_or_default()
                        .to_vec(),
                ),
            };
            row += rows;
            let work = Work {
                link,
                position: entry.position,
                input,
                sample: entry.sample,
                start: entry.start,
                end: entry.end,
            };
            if let Some(request) = self.requests.get_mut(&entry.request) {
                request.expecting = false;
            }
            let queue = self.waiting.entry(entry.request).or_default();
            // An end alone (the caller went away, or the request moved to another plan) makes
            // the work still queued for it useless: it is dropped, so a long prompt abandoned
            // mid-prefill stops after the step in progress.
            if work.end && work.rows(hidden) == 0 && !queue.is_empty() {
                queue.clear();
            }
            if queue.is_empty() {
                self.order.push_back(entry.request);
            }
            queue.push_back(work);
        }
    }

    /// Whether a step would do something now.
    fn runnable(&self) -> bool {
        let mut admit_checked = false;
        for id in &self.order {
            let Some(work) = self.waiting.get(id).and_then(VecDeque::front) else {
                continue;
            };
            if self.requests.contains_key(id) || work.start.is_none() {
                return true;
            }
            // Only the first request waiting for admission may be admitted next.
            if !admit_checked {
                admit_checked = true;
                if self.admissible(work.start.as_ref()) {
                    return true;
                }
            }
        }
        false
    }

    fn admissible(&self, start: Option<&RequestStart>) -> bool {
        let Some(start) = start else { return true };
        if self.retiring || self.requests.is_empty() {
            return true;
        }
        match self.spec.kv_positions {
            None => true,
            Some(limit) => self.reserved + u64::from(start.positions) <= limit,
        }
    }

    /// Chooses the pieces of this step: every request's next piece, in arrival order; decode
    /// tokens always, prompt rows within the budget; new requests while their keys and values
    /// fit, first come first served.
    fn choose(&mut self) -> Vec<Piece> {
        let hidden = self.hidden();
        let decoding = self
            .order
            .iter()
            .filter(|id| self.requests.contains_key(id))
            .filter(|id| {
                self.waiting
                    .get(id)
                    .and_then(VecDeque::front)
                    .is_some_and(|w| w.rows(hidden) <= 1)
            })
            .count();
        // Prompts get what decode tokens leave of the budget, and never less than a quarter of
        // it, so that prefill keeps moving however many streams decode.
        let budget = self.spec.step_rows.max(1);
        let mut prompt_rows = budget.saturating_sub(decoding).max(budget / 4).max(1);
        // The first stage of a longer plan takes one group of decode tokens per step.
        let mut decode_left = if self.timer.is_some() && self.spec.stages.len() > 1 {
            self.decode_cap(&self.batch_shape())
        } else {
            usize::MAX
        };
        let mut admission_blocked = false;
        let mut pieces = Vec::new();
        // One piece per request per step (a request's pieces must run in order).
        let mut seen = std::collections::HashSet::new();
        let order: Vec<RequestId> = self
            .order
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();
        for id in order {
            let Some(front) = self.waiting.get(&id).and_then(VecDeque::front) else {
                continue;
            };
            let (rows, link, start) = (front.rows(hidden), front.link, front.start.clone());
            let decode = rows == 1 && start.is_none();
            if let Some(start) = start.filter(|_| !self.requests.contains_key(&id)) {
                if admission_blocked || !self.admissible(Some(&start)) {
                    admission_blocked = true;
                    continue;
                }
                if !self.admit(id, link, &start) {
                    continue;
                }
            }
            let take = if decode {
                if decode_left == 0 {
                    continue;
                }
                decode_left -= 1;
                rows
            } else if rows <= 1 {
                rows
            } else if prompt_rows == 0 {
                continue;
            } else {
                rows.min(prompt_rows)
            };
            if rows > 1 {
                prompt_rows -= take;
            }
            let Some(queue) = self.waiting.get_mut(&id) else {
                continue;
            };
            let work = if take < rows {
                match queue.front_mut() {
                    Some(front) => front.split_front(take, hidden),
                    None => continue,
                }
            } else {
                match queue.pop_front() {
                    Some(w) => w,
                    None => continue,
                }
            };
            pieces.push(Piece {
                request: id,
                work,
                rows: take,
            });
        }
        // Requests with nothing left drop out of the order; new work puts them at the back.
        self.waiting.retain(|_, q| !q.is_empty());
        let mut kept = std::collections::HashSet::new();
        let waiting = &self.waiting;
        self.order
            .retain(|id| waiting.contains_key(id) && kept.insert(*id));
        pieces
    }

    /// Admits a request that starts here; `false` (with the failure reported) if it cannot.
    fn admit(&mut self, request: RequestId, link: LinkId, start: &RequestStart) -> bool {
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
        } else if let Some(fork) = start.fork
            && self
                .requests
                .get(&fork.parent)
                .is_none_or(|p| p.cache.len() < fork.positions as usize)
        {
            // The origin sends the whole prompt instead.
            Some(format!(
                "request {} shares its prompt with request {}, whose first {} positions this \
                 stage no longer holds",
                request, fork.parent, fork.positions
            ))
        } else {
            None
        };
        let sampling = match (&refused, self.last) {
            (None, true) => match self.sampling_state(start) {
                Ok((mut s, guide)) => {
                    s.skip(start.sampled);
                    Some((s, guide))
                }
                Err(e) => {
                    self.drop_waiting(request, start.origin.clone(), FailureKind::Failed, e);
                    return false;
                }
            },
            _ => None,
        };
        let (sampler, guide) = match sampling {
            Some((sampler, guide)) => (Some(sampler), guide),
            None => (None, None),
        };
        if let Some(reason) = refused {
            self.drop_waiting(request, start.origin.clone(), FailureKind::Refused, reason);
            return false;
        }
        let shard = &self.spec.shard;
        // A choice that shares its prompt starts from a copy of the keys and values computed
        // for another request (checked above).
        let forked = start.fork.and_then(|fork| {
            let parent = self.requests.get(&fork.parent)?;
            parent.cache.prefix(fork.positions as usize)
        });
        let mut cache = forked.unwrap_or_else(|| shard.new_cache());
        shard.reserve(&mut cache, start.positions as usize);
        let positions = u64::from(start.positions);
        self.reserved += positions;
        self.requests.insert(
            request,
            Request {
                cache,
                sampler,
                guide,
                logprobs: start.logprobs,
                origin: start.origin.clone(),
                link,
                positions,
                expecting: false,
                group: 0,
                embedding: start.embed.then(MeanPool::default),
                prompt_logprobs: start
                    .prompt_logprobs
                    .filter(|_| self.last)
                    .map(|top| (top, start.prompt.clone())),
                _active: ActiveGuard::new(&self.spec.active),
            },
        );
        true
    }

    /// The sampler of a request that starts on this (last) stage, and its grammar walked
    /// through the tokens it generated before, if it has one.
    fn sampling_state(&self, start: &RequestStart) -> Result<(Sampler, Option<Guide>), String> {
        let sampler = Sampler::new(start.sampling)
            .and_then(|s| s.with_penalties(start.penalties.clone(), &start.generated))
            .map_err(|e| e.to_string())?;
        let guide = match &start.constraint {
            None => None,
            Some(constraint) => {
                let mut guide = self
                    .spec
                    .grammars
                    .guide(constraint)
                    .map_err(|e| format!("compiling the request's grammar: {e}"))?;
                guide
                    .replay(&start.generated)
                    .map_err(|e| format!("replaying the request's tokens: {e}"))?;
                Some(guide)
            }
        };
        Ok((sampler, guide))
    }

    /// Drops the waiting work of a request that cannot start, telling its origin why and
    /// the later stages that it is over.
    fn drop_waiting(
        &mut self,
        request: RequestId,
        origin: NodeId,
        kind: FailureKind,
        reason: String,
    ) {
        self.waiting.remove(&request);
        let mut out = Output::default();
        out.deliveries
            .entry(origin)
            .or_default()
            .push(TokenOut::Failed {
                request,
                failure: self.failure(kind, reason),
            });
        if !self.last {
            out.entries.push(StepEntry::end(request));
        }
        self.send(out);
    }

    fn remove(&mut self, request: RequestId) -> Option<Request> {
        let state = self.requests.remove(&request)?;
        self.reserved = self.reserved.saturating_sub(state.positions);
        Some(state)
    }

    /// [`Worker::step`], with a panic (a bug) failing the requests in hand at once, naming it,
    /// instead of ending the thread and leaving them to wait for a token that never comes.
    /// The shard is not changed by a step, so the worker goes on with new requests.
    fn guarded_step(&mut self) {
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())).err();
        let Some(payload) = panicked else { return };
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        // Who to tell: the requests held (a step keeps them in `requests` throughout), and
        // those still waiting to start.
        let held: HashMap<RequestId, NodeId> = self
            .requests
            .iter()
            .map(|(id, r)| (*id, r.origin.clone()))
            .chain(self.waiting.iter().filter_map(|(id, queue)| {
                let start = queue.front()?.start.as_ref()?;
                Some((*id, start.origin.clone()))
            }))
            .collect();
        tracing::error!(
            stage = self.spec.index,
            requests = held.len(),
            panic = %what,
            "a step of this stage panicked; failing the requests it held"
        );
        let reason =
            format!("this stage's worker failed ({what}); this is a bug, please report it");
        let mut out = Output::default();
        for (request, origin) in held {
            out.deliveries
                .entry(origin)
                .or_default()
                .push(TokenOut::Failed {
                    request,
                    failure: self.failure(FailureKind::Failed, reason.clone()),
                });
            if !self.last {
                out.entries.push(StepEntry::end(request));
            }
        }
        self.requests.clear();
        self.reserved = 0;
        self.waiting.clear();
        self.order.clear();
        self.send(out);
    }

    /// One step: every chosen piece through the shard at once.
    fn step(&mut self) {
        let pieces = self.choose();
        if pieces.is_empty() {
            return;
        }
        let mut out = Output::default();
        // Pieces whose request is no longer here only pass their end on.
        let mut live: Vec<Piece> = Vec::with_capacity(pieces.len());
        for piece in pieces {
            if self.requests.contains_key(&piece.request) {
                live.push(piece);
            } else if piece.work.end && !self.last {
                out.entries.push(StepEntry::end(piece.request));
            }
        }
        // Each piece must start where its request's cache ends.
        let mut runnable: Vec<Piece> = Vec::with_capacity(live.len());
        for piece in live {
            let held = self
                .requests
                .get(&piece.request)
                .map_or(0, |r| r.cache.len());
            if piece.rows > 0 && piece.work.position as usize != held {
                let reason = format!(
                    "request {} sent position {} but this stage holds {held} of its positions",
                    piece.request, piece.work.position
                );
                let failure = self.failure(FailureKind::Failed, reason);
                self.fail(piece.request, failure, &mut out);
            } else if piece.rows > 0 && held + piece.rows > self.spec.shard.max_positions() {
                let reason = format!(
                    "request {} would hold {} positions; the model's context is {}",
                    piece.request,
                    held + piece.rows,
                    self.spec.shard.max_positions()
                );
                let failure = self.failure(FailureKind::Failed, reason);
                self.fail(piece.request, failure, &mut out);
            } else {
                runnable.push(piece);
            }
        }
        let started = std::time::Instant::now();
        let computed = self.compute(&runnable, &mut out);
        let stats = &self.spec.stats;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.rows.fetch_add(
            runnable.iter().map(|p| p.rows as u64).sum(),
            Ordering::Relaxed,
        );
        stats
            .pieces
            .fetch_add(runnable.len() as u64, Ordering::Relaxed);
        stats
            .max_batch
            .fetch_max(runnable.len() as u64, Ordering::Relaxed);
        self.last_step = started.elapsed();
        self.steps += 1;
        let took = self.last_step.as_micros() as u64;
        stats.busy_us.fetch_add(took, Ordering::Relaxed);
        if !runnable.is_empty() && runnable.iter().all(|p| p.rows <= 1) {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats.decode_us.fetch_add(took, Ordering::Relaxed);
        }
        if let Err(reason) = computed {
            // A failure of the whole step fails every request in it.
            for piece in &runnable {
                let failure = self.failure(FailureKind::Failed, reason.clone());
                self.fail(piece.request, failure, &mut out);
            }
        } else {
            let group = self.steps;
            for piece in &runnable {
                if piece.work.end {
                    self.remove(piece.request);
                } else if let Some(request) = self.requests.get_mut(&piece.request) {
                    // A piece that samples is followed by the request's next token (an
                    // embedding's last piece by nothing).
                    request.expecting = piece.work.sample
                        && request.embedding.is_none()
                        && !self.waiting.contains_key(&piece.request);
                    request.group = group;
                }
            }
        }
        self.send(out);
    }

    /// Runs the pieces' rows through the shard in one batch and records what they produce.
    fn compute(&mut self, pieces: &[Piece], out: &mut Output) -> Result<(), String> {
        if pieces.is_empty() {
            return Ok(());
        }
        let shard = Arc::clone(&self.spec.shard);
        let hidden = shard.hidden_size();
        // The step's rows, one request after another.
        self.x.clear();
        if shard.has_embedding() {
            self.tokens.clear();
            for piece in pieces {
                if let WorkInput::Tokens(ids) = &piece.work.input {
                    self.tokens.extend_from_slice(ids);
                }
            }
            if !self.tokens.is_empty() {
                shard
                    .embed_into(&self.tokens, &mut self.x)
                    .map_err(|e| e.to_string())?;
            }
        } else {
            for piece in pieces {
                if let WorkInput::Hidden(values) = &piece.work.input {
                    self.x.extend_from_slice(values);
                }
            }
        }
        let total: usize = pieces.iter().map(|p| p.rows).sum();
        if self.x.len() != total * hidden {
            return Err(format!(
                "the step's input holds {} values for {total} rows of {hidden}",
                self.x.len()
            ));
        }
        if total > 0 {
            // The pieces' caches, in the pieces' order, borrowed where they are (so that a
            // panic mid-step leaves every request in `requests`, for `guarded_step` to fail).
            let mut batch: Vec<(usize, (&mut KvCache, usize))> = self
                .requests
                .iter_mut()
                .filter_map(|(id, r)| {
                    let at = pieces.iter().position(|p| p.request == *id)?;
                    Some((at, (&mut r.cache, pieces[at].rows)))
                })
                .collect();
            if let Some(gone) = pieces
                .iter()
                .enumerate()
                .find(|(i, _)| !batch.iter().any(|(at, _)| at == i))
            {
                return Err(format!("request {} left the step", gone.1.request));
            }
            batch.sort_unstable_by_key(|(at, _)| *at);
            let mut batch: Vec<(&mut KvCache, usize)> = batch.into_iter().map(|(_, b)| b).collect();
            // Tests: a panic with the caches borrowed, the worst moment for one.
            #[cfg(test)]
            #[allow(clippy::panic)]
            if std::mem::take(&mut self.panic_next_step) {
                panic!("a test asked this step to panic");
            }
            let result = shard.forward_batch(&mut self.x, &mut batch);
            result.map_err(|e| e.to_string())?;
        }
        if !self.last {
            out.values.extend_from_slice(&self.x);
            for piece in pieces {
                out.entries.push(StepEntry {
                    request: piece.request,
                    position: piece.work.position,
                    rows: piece.rows as u32,
                    sample: piece.work.sample,
                    start: piece.work.start.clone(),
                    end: piece.work.end,
                });
            }
            return Ok(());
        }
        // The last stage. Requests that embed pool their rows after the final norm; the last
        // piece of the prompt delivers the embedding.
        let mut row = 0usize;
        let mut unsampled: Vec<(RequestId, String)> = Vec::new();
        for piece in pieces {
            let rows = row..row + piece.rows;
            row += piece.rows;
            let Some(request) = self.requests.get_mut(&piece.request) else {
                continue;
            };
            let Some(pooled) = request.embedding.as_mut() else {
                continue;
            };
            if piece.rows > 0 {
                shard
                    .final_norm_rows(
                        &self.x[rows.start * hidden..rows.end * hidden],
                        &mut self.normed,
                    )
                    .map_err(|e| e.to_string())?;
                pooled.add(&self.normed, hidden);
            }
            if piece.work.sample {
                match pooled.embedding() {
                    Some(values) => out
                        .deliveries
                        .entry(request.origin.clone())
                        .or_default()
                        .push(TokenOut::Embedding {
                            request: piece.request,
                            values,
                        }),
                    None => unsampled.push((
                        piece.request,
                        format!(
                            "the embedding of {} positions has no direction (zero or not finite)",
                            pooled.rows()
                        ),
                    )),
                }
            }
        }
        // Requests that score their prompt: each row's logits against the prompt's next token,
        // sent before the request's first token.
        let mut row = 0usize;
        for piece in pieces {
            let rows = row..row + piece.rows;
            row += piece.rows;
            let Some(request) = self.requests.get_mut(&piece.request) else {
                continue;
            };
            let Some((top, prompt)) = request.prompt_logprobs.as_ref() else {
                continue;
            };
            // The row at position q scores the token at q + 1, while that is a prompt token.
            let first = piece.work.position as usize;
            let scored = prompt.len().saturating_sub(first + 1).min(piece.rows);
            if scored == 0 {
                continue;
            }
            let mut entries = Vec::with_capacity(scored);
            for start in (0..scored).step_by(PROMPT_SCORE_ROWS) {
                let n = PROMPT_SCORE_ROWS.min(scored - start);
                let at = (rows.start + start) * hidden;
                shard
                    .logits_rows(
                        &self.x[at..at + n * hidden],
                        &mut request.cache,
                        &mut self.logits,
                    )
                    .map_err(|e| e.to_string())?;
                let vocab = self.logits.len() / n;
                for (i, logits) in self.logits.chunks_exact(vocab.max(1)).enumerate() {
                    let target = prompt[first + start + i + 1];
                    let (lse, top) = exo_shard::log_probabilities(logits, *top as usize);
                    entries.push(TokenLogprob {
                        logprob: logits
                            .get(target as usize)
                            .map_or(f32::NEG_INFINITY, |l| l - lse),
                        top,
                    });
                }
            }
            out.deliveries
                .entry(request.origin.clone())
                .or_default()
                .push(TokenOut::PromptLogprobs {
                    request: piece.request,
                    position: (first + 1) as u32,
                    entries,
                });
        }
        // Logits of each sampling request's last row, in one batch.
        self.sample_rows.clear();
        let mut sampling: Vec<&Piece> = Vec::new();
        let mut row = 0usize;
        for piece in pieces {
            row += piece.rows;
            let embeds = self
                .requests
                .get(&piece.request)
                .is_some_and(|r| r.embedding.is_some());
            if piece.work.sample && piece.rows > 0 && !embeds {
                self.sample_rows
                    .extend_from_slice(&self.x[(row - 1) * hidden..row * hidden]);
                sampling.push(piece);
            }
        }
        if sampling.is_empty() {
            for (request, reason) in unsampled {
                let failure = self.failure(FailureKind::Failed, reason);
                self.fail(request, failure, out);
            }
            return Ok(());
        }
        let Some(first) = self.requests.get_mut(&sampling[0].request) else {
            return Err("a sampling request left the step".to_owned());
        };
        shard
            .logits_rows(&self.sample_rows, &mut first.cache, &mut self.logits)
            .map_err(|e| e.to_string())?;
        let vocab = self.logits.len() / sampling.len();
        // A request whose logits cannot be sampled (NaN from a broken-down model) fails alone;
        // the failure names this stage and its layers, the last that computed its logits.
        for (piece, logits) in sampling
            .iter()
            .zip(self.logits.chunks_exact_mut(vocab.max(1)))
        {
            let Some(request) = self.requests.get_mut(&piece.request) else {
                continue;
            };
            let Some(sampler) = request.sampler.as_mut() else {
                return Err("the last stage has no sampler".to_owned());
            };
            sampler.penalize(logits);
            // The model's distribution as the request adjusted it, before the grammar's mask
            // (a token the grammar allows keeps its logit).
            let distribution = request
                .logprobs
                .map(|top| exo_shard::log_probabilities(logits, top as usize));
            let sampled = match request.guide.as_mut() {
                None => sampler.sample(logits).map_err(|e| e.to_string()),
                Some(guide) => guide
                    .restrict(logits)
                    .map_err(|e| e.to_string())
                    .and_then(|()| sampler.sample(logits).map_err(|e| e.to_string()))
                    .and_then(|token| {
                        guide.accept(token).map_err(|e| e.to_string())?;
                        Ok(token)
                    }),
            };
            let token = match sampled {
                Ok(token) => token,
                Err(e) => {
                    let at = piece.work.position + piece.rows as u32;
                    unsampled.push((piece.request, format!("sampling position {at}: {e}")));
                    continue;
                }
            };
            out.deliveries
                .entry(request.origin.clone())
                .or_default()
                .push(TokenOut::Token {
                    request: piece.request,
                    token,
                    position: piece.work.position + piece.rows as u32,
                    logprob: distribution.map(|(lse, top)| TokenLogprob {
                        logprob: logits
                            .get(token as usize)
                            .map_or(f32::NEG_INFINITY, |l| l - lse),
                        top,
                    }),
                });
        }
        for (request, reason) in unsampled {
            let failure = self.failure(FailureKind::Failed, reason);
            self.fail(request, failure, out);
        }
        Ok(())
    }

    /// Ends `request` here with `failure`, tells its origin, and frees it on later stages.
    fn fail(&mut self, request: RequestId, failure: StageFailure, out: &mut Output) {
        tracing::debug!(%request, %failure, "request failed on this stage");
        self.waiting.remove(&request);
        if let Some(state) = self.remove(request) {
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
            .chain(
                self.waiting
                    .iter()
                    .filter(|(_, q)| q.front().is_some_and(|w| w.link == link))
                    .map(|(id, _)| *id),
            )
            .collect();
        if ended.is_empty() {
            return;
        }
        tracing::debug!(requests = ended.len(), "a link closed; ending its requests");
        let mut out = Output::default();
        for request in ended {
            self.waiting.remove(&request);
            self.remove(request);
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
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for request in ids {
            self.waiting.remove(&request);
            if let Some(state) = self.remove(request) {
                out.deliveries
                    .entry(state.origin)
                    .or_default()
                    .push(TokenOut::Failed {
                        request,
                        failure: failure.clone(),
                    });
            }
        }
        self.deliver(out.deliveries);
    }

    /// Sends what a step produced: activations on, deliveries to origins.
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
        let hidden = self.hidden();
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
                let gone: Vec<RequestId> = self
                    .requests
                    .iter()
                    .filter(|(_, r)| r.origin == origin)
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.waiting.remove(&id);
                    self.remove(id);
                    abandoned.push(id);
                }
            }
        }
        abandoned
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use exo_core::{LayerRange, SamplingParams};
    use exo_model::{Checkpoint, ShardSpec};
    use exo_shard::Weights;

    use super::*;

    fn worker(kv_positions: Option<u64>, step_rows: usize) -> (Worker, Arc<Inboxes>, Epoch) {
        first_stage(kv_positions, step_rows, 1, false)
    }

    /// The first stage of a plan of `stages` stages (the last too when there is one), with the
    /// gathering timer when `gathers`.
    fn first_stage(
        kv_positions: Option<u64>,
        step_rows: usize,
        stages: usize,
        gathers: bool,
    ) -> (Worker, Arc<Inboxes>, Epoch) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let config = exo_model::testing::tiny_config(2);
        exo_model::testing::write_gguf(&path, &config, 3).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        let device = exo_shard::BackendKind::Flex.device().unwrap();
        let shard =
            LlamaShard::load_with(&checkpoint, &ShardSpec::whole(2), &device, Weights::Stored)
                .unwrap();
        let epoch = Epoch::from_hash(5);
        let spec = WorkerSpec {
            node: NodeId::from("me"),
            epoch,
            index: 0,
            stages: vec![
                Stage {
                    node: NodeId::from("me"),
                    endpoint: String::new(),
                    layers: LayerRange::new(0, 2),
                };
                stages
            ],
            shard: Arc::new(shard),
            active: Arc::default(),
            step_rows,
            kv_positions,
            stats: Arc::default(),
            grammars: Arc::new(ModelGrammars::new(
                checkpoint.tokenizer().unwrap(),
                config.eos_token_ids.clone(),
            )),
        };
        let timer = gathers.then(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        });
        let mut w = Worker {
            last: stages == 1,
            spec,
            downstream: None,
            requests: HashMap::new(),
            waiting: HashMap::new(),
            order: VecDeque::new(),
            reserved: 0,
            subscribers: HashMap::new(),
            retiring: false,
            x: Vec::new(),
            tokens: Vec::new(),
            sample_rows: Vec::new(),
            logits: Vec::new(),
            normed: Vec::new(),
            timer,
            steps: 0,
            last_step: Duration::ZERO,
            panic_next_step: false,
        };
        let inboxes = Arc::new(Inboxes::default());
        w.subscribers.insert(
            NodeId::from("me"),
            DeliverySink::Local(Arc::clone(&inboxes)),
        );
        (w, inboxes, epoch)
    }

    fn start(request: u64, rows: u32, positions: u32) -> StepFrame {
        let mut entry = StepEntry::rows(RequestId(request), 0, rows, true);
        entry.start = Some(RequestStart {
            logprobs: None,
            penalties: Default::default(),
            constraint: None,
            generated: Vec::new(),
            embed: false,
            prompt_logprobs: None,
            prompt: Vec::new(),
            origin: NodeId::from("me"),
            sampling: SamplingParams::greedy(),
            positions,
            sampled: 0,
            fork: None,
        });
        StepFrame {
            entries: vec![entry],
            input: StepInput::Tokens((0..rows).map(|i| 3 + i).collect()),
        }
    }

    fn end(request: u64) -> StepFrame {
        StepFrame {
            entries: vec![StepEntry::end(RequestId(request))],
            input: StepInput::Tokens(Vec::new()),
        }
    }

    #[tokio::test]
    async fn a_request_waits_until_its_keys_and_values_fit_then_runs() {
        // Room for 60 positions: one request reserving 50 at a time.
        let (mut w, inboxes, epoch) = worker(Some(60), 64);
        let mut a = inboxes.open(RequestId(1), epoch);
        let mut b = inboxes.open(RequestId(2), epoch);
        w.enqueue(1, start(1, 4, 50));
        w.enqueue(1, start(2, 4, 50));
        w.step();
        assert!(matches!(
            a.recv().await,
            Some(TokenOut::Token { position: 4, .. })
        ));
        assert_eq!(w.requests.len(), 1, "the second request waits");
        assert_eq!(w.spec.active.load(Ordering::Relaxed), 1);
        assert!(
            !w.runnable(),
            "nothing can run until the first request ends"
        );
        w.enqueue(1, end(1));
        w.step();
        assert!(w.runnable());
        w.step();
        assert!(matches!(
            b.recv().await,
            Some(TokenOut::Token { position: 4, .. })
        ));
        assert_eq!(w.requests.len(), 1);
        assert_eq!(
            w.reserved, 50,
            "what the first request reserved was given back"
        );
    }

    #[tokio::test]
    async fn a_fork_starts_from_its_parents_keys_and_values_or_is_refused() {
        let (mut w, inboxes, epoch) = worker(None, 64);
        let mut a = inboxes.open(RequestId(1), epoch);
        let mut b = inboxes.open(RequestId(2), epoch);
        let mut c = inboxes.open(RequestId(3), epoch);
        // The parent: tokens 3..=7 at positions 0..5.
        w.enqueue(1, start(1, 5, 64));
        w.step();
        let Some(TokenOut::Token {
            token, position, ..
        }) = a.recv().await
        else {
            panic!("no token")
        };
        assert_eq!(position, 5);
        // A choice of the same prompt: the parent's first four positions, then its last
        // prompt token.
        let forked = |request: u64, parent: u64| {
            let mut frame = start(request, 1, 64);
            frame.entries[0].position = 4;
            if let Some(s) = &mut frame.entries[0].start {
                s.fork = Some(exo_core::Fork {
                    parent: RequestId(parent),
                    positions: 4,
                });
            }
            frame.input = StepInput::Tokens(vec![7]);
            frame
        };
        w.enqueue(1, forked(2, 1));
        w.step();
        assert_eq!(
            b.recv().await,
            Some(TokenOut::Token {
                request: RequestId(2),
                token,
                position: 5,
                logprob: None,
            })
        );
        // A fork of a request this stage does not hold is refused, so that its origin sends
        // the whole prompt.
        w.enqueue(1, forked(3, 9));
        w.step();
        let Some(TokenOut::Failed { failure, .. }) = c.recv().await else {
            panic!("not refused")
        };
        assert_eq!(failure.kind, FailureKind::Refused, "{failure}");
        assert!(
            failure.reason.contains(&RequestId(9).to_string()),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn a_long_prompt_is_cut_into_budgeted_pieces_while_decode_goes_on() {
        // 8 rows per step: a 20-token prompt takes three steps; the decoding request's
        // token goes in every step.
        let (mut w, inboxes, epoch) = worker(None, 8);
        let mut a = inboxes.open(RequestId(1), epoch);
        let mut b = inboxes.open(RequestId(2), epoch);
        w.enqueue(1, start(1, 2, 64));
        w.step();
        let Some(TokenOut::Token { token, .. }) = a.recv().await else {
            panic!("no token")
        };
        w.enqueue(1, start(2, 20, 64));
        let decode = |position| StepFrame {
            entries: vec![StepEntry::rows(RequestId(1), position, 1, true)],
            input: StepInput::Tokens(vec![token]),
        };
        for (step, position) in (2..5).enumerate() {
            w.enqueue(1, decode(position));
            w.step();
            assert!(
                matches!(a.recv().await, Some(TokenOut::Token { .. })),
                "the decoding request got its token in step {step}"
            );
        }
        // The prompt's last piece sampled: its token arrives once, after all 20 rows.
        assert!(matches!(
            b.recv().await,
            Some(TokenOut::Token { position: 20, .. })
        ));
        let stats = &w.spec.stats;
        assert_eq!(stats.max_batch.load(Ordering::Relaxed), 2);
        assert_eq!(stats.rows.load(Ordering::Relaxed), 2 + 3 + 20);
    }

    #[tokio::test]
    async fn a_step_that_panics_fails_its_requests_at_once_and_the_worker_goes_on() {
        let (mut w, inboxes, epoch) = worker(None, 64);
        let mut a = inboxes.open(RequestId(1), epoch);
        let mut b = inboxes.open(RequestId(2), epoch);
        w.enqueue(1, start(1, 3, 64));
        w.panic_next_step = true;
        w.guarded_step();
        let Some(TokenOut::Failed { failure, .. }) = a.recv().await else {
            panic!("request 1 was not failed")
        };
        assert!(
            failure.reason.contains("a test asked this step to panic"),
            "{failure}"
        );
        assert!(w.requests.is_empty() && w.waiting.is_empty());
        assert_eq!(w.spec.active.load(Ordering::Relaxed), 0);
        // A new request runs as if nothing had happened.
        w.enqueue(1, start(2, 3, 64));
        w.guarded_step();
        assert!(matches!(
            b.recv().await,
            Some(TokenOut::Token { position: 3, .. })
        ));
    }

    #[tokio::test]
    async fn an_end_drops_the_prompt_still_queued_so_abandoned_work_stops() {
        // 8 rows per step: a 40-row prompt in two frames; after one step the caller goes.
        let (mut w, inboxes, epoch) = worker(None, 8);
        let _a = inboxes.open(RequestId(1), epoch);
        let mut first = start(1, 20, 64);
        first.entries[0].sample = false;
        w.enqueue(1, first);
        w.enqueue(
            1,
            StepFrame {
                entries: vec![StepEntry::rows(RequestId(1), 20, 20, true)],
                input: StepInput::Tokens((0..20).map(|i| 3 + i).collect()),
            },
        );
        w.step();
        assert_eq!(w.spec.stats.rows.load(Ordering::Relaxed), 8);
        w.enqueue(1, end(1));
        let mut steps = 0;
        while w.runnable() && steps < 10 {
            w.step();
            steps += 1;
        }
        assert_eq!(steps, 1, "only the end itself ran");
        assert_eq!(
            w.spec.stats.rows.load(Ordering::Relaxed),
            8,
            "no row of the abandoned prompt was computed after the end"
        );
        assert!(w.requests.is_empty() && w.waiting.is_empty());
        assert_eq!(w.spec.active.load(Ordering::Relaxed), 0);
    }

    fn decode(request: u64, position: u32) -> StepFrame {
        StepFrame {
            entries: vec![StepEntry::rows(RequestId(request), position, 1, true)],
            input: StepInput::Tokens(vec![5]),
        }
    }

    /// A runtime for the tests' own receives: the worker blocks (its gathering timer, its
    /// sends downstream), so it must not run inside one.
    fn receiver() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn the_first_stage_waits_for_tokens_on_their_way_back_so_they_share_a_step() {
        let rt = receiver();
        let (mut w, inboxes, epoch) = first_stage(None, 64, 1, true);
        let mut inbox: Vec<_> = (1..=3).map(|r| inboxes.open(RequestId(r), epoch)).collect();
        for r in 1..=3 {
            w.enqueue(1, start(r, 2, 64));
        }
        w.step();
        for i in &mut inbox {
            assert!(matches!(
                rt.block_on(i.recv()),
                Some(TokenOut::Token { position: 2, .. })
            ));
        }
        // Two tokens are back; the third is still in the queue when the step would start (in
        // the node, a moment away: the origin sends it after reading its token).
        w.enqueue(1, decode(1, 2));
        w.enqueue(1, decode(2, 2));
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(WorkerMsg::Frame {
            link: 1,
            frame: decode(3, 2),
        })
        .unwrap();
        assert_eq!(w.batch_shape().ready, 2);
        assert!(w.gather(&mut rx));
        assert_eq!(w.batch_shape().ready, 3);
        w.step();
        assert_eq!(
            w.spec.stats.max_batch.load(Ordering::Relaxed),
            3,
            "the late token joined the step"
        );
        // Request 1 ends; the tokens of 2 and 3 are out but never come back: the wait ends at
        // its bound.
        w.enqueue(1, end(1));
        let (_tx, mut rx) = mpsc::unbounded_channel::<WorkerMsg>();
        let waited = Instant::now();
        assert!(w.gather(&mut rx));
        assert!(waited.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn on_a_longer_plan_the_first_stage_keeps_one_group_of_decode_tokens_per_stage() {
        let rt = receiver();
        // The first of two stages, with four decoding requests: two per step.
        let (mut w, _inboxes, _epoch) = first_stage(None, 64, 2, true);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (sink, mut delivered) = mpsc::unbounded_channel();
        w.subscribers
            .insert(NodeId::from("me"), DeliverySink::Remote(sink));
        let (down, mut frames) = mpsc::channel(16);
        w.downstream = Some(down);
        drop(tx);
        for r in 1..=4 {
            w.enqueue(1, start(r, 2, 64));
        }
        w.step();
        let prompt = rt.block_on(frames.recv()).unwrap();
        assert_eq!(prompt.entries.len(), 4, "prompts are not split into groups");
        for r in 1..=4 {
            w.enqueue(1, decode(r, 2));
        }
        assert!(w.gather(&mut rx), "four ready, nothing expected: no wait");
        w.step();
        assert_eq!(rt.block_on(frames.recv()).unwrap().entries.len(), 2);
        w.step();
        assert_eq!(rt.block_on(frames.recv()).unwrap().entries.len(), 2);
        assert!(!w.runnable());
        assert!(
            delivered.try_recv().is_err(),
            "the first stage samples nothing"
        );
    }
}
