//! The shard service of a node: the transport's handler trait over this node's stages and
//! origin. Failures become the transport's codes only here, at the edge.

use std::sync::Arc;

use exo_core::{Epoch, GenerationError, GenerationRequest, NodeId, StepFrame, TokenOut};
use exo_transport::{
    AssignReport, Assignment, ChunkItems, Code, Error as TError, FrameSink, GenerationItems,
    LinkOpen, NodeStatus, ShardHandler,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::fetch::ModelStore;
use crate::origin::Origins;
use crate::stage::worker::{DeliverySink, LinkRefusal, WorkerLink, WorkerMsg};
use crate::stage::{HoldError, Stages};

/// A cloneable handle on a node's stages and origin, served over gRPC.
#[derive(Clone, Debug)]
pub(crate) struct Service {
    pub(crate) stages: Arc<Stages>,
    pub(crate) origins: Arc<Origins>,
    /// The model in the store, whose manifest and chunks peers may ask for.
    pub(crate) store: Option<Arc<ModelStore>>,
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

    fn manifest(
        &self,
        model: String,
        hash: String,
    ) -> BoxFuture<'_, exo_transport::Result<(String, Vec<u8>)>> {
        let found = self.store.as_ref().and_then(|s| s.manifest(&model, &hash));
        Box::pin(async move {
            found.ok_or_else(|| {
                let asked = if hash.is_empty() { model } else { hash };
                TError::service(Code::NotFound, format!("this node holds no model {asked}"))
            })
        })
    }

    fn chunks(
        &self,
        hash: String,
        indices: Vec<u32>,
    ) -> BoxFuture<'_, exo_transport::Result<ChunkItems>> {
        let sent = match &self.store {
            Some(store) => store.send_chunks(&hash, indices),
            None => Err(TError::service(
                Code::NotFound,
                "this node keeps no model store",
            )),
        };
        Box::pin(async move { sent })
    }
}
