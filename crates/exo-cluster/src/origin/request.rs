//! One request at its origin, as a state machine: routed to a plan, prefilling the prompt in
//! chunks, decoding a token at a time, then finished, cancelled or failed. It owns the
//! request's journal (prompt ids, generated ids, positions), and when a stage is lost or stops
//! answering it resumes: it waits for a plan without that stage and replays the journal there
//! (prompt and generated tokens in one prefill, the sampler's draws skipped), so the caller's
//! stream goes on after a pause, with no text lost or repeated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exo_core::{
    FailureKind, FinishReason, Finished, Fork, GenerationError, GenerationEvent, Logprob, NodeId,
    OutputConstraint, Penalties, PromptLogprobs, RequestId, RequestStart, SamplingParams,
    StageFailure, StepEntry, StepFrame, StepInput, TokenLogprob, TokenOut,
};
use exo_model::Detokenizer;
use tokio::sync::mpsc;

use crate::inbox::Inbox;
use crate::origin::route::Route;
use crate::origin::{OriginModel, Origins, Share};
use crate::plan::PlanState;

/// Where a request stands.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum State {
    /// Routed to a plan; nothing sent yet.
    Routed,
    /// Sending the prompt (and, when resumed, the tokens generated so far); `sent` of them are
    /// on their way.
    Prefilling { sent: usize },
    /// Generating, one token per step.
    Decoding,
    /// A stage was lost or stopped answering: waiting for a plan without it, to replay the
    /// journal there.
    Resuming(StageFailure),
    /// Done, for this reason.
    Finished(FinishReason),
    /// The caller went away.
    Cancelled,
    /// A stage or the route failed, and the request could not go on.
    Failed(GenerationError),
}

impl State {
    fn is_over(&self) -> bool {
        matches!(
            self,
            State::Finished(_) | State::Cancelled | State::Failed(_)
        )
    }
}

/// The request's history: enough to run it again from the start.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Journal {
    /// The prompt's token ids (templated and tokenized once, at admission).
    pub(crate) prompt: Vec<u32>,
    /// Every generated id so far.
    pub(crate) generated: Vec<u32>,
}

impl Journal {
    /// Positions the stages hold for the request once its last step is computed.
    fn positions(&self) -> u32 {
        (self.prompt.len() + self.generated.len()) as u32
    }

    /// What a (re)start sends: the prompt, then every token generated so far.
    fn replay(&self) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.prompt.len() + self.generated.len());
        ids.extend_from_slice(&self.prompt);
        ids.extend_from_slice(&self.generated);
        ids
    }
}

/// When a request gives up on a stage, and how long it waits for a plan without it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResumePolicy {
    /// The least time without a token before the route is declared stalled. The bound grows
    /// with the measured time between tokens (20 times it) and, before the first token, with
    /// the rows being prefilled (one more floor per 1024 rows).
    pub(crate) stall_floor: Duration,
    /// How long a request waits for a plan without the failed stage before it ends with an
    /// error naming why.
    pub(crate) within: Duration,
    /// The most times one request resumes.
    pub(crate) max_resumes: u32,
}

impl Default for ResumePolicy {
    fn default() -> Self {
        ResumePolicy {
            stall_floor: Duration::from_secs(10),
            within: Duration::from_secs(20),
            max_resumes: 8,
        }
    }
}

/// How long a request refused by a stage waits before it tries again.
const REFUSED_PAUSE: Duration = Duration::from_millis(500);

/// Failures a replay on another plan can get past: the node is gone, silent or holds another
/// plan. A step that failed on a node (a computation error) would fail again.
fn resumable(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::Lost | FailureKind::Unresponsive | FailureKind::Refused
    )
}

