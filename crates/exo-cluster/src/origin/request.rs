//! One request at its origin, as a state machine: routed to a plan, prefilling the prompt in
//! chunks, decoding a token at a time, then finished, cancelled or failed. It owns the
//! request's journal (prompt ids, generated ids, positions): what a replay on another plan
//! would need.

use std::sync::Arc;
use std::time::Instant;

use exo_core::{
    FinishReason, Finished, GenerationError, GenerationEvent, NodeId, RequestId, RequestStart,
    SamplingParams, StepEntry, StepFrame, StepInput, TokenOut,
};
use exo_model::Detokenizer;
use tokio::sync::mpsc;

use crate::inbox::Inbox;
use crate::origin::OriginModel;
use crate::origin::route::Route;

/// Where a request stands.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum State {
    /// Routed to a plan; nothing sent yet.
    Routed,
    /// Sending the prompt; `sent` of its tokens are on their way.
    Prefilling { sent: usize },
    /// Generating, one token per step.
    Decoding,
    /// Done, for this reason.
    Finished(FinishReason),
    /// The caller went away.
    Cancelled,
    /// A stage or the route failed.
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
}

/// Everything one request needs to run.
#[derive(Debug)]
pub(crate) struct RequestTask {
    pub(crate) id: RequestId,
    pub(crate) origin: NodeId,
    pub(crate) model: Arc<OriginModel>,
    pub(crate) route: Arc<Route>,
    pub(crate) inbox: Inbox,
    pub(crate) journal: Journal,
    pub(crate) sampling: SamplingParams,
    pub(crate) max_tokens: usize,
    pub(crate) stop: Vec<String>,
    pub(crate) ignore_eos: bool,
    pub(crate) events: mpsc::Sender<Result<GenerationEvent, GenerationError>>,
    pub(crate) started: Instant,
}

impl RequestTask {
    /// Runs the request to its end and tells the caller how it ended.
    pub(crate) async fn run(mut self) {
        let _running = self.route.enter();
        let mut state = State::Routed;
        let mut first_token_at = None;
        let model = Arc::clone(&self.model);
        let mut text = Detokenizer::new(
            &model.tokenizer,
            &model.eos,
            &self.stop,
            self.ignore_eos,
            self.max_tokens,
        );
        state = self.prefill(state).await;
        if state == State::Decoding {
            state = self.decode(&mut text, &mut first_token_at).await;
        }
        // However it ended, the stages free the request's state.
        self.send(vec![StepEntry::end(self.id)], Vec::new()).await;
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

    /// Sends `entries` with token rows `ids` to the first stage; `false` when the link is gone.
    async fn send(&self, entries: Vec<StepEntry>, ids: Vec<u32>) -> bool {
        let frame = StepFrame {
            entries,
            input: StepInput::Tokens(ids),
        };
        self.route.first().send(frame).await
    }

    fn link_lost(&self) -> State {
        let failure = self
            .route
            .broken()
            .unwrap_or_else(|| exo_core::StageFailure {
                node: self.route.plan.stages[0].node.clone(),
                stage: 0,
                layers: self.route.plan.stages[0].layers,
                epoch: self.route.epoch(),
                kind: exo_core::FailureKind::Lost,
                reason: "the link to the first stage is closed".to_owned(),
            });
        State::Failed(GenerationError::StageFailed(failure))
    }

    /// Sends the prompt in chunks (no frame outgrows the limits); the last one samples.
    async fn prefill(&mut self, mut state: State) -> State {
        let chunk = self.model.prefill_chunk.max(1);
        let total = self.journal.prompt.len();
        let mut sent = 0;
        while sent < total {
            if self.events.is_closed() {
                return State::Cancelled;
            }
            let rows = chunk.min(total - sent);
            let last = sent + rows == total;
            let mut entry = StepEntry::rows(self.id, sent as u32, rows as u32, last);
            if sent == 0 {
                entry.start = Some(RequestStart {
                    origin: self.origin.clone(),
                    sampling: self.sampling,
                    positions: (total + self.max_tokens) as u32,
                });
            }
            let ids = self.journal.prompt[sent..sent + rows].to_vec();
            if !self.send(vec![entry], ids).await {
                return self.link_lost();
            }
            sent += rows;
            state = State::Prefilling { sent };
        }
        debug_assert!(matches!(state, State::Prefilling { .. }));
        State::Decoding
    }

    /// Takes tokens as they come, turns them into text, and asks for the next one.
    async fn decode(
        &mut self,
        text: &mut Detokenizer<'_>,
        first_token_at: &mut Option<Instant>,
    ) -> State {
        loop {
            let item = tokio::select! {
                item = self.inbox.recv() => item,
                () = self.events.closed() => return State::Cancelled,
            };
            let (token, position) = match item {
                Some(TokenOut::Token {
                    token, position, ..
                }) => (token, position),
                Some(TokenOut::Failed { failure, .. }) => {
                    return State::Failed(GenerationError::StageFailed(failure));
                }
                None => return self.link_lost(),
            };
            if position != self.journal.positions() {
                return State::Failed(GenerationError::Internal(format!(
                    "token for position {position} while the request holds {}",
                    self.journal.positions()
                )));
            }
            first_token_at.get_or_insert_with(Instant::now);
            self.journal.generated.push(token);
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
