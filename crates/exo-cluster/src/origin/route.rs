//! A route: what an origin needs to send requests through one plan. Built once per epoch:
//! every stage confirms it holds its layers (the assignment barrier), every stage is
//! subscribed to deliver this node's tokens and failures, and a link to the first stage is
//! opened. A route whose stage is lost is marked broken and fails its requests; the next
//! request builds a new one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use exo_core::{Epoch, FailureKind, GenerationError, NodeId, StageFailure};
use exo_transport::Assignment;
use tokio::sync::watch;

use crate::inbox::Inboxes;
use crate::plan::ActivePlan;
use crate::stage::link::{self, LinkSettings, LinkTarget, StageLink};
use crate::stage::worker::{DeliverySink, WorkerMsg};
use crate::stage::{HoldError, Stages};
use crate::tasks::Tasks;

/// One plan's way in and out, for requests that come in at this node.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) plan: Arc<ActivePlan>,
    first: StageLink,
    broken: watch::Sender<Option<StageFailure>>,
    running: AtomicUsize,
    tasks: Tasks,
}

impl Drop for Route {
    fn drop(&mut self) {
        // Its subscription readers and the first stage's pump end with it.
        self.tasks.cancel();
    }
}

impl Route {
    pub(crate) fn epoch(&self) -> Epoch {
        self.plan.epoch
    }

    /// The link to the first stage.
    pub(crate) fn first(&self) -> &StageLink {
        &self.first
    }

    /// The stage failure that broke the route, if one did.
    pub(crate) fn broken(&self) -> Option<StageFailure> {
        self.broken.borrow().clone()
    }

    /// Resolves with the failure once the route breaks.
    pub(crate) async fn until_broken(&self) -> StageFailure {
        let mut rx = self.broken.subscribe();
        loop {
            if let Some(failure) = rx.borrow_and_update().clone() {
                return failure;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Requests running on this route.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Counts a request as running until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> RunningGuard {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningGuard(Arc::clone(self))
    }
}

/// Marks a request as running on a route.
#[derive(Debug)]
pub(crate) struct RunningGuard(Arc<Route>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What building a route needs from the node.
#[derive(Debug)]
pub(crate) struct RouteDeps<'a> {
    pub(crate) node: &'a NodeId,
    pub(crate) stages: &'a Stages,
    pub(crate) inboxes: &'a Arc<Inboxes>,
    pub(crate) links: &'a LinkSettings,
    pub(crate) tasks: &'a Tasks,
}

fn failure_at(plan: &ActivePlan, index: usize, kind: FailureKind, reason: String) -> StageFailure {
    let stage = &plan.stages[index];
    StageFailure {
        node: stage.node.clone(),
        stage: index as u32,
        layers: stage.layers,
        epoch: plan.epoch,
        kind,
        reason,
    }
}

fn transport_failure(plan: &ActivePlan, index: usize, e: &exo_transport::Error) -> StageFailure {
    let kind = match e.code() {
        exo_transport::Code::Unavailable | exo_transport::Code::Cancelled => FailureKind::Lost,
        exo_transport::Code::Internal => FailureKind::Failed,
        _ => FailureKind::Refused,
    };
    failure_at(plan, index, kind, e.to_string())
}

/// Builds the route of `plan`.
pub(crate) async fn build(
    deps: RouteDeps<'_>,
    plan: Arc<ActivePlan>,
) -> Result<Arc<Route>, GenerationError> {
    let epoch = plan.epoch;
    let failed = |f: StageFailure| GenerationError::StageFailed(f);
    // 1. Every stage holds its layers (each node plans and loads by itself; this waits for
    //    them, and tells a node that has not seen the change yet).
    let assignment = Assignment {
        model: plan.model.clone(),
        epoch,
        stages: plan.stages.clone(),
    };
    let holds = plan.stages.iter().enumerate().map(|(i, stage)| {
        let (assignment, plan) = (&assignment, &plan);
        async move {
            if &stage.node == deps.node {
                return deps.stages.hold(assignment).await.map(|_| ()).map_err(|e| {
                    let kind = match e {
                        HoldError::Load { .. } => FailureKind::Failed,
                        _ => FailureKind::Refused,
                    };
                    failure_at(plan, i, kind, e.to_string())
                });
            }
            let client = deps.links.clients.get(&stage.endpoint).await;
            let outcome = match client {
                Ok(c) => c.assign(assignment).await.map(|_| ()),
                Err(e) => Err(e),
            };
            outcome.map_err(|e| {
                deps.links.clients.forget(&stage.endpoint);
                transport_failure(plan, i, &e)
            })
        }
    });
    futures::future::try_join_all(holds).await.map_err(failed)?;

    let tasks = deps.tasks.child();
    let (broken, _) = watch::channel(None);
    let on_failure = {
        let (inboxes, broken) = (Arc::clone(deps.inboxes), broken.clone());
        move |failure: StageFailure| {
            let failed = inboxes.fail_epoch(epoch, &failure);
            tracing::warn!(%failure, requests = failed, "a stage of the plan failed");
            broken.send_replace(Some(failure));
        }
    };

    // 2. Every stage delivers this node's tokens and failures to its inboxes.
    for (i, stage) in plan.stages.iter().enumerate() {
        if &stage.node == deps.node {
            let worker = deps
                .stages
                .worker(epoch)
                .await
                .map_err(|reason| failed(failure_at(&plan, i, FailureKind::Refused, reason)))?;
            worker.send(WorkerMsg::Subscribe {
                origin: deps.node.clone(),
                sink: DeliverySink::Local(Arc::clone(deps.inboxes)),
            });
            continue;
        }
        let client = deps
            .links
            .clients
            .get(&stage.endpoint)
            .await
            .map_err(|e| failed(transport_failure(&plan, i, &e)))?;
        let mut deliveries = client
            .deliveries(epoch, deps.node)
            .await
            .map_err(|e| failed(transport_failure(&plan, i, &e)))?;
        let (inboxes, on_failure, plan_for_task) = (
            Arc::clone(deps.inboxes),
            on_failure.clone(),
            Arc::clone(&plan),
        );
        let clients = Arc::clone(&deps.links.clients);
        let endpoint = stage.endpoint.clone();
        tasks.spawn(async move {
            let reason = loop {
                match deliveries.next().await {
                    Ok(Some(items)) => inboxes.deliver(items),
                    Ok(None) => break "the stage ended its deliveries".to_owned(),
                    Err(e) => break e.to_string(),
                }
            };
            clients.forget(&endpoint);
            on_failure(failure_at(&plan_for_task, i, FailureKind::Lost, reason));
        });
    }

    // 3. A link to the first stage.
    let first = &plan.stages[0];
    let first = if &first.node == deps.node {
        let worker = deps
            .stages
            .worker(epoch)
            .await
            .map_err(|reason| failed(failure_at(&plan, 0, FailureKind::Refused, reason)))?;
        StageLink::Local(worker.link())
    } else {
        let target = LinkTarget {
            stage: first.clone(),
            index: 0,
            epoch,
            from: deps.node.clone(),
        };
        StageLink::Remote(link::spawn_pump(&tasks, deps.links, target, on_failure))
    };
    Ok(Arc::new(Route {
        plan,
        first,
        broken,
        running: AtomicUsize::new(0),
        tasks,
    }))
}