/// Everything one request needs to run.
#[derive(Debug)]
pub(crate) struct RequestTask {
    pub(crate) id: RequestId,
    pub(crate) origin: NodeId,
    pub(crate) origins: Arc<Origins>,
    pub(crate) model: Arc<OriginModel>,
    pub(crate) route: Arc<Route>,
    pub(crate) inbox: Inbox,
    pub(crate) journal: Journal,
    pub(crate) sampling: SamplingParams,
    pub(crate) constraint: Option<OutputConstraint>,
    pub(crate) penalties: Penalties,
    pub(crate) logprobs: Option<u32>,
    /// The request asks for its prompt's embedding instead of tokens.
    pub(crate) embed: bool,
    /// The request asks for its prompt tokens' log-probabilities, with this many alternatives.
    pub(crate) prompt_logprobs: Option<u32>,
    /// Those received so far, for the prompt's positions from 1 on.
    pub(crate) prompt_scores: Vec<TokenLogprob>,
    /// They went to the caller (a resumed request does not ask again).
    pub(crate) prompt_scores_sent: bool,
    pub(crate) max_tokens: usize,
    pub(crate) stop: Vec<String>,
    pub(crate) ignore_eos: bool,
    pub(crate) events: mpsc::Sender<Result<GenerationEvent, GenerationError>>,
    pub(crate) started: Instant,
    pub(crate) policy: ResumePolicy,
    /// Mean time between two tokens, seconds (exponentially weighted), once measured.
    pub(crate) gap_s: Option<f64>,
    /// The request was lost on a route whose stages all answer: it may be replayed on the
    /// same plan.
    pub(crate) replay_in_place: bool,
    /// Its part among choices that share their prompt.
    pub(crate) share: Option<Share>,
}

/// Stall bounds in a row without a token, every stage answering, after which the request
/// counts as lost on the way (a step dropped somewhere) and is replayed.
const QUIET_BOUNDS: u32 = 3;

impl RequestTask {
    /// Runs the request to its end and tells the caller how it ended.
    pub(crate) async fn run(mut self) {
        let mut first_token_at = None;
        let model = Arc::clone(&self.model);
        let mut text = Detokenizer::new(
            &model.tokenizer,
            &model.eos,
            &self.stop,
            self.ignore_eos,
            self.max_tokens,
        );
        let mut resumes = 0;
        let mut fork = self.fork().await;
        let state = loop {
            let running = self.route.enter();
            // Only the first attempt starts from another request's keys and values; a resumed
            // request sends its whole journal.
            let forked = fork.is_some();
            let mut state = self.prefill(State::Routed, fork.take()).await;
            if state == State::Decoding {
                state = self.decode(&mut text, &mut first_token_at).await;
            }
            // However it ended, the stages free the request's state (those that can still
            // hear it; the others drop it with the link that brought it).
            self.send(vec![StepEntry::end(self.id)], Vec::new()).await;
            drop(running);
            let failure = match state {
                State::Failed(GenerationError::StageFailed(f))
                    if resumable(f.kind)
                        && resumes < self.policy.max_resumes
                        && !self.events.is_closed() =>
                {
                    f
                }
                other => break other,
            };
            resumes += 1;
            // A stage that refuses a fork no longer holds the first choice's keys and values
            // (it admitted this choice only after the first had ended, for lack of memory):
            // nothing is wrong with the plan, and the whole prompt goes at once.
            let lost_fork = forked && failure.kind == FailureKind::Refused;
            if lost_fork {
                tracing::info!(
                    request = %self.id, %failure,
                    "the prompt this choice shares is gone from a stage; sending all of it"
                );
            } else {
                tracing::warn!(
                    request = %self.id, %failure, generated = self.journal.generated.len(),
                    "resuming the request (on a plan without the failed stage, or the same \
                     plan after a refusal)"
                );
            }
            match self.resume(State::Resuming(failure), lost_fork).await {
                State::Routed => {}
                other => break other,
            }
        };
        if let Some(Share::Parent { key, .. }) = &self.share {
            self.origins.unshare(*key, self.id);
        }
        let first = first_token_at.unwrap_or_else(Instant::now);
        match state {
            State::Finished(reason) => {
                let finished = Finished {
                    reason,
                    prompt_tokens: self.journal.prompt.len() as u32,
                    token_ids: std::mem::take(&mut self.journal.generated),
                    time_to_first_token_s: first.duration_since(self.started).as_secs_f64(),
                    decode_s: first.elapsed().as_secs_f64(),
                };
                let _ = self
                    .events
                    .send(Ok(GenerationEvent::Finished(finished)))
                    .await;
            }
            State::Failed(e) => {
                if !self.events.is_closed() {
                    tracing::warn!(request = %self.id, error = %e, "request failed");
                }
                let _ = self.events.send(Err(e)).await;
            }
            State::Cancelled => {
                tracing::debug!(request = %self.id, "request cancelled by its caller");
            }
            ref unfinished => {
                debug_assert!(unfinished.is_over(), "{unfinished:?}");
            }
        }
    }

