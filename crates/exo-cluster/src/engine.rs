//! The API crate's engine trait over a node: the node is the origin of every request, and its
//! view of the cluster (membership, the plan, what every node reports) is kept live for the web
//! page.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use exo_api::{ClusterView, Generation, ModelCard, PlanView, Readiness, StageView};
use exo_core::{GenerationError, GenerationRequest};
use exo_topology::TopologyEvent;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::live::{self, LiveView, ViewSource};
use crate::node::Node;
use crate::origin::model_id;
use crate::plan::{ActivePlan, PlanState};
use crate::views::{self, Reports, Tracker, ViewInput};

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves the API from a node: the node is the origin of every request.
#[derive(Debug)]
pub struct NodeEngine {
    views: Arc<NodeViews>,
    live: Option<LiveView>,
    created: u64,
}

impl NodeEngine {
    /// An engine over `node`. Called within a tokio runtime, it also starts the live view of
    /// the cluster that `GET /v1/cluster/events` follows (it stops when the engine is dropped
    /// or the node shuts down).
    pub fn new(node: Arc<Node>) -> Self {
        let views = Arc::new(NodeViews {
            node,
            tracker: Mutex::default(),
        });
        let node = Arc::clone(&views.node);
        let wakes = Box::pin(async move {
            let mut sources = vec![
                live::changes(node.plan_changes()),
                live::changes(node.readiness_changes()),
                live::changes(node.stage_changes()),
            ];
            match node.topology().events().await {
                Ok(events) => sources.push(live::membership(events)),
                Err(e) => tracing::warn!(error = %e, "the live view will not follow membership"),
            }
            futures::stream::select_all(sources).boxed()
        });
        let source: Arc<dyn ViewSource> = views.clone();
        NodeEngine {
            live: live::start(source, wakes),
            views,
            created: now_s(),
        }
    }
}

/// The cluster as one node sees it.
#[derive(Debug)]
struct NodeViews {
    node: Arc<Node>,
    tracker: Mutex<Tracker>,
}

impl NodeViews {
    async fn build(&self) -> ClusterView {
        let node = &self.node;
        let snapshot = node.topology().snapshot().await.ok();
        let mut reports = match &snapshot {
            Some(snapshot) => views::reports(node.clients(), snapshot).await,
            None => Reports::new(),
        };
        reports.insert(node.node_id().as_str().to_owned(), node.status());
        let (plan, epoch, status) = match node.plan_state() {
            PlanState::Ready(plan) => {
                (Some(plan_view(&plan)), Some(plan.epoch), "ready".to_owned())
            }
            PlanState::Waiting(reason) => (None, None, format!("waiting: {reason}")),
        };
        let readiness = node.readiness();
        let status = match &readiness {
            Readiness::NotReady(reason) if plan.is_some() => format!("not ready: {reason}"),
            _ => status,
        };
        let input = ViewInput {
            snapshot: snapshot.as_ref(),
            reports: &reports,
            plan,
            epoch,
            status,
            ready: readiness == Readiness::Ready,
        };
        match self.tracker.lock() {
            Ok(mut tracker) => tracker.view(input, Instant::now()),
            Err(poisoned) => poisoned.into_inner().view(input, Instant::now()),
        }
    }
}

impl ViewSource for NodeViews {
    fn view(&self) -> BoxFuture<'_, ClusterView> {
        Box::pin(self.build())
    }

    fn observe(&self, event: &TopologyEvent) {
        if let Ok(mut tracker) = self.tracker.lock() {
            tracker.observe(event, Instant::now());
        }
    }
}

/// The plan as the API shows it, without the stages' figures.
fn plan_view(plan: &ActivePlan) -> PlanView {
    let stages = plan
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // A tensor-parallel stage names every member, the lead first.
            let group = plan
                .plan
                .stages
                .get(i)
                .filter(|p| p.is_tensor_parallel())
                .map(|p| {
                    p.members
                        .iter()
                        .map(|m| m.node.as_str().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            StageView {
                node: s.node.to_string(),
                layers_start: s.layers.start,
                layers_end: s.layers.end,
                embeds: i == 0,
                has_head: i + 1 == plan.stages.len(),
                group,
                ..StageView::default()
            }
        })
        .collect();
    PlanView {
        epoch: plan.epoch.to_string(),
        model: model_id(&plan.model),
        stages,
        predicted_decode_tokens_per_s: Some(plan.plan.predicted.decode_tokens_per_s),
        predicted_time_to_first_token_ms: Some(plan.plan.predicted.ttft_s * 1e3),
        explanation: plan.plan.explanation.clone(),
    }
}

impl exo_api::Engine for NodeEngine {
    fn models(&self) -> Vec<ModelCard> {
        let node = &self.views.node;
        vec![ModelCard {
            id: node.model_id(),
            created: self.created,
            owned_by: "exo-rs".to_owned(),
            context_length: node.context_length(),
            tool_syntax: node.tool_syntax(),
        }]
    }

    fn cluster(&self) -> BoxFuture<'_, ClusterView> {
        self.views.view()
    }

    fn cluster_events(&self) -> Option<watch::Receiver<ClusterView>> {
        self.live.as_ref().map(LiveView::subscribe)
    }

    fn readiness(&self) -> Readiness {
        self.views.node.readiness()
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GenerationError>> {
        Box::pin(async move { self.views.node.generate(request).await })
    }
}
