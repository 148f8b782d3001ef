//! The API crate's engine trait over a node: the node is the origin of every request.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use exo_api::{ClusterView, Generation, ModelCard, PlanView, Readiness, StageView};
use exo_core::{GenerationError, GenerationRequest};
use futures::future::BoxFuture;

use crate::node::Node;
use crate::origin::model_id;
use crate::plan::PlanState;
use crate::views::view_of;

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves the API from a node: the node is the origin of every request.
#[derive(Debug)]
pub struct NodeEngine {
    node: Arc<Node>,
    created: u64,
}

impl NodeEngine {
    /// An engine over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        NodeEngine {
            node,
            created: now_s(),
        }
    }
}

impl exo_api::Engine for NodeEngine {
    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard {
            id: self.node.model_id(),
            created: self.created,
            owned_by: "exo-rs".to_owned(),
            context_length: self.node.context_length(),
        }]
    }

    fn cluster(&self) -> BoxFuture<'_, ClusterView> {
        Box::pin(async move {
            let snapshot = self.node.topology().snapshot().await.ok();
            let (plan, status) = match self.node.plan_state() {
                PlanState::Ready(plan) => {
                    let stages = plan
                        .stages
                        .iter()
                        .enumerate()
                        .map(|(i, s)| StageView {
                            node: s.node.to_string(),
                            layers_start: s.layers.start,
                            layers_end: s.layers.end,
                            embeds: i == 0,
                            has_head: i + 1 == plan.stages.len(),
                        })
                        .collect();
                    (
                        Some(PlanView {
                            epoch: plan.epoch.to_string(),
                            model: model_id(&plan.model),
                            stages,
                            predicted_decode_tokens_per_s: Some(
                                plan.plan.predicted.decode_tokens_per_s,
                            ),
                            predicted_time_to_first_token_ms: Some(
                                plan.plan.predicted.ttft_s * 1e3,
                            ),
                            explanation: plan.plan.explanation.clone(),
                        }),
                        "ready".to_owned(),
                    )
                }
                PlanState::Waiting(reason) => (None, format!("waiting: {reason}")),
            };
            let (nodes, links) = snapshot.as_ref().map(view_of).unwrap_or_default();
            let ready = self.node.readiness() == Readiness::Ready;
            let status = match self.node.readiness() {
                Readiness::NotReady(reason) if plan.is_some() => format!("not ready: {reason}"),
                _ => status,
            };
            ClusterView {
                nodes,
                links,
                plan,
                status,
                ready,
            }
        })
    }

    fn readiness(&self) -> Readiness {
        self.node.readiness()
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GenerationError>> {
        Box::pin(async move { self.node.generate(request).await })
    }
}
