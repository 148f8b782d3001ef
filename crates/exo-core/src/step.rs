//! What travels around the ring of stages: frames of steps from the origin through every
//! stage, and sampled tokens from the last stage straight back to the origin.
//!
//! A frame holds the steps of one or more requests ([`StepEntry`]) and their input rows, in
//! entry order: token ids for the first stage, hidden activations for the others. A request's
//! first entry carries its [`RequestStart`]; an entry marked `end` ends it, and every stage
//! passes that on after freeing the request's state. Tokens, and the failure of a request on
//! any stage, go straight to the request's origin ([`TokenOut`]).

use crate::error::StageFailure;
use crate::ids::{NodeId, RequestId};
use crate::request::{OutputConstraint, Penalties, SamplingParams};

/// Hidden activations of consecutive rows: `rows × hidden` values, row-major.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Activations {
    /// Number of rows (positions).
    pub rows: usize,
    /// Width of each row.
    pub hidden: usize,
    /// The values.
    pub values: Vec<f32>,
}

/// The rows of a frame.
#[derive(Clone, Debug, PartialEq)]
pub enum StepInput {
    /// Token ids, for the first stage.
    Tokens(Vec<u32>),
    /// Hidden activations, for the other stages.
    Hidden(Activations),
}

impl StepInput {
    /// Rows (positions) in the input.
    pub fn rows(&self) -> usize {
        match self {
            StepInput::Tokens(t) => t.len(),
            StepInput::Hidden(a) => a.rows,
        }
    }
}

/// What a request's first entry says about the whole request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestStart {
    /// The node the request came in at; the last stage sends its tokens there.
    pub origin: NodeId,
    /// How the last stage samples.
    pub sampling: SamplingParams,
    /// Positions the request may reach (prompt plus tokens asked for), so stages can make
    /// room for its keys and values once.
    pub positions: u32,
    /// Random draws the sampler has already made for this request: a request resumed on
    /// another plan replays its tokens, and its sampler goes on where it stopped.
    pub sampled: u32,
    /// A grammar the sampled tokens must follow.
    pub constraint: Option<OutputConstraint>,
    /// Penalties and biases the last stage applies before sampling.
    pub penalties: Penalties,
    /// Whether the last stage reports each token's log-probability, and with how many of the
    /// most likely alternatives (`Some(0)`: the token's alone).
    pub logprobs: Option<u32>,
    /// The tokens already generated, when the request resumes with a constraint or
    /// penalties: the last stage walks its grammar through them and counts them.
    pub generated: Vec<u32>,
    /// Instead of sampling, the last stage pools the prompt's last hidden states (the mean of
    /// the rows after the final norm, L2-normalised) and delivers that embedding.
    pub embed: bool,
    /// The last stage also reports the log-probability of each prompt token after the first
    /// (under the tokens before it), with this many alternatives; `prompt` then holds the
    /// prompt's ids, the tokens whose log-probabilities it reports.
    pub prompt_logprobs: Option<u32>,
    /// The prompt's ids (only with `prompt_logprobs`).
    pub prompt: Vec<u32>,
    /// The request starts from another request's keys and values: choices of one answer
    /// share their prompt's prefill.
    pub fork: Option<Fork>,
}

/// Where a request's keys and values start from: the first `positions` of request `parent`'s
/// on the same stage (a stage that no longer holds that many refuses the request, whose
/// origin then sends the whole prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fork {
    /// The request whose keys and values are copied.
    pub parent: RequestId,
    /// How many positions are copied; the request's first entry starts there.
    pub positions: u32,
}

/// A sampled token's log-probability under the model (after the request's penalties and
/// biases, before temperature and any grammar), and the most likely tokens with theirs.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The sampled token's log-probability.
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One request's part of a frame.
#[derive(Clone, Debug, PartialEq)]
pub struct StepEntry {
    /// The request.
    pub request: RequestId,
    /// The position of the entry's first row.
    pub position: u32,
    /// Rows of the frame's input that belong to this entry (0 for an entry that only starts
    /// or ends the request).
    pub rows: u32,
    /// Whether the last stage samples a token after this entry's last row.
    pub sample: bool,
    /// Present on the request's first entry.
    pub start: Option<RequestStart>,
    /// Set on the request's last entry: after its rows (if any), free the request's state.
    pub end: bool,
}

impl StepEntry {
    /// An entry of `rows` rows at `position`.
    pub fn rows(request: RequestId, position: u32, rows: u32, sample: bool) -> Self {
        StepEntry {
            request,
            position,
            rows,
            sample,
            start: None,
            end: false,
        }
    }

    /// An entry that only ends `request`.
    pub fn end(request: RequestId) -> Self {
        StepEntry {
            request,
            position: 0,
            rows: 0,
            sample: false,
            start: None,
            end: true,
        }
    }
}

/// A frame: the entries of one or more requests and their rows, concatenated in entry order.
#[derive(Clone, Debug, PartialEq)]
pub struct StepFrame {
    /// The requests' entries.
    pub entries: Vec<StepEntry>,
    /// Their rows.
    pub input: StepInput,
}

impl StepFrame {
    /// Checks that the entries account for exactly the input's rows.
    pub fn rows_match(&self) -> bool {
        let rows: u64 = self.entries.iter().map(|e| u64::from(e.rows)).sum();
        rows == self.input.rows() as u64
    }
}

/// What the last stage sends to a request's origin.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenOut {
    /// A sampled token and the position it takes.
    Token {
        /// The request.
        request: RequestId,
        /// The token id.
        token: u32,
        /// Its position.
        position: u32,
        /// Its log-probability and the most likely alternatives, when the request asked.
        logprob: Option<TokenLogprob>,
    },
    /// The prompt's embedding (requests that asked for one instead of tokens).
    Embedding {
        /// The request.
        request: RequestId,
        /// The pooled, L2-normalised last hidden state.
        values: Vec<f32>,
    },
    /// Log-probabilities of prompt tokens (requests that asked), for the positions from
    /// `position` on, one per position, in order; the last stage sends them as it computes
    /// the prompt's pieces, before the request's first token.
    PromptLogprobs {
        /// The request.
        request: RequestId,
        /// The position of the first token they score.
        position: u32,
        /// One per position.
        entries: Vec<TokenLogprob>,
    },
    /// A stage failed the request.
    Failed {
        /// The request.
        request: RequestId,
        /// What failed.
        failure: StageFailure,
    },
}

impl TokenOut {
    /// The request it is for.
    pub fn request(&self) -> RequestId {
        match self {
            TokenOut::Token { request, .. }
            | TokenOut::Embedding { request, .. }
            | TokenOut::PromptLogprobs { request, .. }
            | TokenOut::Failed { request, .. } => *request,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn frames_check_that_entries_cover_the_rows() {
        let frame = StepFrame {
            entries: vec![
                StepEntry::rows(RequestId(1), 0, 3, false),
                StepEntry::rows(RequestId(2), 7, 1, true),
                StepEntry::end(RequestId(3)),
            ],
            input: StepInput::Tokens(vec![1, 2, 3, 4]),
        };
        assert!(frame.rows_match());
        let short = StepFrame {
            input: StepInput::Tokens(vec![1]),
            ..frame
        };
        assert!(!short.rows_match());
    }
}
