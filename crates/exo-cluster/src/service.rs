//! The shard service of a node: the transport's handler trait over this node's stages and
//! origin. Failures become the transport's codes only here, at the edge.

use std::sync::Arc;

use exo_core::{Epoch, GenerationError, GenerationRequest, NodeId, StepFrame, TokenOut};
use exo_transport::{
    AssignReport, Assignment, Code, Error as TError, FrameSink, GenerationItems, LinkOpen,
    NodeStatus, ShardHandler,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::origin::Origins;
use crate::stage::worker::{DeliverySink, LinkRefusal, WorkerLink, WorkerMsg};
use crate::stage::{HoldError, Stages};

/// A cloneable handle on a node's stages and origin, served over gRPC.
#[derive(Clone, Debug)]
pub(crate) struct Service {
    pub(crate) stages: Arc<Stages>,
    pub(crate) origins: Arc<Origins>,
}

impl FrameSink for WorkerLink {
    fn send(&mut self, frame: StepFrame) -> BoxFuture<'_, exo_transport::Result<()>> {
        let sent = WorkerLink::send(self, frame).map_err(|e| match e {
            LinkRefusal::Malformed(m) => TError::invalid(m),
            LinkRefusal::Stopped => TError::service(Code::FailedPrecondition, e.to_string()),
        });
        Box::pin(async move { sent })
    }
}

impl ShardHandler for Service {
    fn assign(&self, assignment: Assignment) -> BoxFuture<'_, exo_transport::Result<AssignReport>> {
        Box::pin(async move {
            self.stages.hold(&assignment).await.map_err(|e| {
                let code = match e {
                    HoldError::WrongModel { .. } => Code::NotFound,
                    HoldError::NotInPlan { .. } | HoldError::OtherPlan { .. } => {
                        Code::FailedPrecondition
                    }
                    HoldError::Load { .. } => Code::Internal,
                };
                TError::service(code, e.to_string())
            })
        })
    }

    fn status(&self) -> BoxFuture<'_, NodeStatus> {
        Box::pin(async move { self.stages.status() })
    }

    fn open_link(
        &self,
        open: LinkOpen,
    ) -> BoxFuture<'_, exo_transport::Result<Box<dyn FrameSink>>> {
        Box::pin(async move {
            let worker = self
                .stages
                .worker(open.epoch)
                .await
                .map_err(|reason| TError::service(Code::FailedPrecondition, reason))?;
            tracing::debug!(epoch = %open.epoch, from = %open.from, "link opened");
            Ok(Box::new(worker.link()) as Box<dyn FrameSink>)
        })
    }

    fn deliveries(
        &self,
        epoch: Epoch,
        origin: NodeId,
    ) -> BoxFuture<'_, exo_transport::Result<mpsc::UnboundedReceiver<Vec<TokenOut>>>> {
        Box::pin(async move {
            let worker = self
                .stages
                .worker(epoch)
                .await
                .map_err(|reason| TError::service(Code::FailedPrecondition, reason))?;
            let (tx, rx) = mpsc::unbounded_channel();
            worker.send(WorkerMsg::Subscribe {
                origin,
                sink: DeliverySink::Remote(tx),
            });
            Ok(rx)
        })
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<GenerationItems, GenerationError>> {
        Box::pin(async move { self.origins.start(request).await })
    }
}