    /// For a choice that shares its prompt with an earlier one: waits until that one's prompt
    /// is computed on every stage, and says where to start from; `None` if it ended first (or
    /// the caller left), and for any other request.
    async fn fork(&mut self) -> Option<Fork> {
        let Some(Share::Child { parent, ready }) = &mut self.share else {
            return None;
        };
        let parent = *parent;
        let computed = tokio::select! {
            computed = ready.wait_for(|r| *r) => computed.is_ok(),
            () = self.events.closed() => false,
        };
        self.share = None;
        computed.then(|| Fork {
            parent,
            positions: self.journal.prompt.len().saturating_sub(1) as u32,
        })
    }

    /// Sends `entries` with token rows `ids` to the first stage; `false` when the link is gone.
    async fn send(&self, entries: Vec<StepEntry>, ids: Vec<u32>) -> bool {
        let frame = StepFrame {
            entries,
            input: StepInput::Tokens(ids),
        };
        self.route.first().send(frame).await
    }

    fn failure_at(&self, index: usize, kind: FailureKind, reason: String) -> StageFailure {
        let stage = &self.route.plan.stages[index];
        StageFailure {
            node: stage.node.clone(),
            stage: index as u32,
            layers: stage.layers,
            epoch: self.route.epoch(),
            kind,
            reason,
        }
    }

    fn link_lost(&self) -> State {
        let failure = self.route.broken().unwrap_or_else(|| {
            self.failure_at(
                0,
                FailureKind::Lost,
                "the link to the first stage is closed".to_owned(),
            )
        });
        State::Failed(GenerationError::StageFailed(failure))
    }

