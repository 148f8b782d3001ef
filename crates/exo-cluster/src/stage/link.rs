//! Links to a stage: how an origin reaches the first stage, and a stage the next one. A stage
//! in this process is reached through its worker's queue (no call to itself over gRPC); a
//! stage on another node through a pump task that owns the gRPC link, dials it on first use,
//! and reports its failure as data.

use std::sync::Arc;

use exo_core::{Epoch, FailureKind, NodeId, Stage, StageFailure, StepFrame};
use exo_transport::{Code, LinkOpen, LinkSender, SentCounters, WireDtype};
use tokio::sync::mpsc;

use crate::clients::ClientPool;
use crate::stage::worker::WorkerLink;
use crate::tasks::Tasks;

/// Where frames for a stage go.
#[derive(Debug)]
pub(crate) enum StageLink {
    /// The stage's worker in this process.
    Local(WorkerLink),
    /// A pump task that sends to the stage on another node.
    Remote(mpsc::Sender<StepFrame>),
}

impl StageLink {
    /// Sends a frame; `false` when the link is gone (its failure is reported on its own).
    pub(crate) async fn send(&self, frame: StepFrame) -> bool {
        match self {
            StageLink::Local(link) => link.send(frame).is_ok(),
            StageLink::Remote(tx) => tx.send(frame).await.is_ok(),
        }
    }
}

/// The stage a link leads to, and who sends.
#[derive(Clone, Debug)]
pub(crate) struct LinkTarget {
    /// The stage.
    pub(crate) stage: Stage,
    /// Its place in the ring.
    pub(crate) index: u32,
    /// The plan.
    pub(crate) epoch: Epoch,
    /// The sending node.
    pub(crate) from: NodeId,
}

impl LinkTarget {
    /// The failure of this link's stage, as data.
    pub(crate) fn failure(&self, kind: FailureKind, reason: impl Into<String>) -> StageFailure {
        StageFailure {
            node: self.stage.node.clone(),
            stage: self.index,
            layers: self.stage.layers,
            epoch: self.epoch,
            kind,
            reason: reason.into(),
        }
    }

    fn failure_of(&self, e: &exo_transport::Error) -> StageFailure {
        let kind = match e.code() {
            Code::FailedPrecondition | Code::NotFound => FailureKind::Refused,
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => FailureKind::Lost,
            _ => FailureKind::Failed,
        };
        self.failure(kind, e.to_string())
    }
}

/// Settings of the links a node opens.
#[derive(Clone, Debug)]
pub(crate) struct LinkSettings {
    pub(crate) clients: Arc<ClientPool>,
    pub(crate) wire: WireDtype,
    pub(crate) sent: Arc<SentCounters>,
}

/// Starts a pump to `target` on `tasks` and returns its queue; `on_failure` hears of every
/// failure of the link (refused, lost, a frame that could not be sent). After a failure the
/// pump dials again on the next frame. It ends when every sender of its queue is dropped,
/// which closes the link.
pub(crate) fn spawn_pump(
    tasks: &Tasks,
    settings: &LinkSettings,
    target: LinkTarget,
    on_failure: impl Fn(StageFailure) + Send + Sync + 'static,
) -> mpsc::Sender<StepFrame> {
    // A few frames of slack; a sender beyond that waits, which is the back pressure a slow
    // link or stage puts on the stage before it.
    let (tx, rx) = mpsc::channel(4);
    tasks.spawn(pump(settings.clone(), target, rx, on_failure));
    tx
}

async fn pump(
    settings: LinkSettings,
    target: LinkTarget,
    mut rx: mpsc::Receiver<StepFrame>,
    on_failure: impl Fn(StageFailure) + Send + Sync + 'static,
) {
    let endpoint = target.stage.endpoint.clone();
    let mut link: Option<LinkSender> = None;
    loop {
        let ended = link.as_ref().map(LinkSender::ended);
        let frame = tokio::select! {
            frame = rx.recv() => frame,
            outcome = async move {
                match ended {
                    Some(ended) => ended.wait().await,
                    None => std::future::pending().await,
                }
            } => {
                link = None;
                settings.clients.forget(&endpoint);
                let failure = match outcome {
                    Ok(()) => target.failure(FailureKind::Lost, "the stage closed the link"),
                    Err(e) => target.failure_of(&e),
                };
                on_failure(failure);
                continue;
            }
        };
        let Some(frame) = frame else { return };
        if link.is_none() {
            let open = LinkOpen {
                epoch: target.epoch,
                from: target.from.clone(),
            };
            let opened = async {
                settings
                    .clients
                    .get(&endpoint)
                    .await?
                    .link(open, settings.wire, Arc::clone(&settings.sent))
                    .await
            }
            .await;
            match opened {
                Ok(l) => link = Some(l),
                Err(e) => {
                    settings.clients.forget(&endpoint);
                    on_failure(target.failure_of(&e));
                    continue;
                }
            }
        }
        if let Some(l) = link.as_mut()
            && let Err(e) = l.send(&frame).await
        {
            link = None;
            settings.clients.forget(&endpoint);
            on_failure(target.failure_of(&e));
        }
    }
}
