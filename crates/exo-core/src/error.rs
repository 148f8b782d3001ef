//! Why a generation could not start or finish. Every kind a caller acts on is a variant with
//! its facts as fields; nothing is ever told apart by matching message text.

use crate::ids::{Epoch, LayerRange, NodeId};

/// Why a generation failed. The HTTP API maps each variant to one status.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GenerationError {
    /// The model is not served here.
    #[error("model `{model}` does not exist or is not loaded; {}", list_models(.available))]
    UnknownModel {
        /// The model asked for.
        model: String,
        /// The models that are served.
        available: Vec<String>,
    },
    /// The prompt plus the tokens asked for do not fit the model's context.
    #[error(
        "this model's maximum context length is {context_length} tokens, but {} tokens were \
         requested ({prompt_tokens} in the prompt, {max_tokens} for the completion)",
        prompt_tokens.saturating_add(*max_tokens)
    )]
    ContextExceeded {
        /// Tokens in the prompt after templating.
        prompt_tokens: usize,
        /// Tokens asked for the completion.
        max_tokens: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// The request cannot be served as asked (the caller's fault).
    #[error("{message}")]
    Invalid {
        /// The request field at fault, if one is (`messages`, `temperature`, ...).
        param: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The cluster cannot serve now (no plan yet, not enough memory, layers loading); the
    /// message says why.
    #[error("{0}")]
    Unavailable(String),
    /// No room for another generation now.
    #[error("the cluster is busy with other requests; retry shortly")]
    Busy,
    /// A stage failed while the request was running on it.
    #[error(transparent)]
    StageFailed(StageFailure),
    /// The caller went away or cancelled.
    #[error("the request was cancelled")]
    Cancelled,
    /// A bug or an unexpected failure; the detail is for the log.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GenerationError {
    /// [`GenerationError::Invalid`] naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        GenerationError::Invalid {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// The stage failure behind this error, if it is one.
    pub fn stage_failure(&self) -> Option<&StageFailure> {
        match self {
            GenerationError::StageFailed(f) => Some(f),
            _ => None,
        }
    }
}

fn list_models(available: &[String]) -> String {
    if available.is_empty() {
        "no models are available".to_owned()
    } else {
        format!("available models: {}", available.join(", "))
    }
}

/// Which stage failed, in which plan, how, and the detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "stage {stage} of plan {epoch} (node {node}, layers {layers}) {}: {reason}",
    kind.describe()
)]
pub struct StageFailure {
    /// The node that held the stage.
    pub node: NodeId,
    /// The stage's place in the ring (0 embeds the tokens).
    pub stage: u32,
    /// Its layers.
    pub layers: LayerRange,
    /// The plan the request ran under.
    pub epoch: Epoch,
    /// How it failed.
    pub kind: FailureKind,
    /// The detail, for people.
    pub reason: String,
}

/// How a stage failed; says whether running the request again elsewhere can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The node went away: its connection was lost, or membership saw it leave.
    Lost,
    /// The node stopped answering within the time a step should take.
    Unresponsive,
    /// The node would not take the request (it holds another plan, or no layers yet).
    Refused,
    /// The step itself failed on the node (a computation or resource error).
    Failed,
}

impl FailureKind {
    fn describe(self) -> &'static str {
        match self {
            FailureKind::Lost => "was lost",
            FailureKind::Unresponsive => "stopped answering",
            FailureKind::Refused => "refused the request",
            FailureKind::Failed => "failed",
        }
    }

    /// Whether the same request could succeed on another plan (the node, not the request,
    /// was at fault).
    pub fn is_node_fault(self) -> bool {
        matches!(
            self,
            FailureKind::Lost | FailureKind::Unresponsive | FailureKind::Refused
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_stage_failure_names_node_stage_and_plan() {
        let f = StageFailure {
            node: NodeId::from("12D3KooWnode0001"),
            stage: 1,
            layers: LayerRange::new(10, 20),
            epoch: Epoch::from_hash(0xbeef),
            kind: FailureKind::Lost,
            reason: "the connection was lost".into(),
        };
        let text = GenerationError::StageFailed(f.clone()).to_string();
        for part in [
            "stage 1",
            "12D3KooWnode0001",
            "10..20",
            "000000000000beef",
            "was lost",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        assert!(f.kind.is_node_fault());
        assert!(!FailureKind::Failed.is_node_fault());
    }

    #[test]
    fn unknown_models_list_what_is_served() {
        let e = GenerationError::UnknownModel {
            model: "x".into(),
            available: vec!["a".into(), "b".into()],
        };
        assert!(e.to_string().ends_with("available models: a, b"), "{e}");
    }
}