    /// Sends the journal (the prompt, and the tokens generated before a resume) in chunks (no
    /// frame outgrows the limits); the last one samples. With a `fork`, the stages start from
    /// another request's keys and values, and only the rows after them are sent.
    async fn prefill(&mut self, mut state: State, fork: Option<Fork>) -> State {
        debug_assert_eq!(state, State::Routed);
        let chunk = self.model.prefill_chunk.max(1);
        let ids = self.journal.replay();
        // Prompt scores not yet handed on are asked for again, from the start.
        let prompt_logprobs = self.prompt_logprobs.filter(|_| !self.prompt_scores_sent);
        self.prompt_scores.clear();
        let total = ids.len();
        let from = fork.map_or(0, |f| (f.positions as usize).min(total.saturating_sub(1)));
        let mut sent = from;
        while sent < total {
            if self.events.is_closed() {
                return State::Cancelled;
            }
            let rows = chunk.min(total - sent);
            let last = sent + rows == total;
            let mut entry = StepEntry::rows(self.id, sent as u32, rows as u32, last);
            if sent == from {
                entry.start = Some(RequestStart {
                    fork,
                    origin: self.origin.clone(),
                    sampling: self.sampling,
                    positions: (self.journal.prompt.len() + self.max_tokens) as u32,
                    sampled: self.journal.generated.len() as u32,
                    constraint: self.constraint.clone(),
                    penalties: self.penalties.clone(),
                    logprobs: self.logprobs,
                    // Only a grammar and penalties need them; the sampler counts its draws.
                    generated: if self.constraint.is_some() || self.penalties.uses_history() {
                        self.journal.generated.clone()
                    } else {
                        Vec::new()
                    },
                    embed: self.embed,
                    prompt_logprobs,
                    prompt: if prompt_logprobs.is_some() {
                        self.journal.prompt.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
            // A busy first stage may hold a chunk back for a while: a caller that leaves
            // meanwhile stops the prefill at once.
            let sending = self.send(vec![entry], ids[sent..sent + rows].to_vec());
            tokio::select! {
                delivered = sending => if !delivered {
                    return self.link_lost();
                },
                () = self.events.closed() => return State::Cancelled,
            }
            sent += rows;
            state = State::Prefilling { sent };
        }
        debug_assert!(matches!(state, State::Prefilling { .. }));
        State::Decoding
    }

    /// How long to wait for the next token before the route counts as stalled.
    fn stall_bound(&self, first: bool) -> Duration {
        let floor = self.policy.stall_floor;
        if first {
            let rows = self.journal.positions();
            return floor * (1 + rows / 1024);
        }
        self.gap_s
            .map_or(floor, |gap| floor.max(Duration::from_secs_f64(gap * 20.0)))
    }

    /// Takes tokens as they come, turns them into text, and asks for the next one.
    async fn decode(
        &mut self,
        text: &mut Detokenizer<'_>,
        first_token_at: &mut Option<Instant>,
    ) -> State {
        let mut plan = self.origins.plan.clone();
        plan.mark_unchanged();
        let mut first = true;
        let mut last_token = Instant::now();
        let mut quiet = 0;
        loop {
            let bound = self.stall_bound(first);
            let item = tokio::select! {
                item = self.inbox.recv() => item,
                () = self.events.closed() => return State::Cancelled,
                () = tokio::time::sleep_until((last_token + bound).into()) => {
                    match self.stalled(bound).await {
                        Some(failure) => {
                            return State::Failed(GenerationError::StageFailed(failure));
                        }
                        // Every stage answers: the request is only waiting (for room on a
                        // busy stage, or behind long prompts). Wait another bound; after a
                        // few, it was lost on the way: replay it, on the same plan if need be.
                        None if quiet + 1 < QUIET_BOUNDS => {
                            quiet += 1;
                            last_token = Instant::now();
                            continue;
                        }
                        None => {
                            let last = self.route.plan.stages.len().saturating_sub(1);
                            let waited = last_token.elapsed() + bound * quiet;
                            tracing::warn!(
                                request = %self.id, waited_s = waited.as_secs_f64(),
                                "no token though every stage answers; replaying the request"
                            );
                            self.replay_in_place = true;
                            return State::Failed(GenerationError::StageFailed(self.failure_at(
                                last,
                                FailureKind::Unresponsive,
                                format!(
                                    "no token for {:.0} s though every stage answers",
                                    waited.as_secs_f64()
                                ),
                            )));
                        }
                    }
                }
                Ok(()) = plan.changed() => {
                    let left = self.left_the_plan(&plan.borrow_and_update());
                    if let Some(failure) = left {
                        return State::Failed(GenerationError::StageFailed(failure));
                    }
                    continue;
                }
            };
            let (token, position, logprob) = match item {
                Some(TokenOut::Token {
                    token,
                    position,
                    logprob,
                    ..
                }) => {
                    // The prompt is computed on every stage: choices sharing it may start
                    // (told once, at the first token).
                    if let Some(Share::Parent { ready, .. }) = &self.share {
                        ready.send_if_modified(|computed| !std::mem::replace(computed, true));
                    }
                    (token, position, logprob)
                }
                Some(TokenOut::Failed { failure, .. }) => {
                    return State::Failed(GenerationError::StageFailed(failure));
                }
                Some(TokenOut::Embedding { values, .. }) if self.embed => {
                    first_token_at.get_or_insert_with(Instant::now);
                    if self
                        .events
                        .send(Ok(GenerationEvent::Embedding(values)))
                        .await
                        .is_err()
                    {
                        return State::Cancelled;
                    }
                    return State::Finished(FinishReason::Stop);
                }
                Some(TokenOut::Embedding { .. }) => {
                    return State::Failed(GenerationError::Internal(
                        "an embedding came for a request that generates tokens".to_owned(),
                    ));
                }
                Some(TokenOut::PromptLogprobs {
                    position, entries, ..
                }) => {
                    let expected = 1 + self.prompt_scores.len();
                    if self.prompt_logprobs.is_none()
                        || self.prompt_scores_sent
                        || position as usize != expected
                    {
                        return State::Failed(GenerationError::Internal(format!(
                            "prompt scores from position {position} where the request expects \
                             none or position {expected}"
                        )));
                    }
                    self.prompt_scores.extend(entries);
                    continue;
                }
                None => return self.link_lost(),
            };
            if self.embed {
                return State::Failed(GenerationError::Internal(format!(
                    "token {token} came for a request that asked for an embedding"
                )));
            }
            if self.prompt_logprobs.is_some() && !self.prompt_scores_sent {
                let Some(event) = self.prompt_event() else {
                    return State::Failed(GenerationError::Internal(format!(
                        "{} prompt scores for a prompt of {} tokens",
                        self.prompt_scores.len(),
                        self.journal.prompt.len()
                    )));
                };
                if self.events.send(Ok(event)).await.is_err() {
                    return State::Cancelled;
                }
                self.prompt_scores_sent = true;
            }
            if position != self.journal.positions() {
                return State::Failed(GenerationError::Internal(format!(
                    "token for position {position} while the request holds {}",
                    self.journal.positions()
                )));
            }
            let now = Instant::now();
            if !first {
                let gap = now.duration_since(last_token).as_secs_f64();
                self.gap_s = Some(self.gap_s.map_or(gap, |g| 0.8 * g + 0.2 * gap));
            }
            (first, last_token, quiet) = (false, now, 0);
            first_token_at.get_or_insert(now);
            self.journal.generated.push(token);
            // An end-of-sequence token is no part of the answer, nor of its log-probabilities.
            let ends = !self.ignore_eos && self.model.eos.contains(&token);
            if let Some(logprob) = logprob.filter(|_| !ends) {
                let entry = exo_core::Logprob {
                    chosen: self.model.token_text(token, logprob.logprob),
                    top: logprob
                        .top
                        .iter()
                        .map(|&(t, l)| self.model.token_text(t, l))
                        .collect(),
                };
                if self
                    .events
                    .send(Ok(GenerationEvent::Logprob(entry)))
                    .await
                    .is_err()
                {
                    return State::Cancelled;
                }
            }
            let decoded = match text.push(token) {
                Ok(d) => d,
                Err(e) => {
                    return State::Failed(GenerationError::Internal(format!(
                        "decoding token {token}: {e}"
                    )));
                }
            };
            if !decoded.text.is_empty()
                && self
                    .events
                    .send(Ok(GenerationEvent::Text(decoded.text)))
                    .await
                    .is_err()
            {
                return State::Cancelled;
            }
            if let Some(reason) = decoded.finished {
                return State::Finished(reason);
            }
            // The new token goes in at the position after everything before it.
            let at = self.journal.positions() - 1;
            let entry = StepEntry::rows(self.id, at, 1, true);
            if !self.send(vec![entry], vec![token]).await {
                return self.link_lost();
            }
        }
    }

    /// The prompt's tokens with their scores, once every position after the first has one.
    fn prompt_event(&self) -> Option<GenerationEvent> {
        let prompt = &self.journal.prompt;
        let (&first, rest) = prompt.split_first()?;
        if rest.len() != self.prompt_scores.len() {
            return None;
        }
        let model = &self.model;
        Some(GenerationEvent::PromptLogprobs(PromptLogprobs {
            first: model.token_text(first, 0.0),
            rest: rest
                .iter()
                .zip(&self.prompt_scores)
                .map(|(&token, score)| Logprob {
                    chosen: model.token_text(token, score.logprob),
                    top: score
                        .top
                        .iter()
                        .map(|&(t, l)| model.token_text(t, l))
                        .collect(),
                })
                .collect(),
        }))
    }

    /// A newer plan that leaves out a node of this request's route: membership saw it go
    /// (a node that hangs keeps its connections open, so no link breaks).
    fn left_the_plan(&self, plan: &PlanState) -> Option<StageFailure> {
        let PlanState::Ready(plan) = plan else {
            return None;
        };
        if plan.epoch == self.route.epoch() {
            return None;
        }
        let stages = &self.route.plan.stages;
        let gone = stages
            .iter()
            .position(|s| plan.index_of(&s.node).is_none())?;
        Some(self.failure_at(
            gone,
            FailureKind::Lost,
            format!(
                "it left the cluster (plan {} has no place for it)",
                plan.epoch
            ),
        ))
    }

    /// No token came within `bound`: finds the stage that does not answer (a status call
    /// each, one second at most) and names it; `None` when every one answers (the request is
    /// waiting behind others, not lost).
    async fn stalled(&self, bound: Duration) -> Option<StageFailure> {
        let stages = &self.route.plan.stages;
        let clients = &self.origins.links.clients;
        let mut culprit = None;
        for (i, stage) in stages.iter().enumerate() {
            if stage.node == self.origin {
                continue;
            }
            let probe = async {
                let client = clients.get(&stage.endpoint).await?;
                client.status().await
            };
            match tokio::time::timeout(Duration::from_secs(1), probe).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    culprit = Some((i, e.to_string()));
                    break;
                }
                Err(_) => {
                    culprit = Some((i, "its status did not come within 1 s".to_owned()));
                    break;
                }
            }
        }
        let (index, why) = culprit?;
        tracing::warn!(request = %self.id, stage = index, %why, "a stage stopped answering");
        Some(self.failure_at(
            index,
            FailureKind::Unresponsive,
            format!("no token for {:.1} s ({why})", bound.as_secs_f64()),
        ))
    }

    /// Waits (within the policy's bound) for a plan without the failed stage (or, after a
    /// refusal, for a moment to try the same plan again; at once after a `lost_fork`), and
    /// moves the request onto it under a new id; `Routed` when it can replay there, or how it
    /// ended.
    async fn resume(&mut self, state: State, lost_fork: bool) -> State {
        let State::Resuming(failure) = state else {
            return state;
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.policy.within;
        // A refusal can pass on the same plan: plan epochs name their content, so a node
        // that left and came back follows the same epoch again with a new stage worker, and
        // the stage before it still held a link to the old one. That link is dialled anew
        // after the refusal, so the request tries the same plan again, after a pause in
        // which the nodes settle (each try counts as a resume, which bounds them). A lost fork
        // needs no settling.
        let same_plan = self.replay_in_place || failure.kind == FailureKind::Refused;
        if failure.kind == FailureKind::Refused && !lost_fork {
            tokio::select! {
                () = tokio::time::sleep(REFUSED_PAUSE) => {}
                () = self.events.closed() => return State::Cancelled,
            }
        }
        let mut plan = self.origins.plan.clone();
        let mut why = "no new plan yet".to_owned();
        loop {
            let current = plan.borrow_and_update().clone();
            match current {
                PlanState::Ready(p) if p.epoch != failure.epoch || same_plan => {
                    match tokio::time::timeout_at(deadline, self.origins.route(&p)).await {
                        Ok(Ok(route)) => {
                            let id = RequestId(rand::random());
                            tracing::info!(
                                request = %self.id, resumed_as = %id, plan = %p.epoch,
                                waited_ms = started.elapsed().as_millis() as u64,
                                "replaying the request on the new plan"
                            );
                            self.origins
                                .resumed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            self.inbox = self.origins.inboxes.open(id, route.epoch());
                            self.replay_in_place = false;
                            self.id = id;
                            self.route = route;
                            return State::Routed;
                        }
                        Ok(Err(e)) => why = e.to_string(),
                        Err(_) => break,
                    }
                }
                PlanState::Ready(_) => {
                    why = "the cluster has not planned without it yet".to_owned();
                }
                PlanState::Waiting(reason) => why = reason,
            }
            tokio::select! {
                changed = plan.changed() => if changed.is_err() { break },
                // A route that could not be built (a stage still loading) is tried again.
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = tokio::time::sleep_until(deadline) => break,
                () = self.events.closed() => return State::Cancelled,
            }
        }
        // Which node, and why, is for the log; the client hears the cluster-level problem.
        tracing::warn!(
            request = %self.id, %failure, waited_s = self.policy.within.as_secs_f64(), %why,
            "no plan without the failed stage came; the request ends"
        );
        State::Failed(GenerationError::Unavailable(format!(
            "a node of the cluster {} while computing this request, and the request could \
             not go on: after {:.0} s there is no plan without it ({why})",
            match failure.kind {
                FailureKind::Unresponsive => "stopped answering",
                FailureKind::Refused => "would not take it",
                _ => "went away",
            },
            self.policy.within.as_secs_f64()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_that_end_a_request_are_the_last_three() {
        assert!(!State::Routed.is_over());
        assert!(!State::Prefilling { sent: 3 }.is_over());
        assert!(!State::Decoding.is_over());
        assert!(State::Finished(FinishReason::Stop).is_over());
        assert!(State::Cancelled.is_over());
        assert!(State::Failed(GenerationError::Busy).is_over());
    }

    #[test]
    fn the_journal_counts_positions() {
        let j = Journal {
            prompt: vec![1, 2, 3],
            generated: vec![9],
        };
        assert_eq!(j.positions(), 4);
    }
}
