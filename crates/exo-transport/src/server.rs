//! The shard service's server: checks the credential and every frame, then hands plain types
//! to a [`ShardHandler`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{CheckCredential, Credential};
use crate::convert::{first_frame, next_frame};
use crate::error::{Error, Result};
use crate::pb;
use crate::types::{
    AssignReport, Assignment, GenerateCall, GenerateEvent, Limits, NodeStatus, RequestOpen, Step,
    TokenReply,
};

/// One request's state on one stage, kept between its steps.
pub trait StageSession: Send + 'static {
    /// Runs one step. Returns the sampled token when the step asked for one (the last stage
    /// samples; earlier stages pass on the token the next stage returned).
    fn step(&mut self, step: Step) -> BoxFuture<'_, Result<Option<TokenReply>>>;
}

/// What a node does when the shard service is called. The node runtime implements it.
pub trait ShardHandler: Send + Sync + 'static {
    /// Holds `assignment`'s shard for this node; resolves once it is ready.
    fn assign(&self, assignment: Assignment) -> BoxFuture<'_, Result<AssignReport>>;

    /// The node's report on itself.
    fn status(&self) -> BoxFuture<'_, NodeStatus>;

    /// Opens a request on this stage (and, for a stage before the last, on the next one).
    /// The session is dropped when the caller closes the stream or goes away: free its state.
    fn open(&self, open: RequestOpen) -> BoxFuture<'_, Result<Box<dyn StageSession>>>;

    /// Generates text end to end, this node acting as the request's origin. Dropping the
    /// receiver cancels the generation.
    #[allow(clippy::type_complexity)]
    fn generate(
        &self,
        call: GenerateCall,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<Result<GenerateEvent>>>>;
}

/// How long a connection may stay silent before keep-alive pings give up on it.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves the shard service on `listener` until `shutdown` resolves. Calls without
/// `credential` are refused with `Unauthenticated`; malformed frames end their stream with
/// `InvalidArgument` and leave the server serving.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn ShardHandler>,
    credential: Credential,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let service = Service { handler, limits };
    let server = pb::shard_server::ShardServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes())
        .max_encoding_message_size(limits.max_message_bytes());
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(InterceptedService::new(
            server,
            CheckCredential::new(&credential),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Connect {
            endpoint: local,
            message: format!("serving: {e}"),
        })
}

struct Service {
    handler: Arc<dyn ShardHandler>,
    limits: Limits,
}

type ReplyStream<T> = ReceiverStream<std::result::Result<T, Status>>;

#[tonic::async_trait]
impl pb::shard_server::Shard for Service {
    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> std::result::Result<Response<pb::AssignReply>, Status> {
        let assignment = Assignment::try_from(request.into_inner()).map_err(Error::into_status)?;
        let report = self
            .handler
            .assign(assignment)
            .await
            .map_err(Error::into_status)?;
        Ok(Response::new((&report).into()))
    }

    type ForwardStream = ReplyStream<pb::ForwardReply>;

    async fn forward(
        &self,
        request: Request<Streaming<pb::ForwardFrame>>,
    ) -> std::result::Result<Response<Self::ForwardStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let handler = Arc::clone(&self.handler);
        let limits = self.limits;
        tokio::spawn(async move {
            if let Err(e) = run_forward(handler, limits, inbound, &tx).await {
                tracing::debug!(error = %e, "forward stream ended with an error");
                let _ = tx.send(Err(e.into_status())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GenerateStream = ReplyStream<pb::GenerateEvent>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<Self::GenerateStream>, Status> {
        let call = GenerateCall::try_from(request.into_inner()).map_err(Error::into_status)?;
        let mut events = self
            .handler
            .generate(call)
            .await
            .map_err(Error::into_status)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.recv() => {
                        let Some(event) = event else { break };
                        let item = event
                            .map(|e| pb::GenerateEvent::from(&e))
                            .map_err(Error::into_status);
                        let failed = item.is_err();
                        if tx.send(item).await.is_err() || failed {
                            break;
                        }
                    }
                    // The caller went away: dropping `events` cancels the generation.
                    () = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> std::result::Result<Response<pb::StatusReply>, Status> {
        let status = self.handler.status().await;
        Ok(Response::new((&status).into()))
    }
}

fn inbound_error(status: &Status) -> Error {
    Error::service(
        crate::Code::Cancelled,
        format!("the caller's stream failed: {}", status.message()),
    )
}

async fn run_forward(
    handler: Arc<dyn ShardHandler>,
    limits: Limits,
    mut inbound: Streaming<pb::ForwardFrame>,
    tx: &mpsc::Sender<std::result::Result<pb::ForwardReply, Status>>,
) -> Result<()> {
    let first = match inbound.message().await {
        Ok(Some(frame)) => frame,
        Ok(None) => return Ok(()),
        Err(status) => return Err(inbound_error(&status)),
    };
    let (open, step) = first_frame(&first, &limits)?;
    let request_id = open.request_id.clone();
    let mut session = handler.open(open.clone()).await?;
    let mut pending = Some(step);
    loop {
        let step = match pending.take() {
            Some(step) => step,
            None => {
                let frame = tokio::select! {
                    frame = inbound.message() => frame,
                    () = tx.closed() => return Ok(()),
                };
                match frame {
                    Ok(Some(frame)) => next_frame(&frame, &open, &limits)?,
                    // The caller closed its side: the request is over.
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(inbound_error(&status)),
                }
            }
        };
        if let Some(reply) = session.step(step).await? {
            let mut reply = pb::ForwardReply::from(&reply);
            reply.request_id.clone_from(&request_id);
            if tx.send(Ok(reply)).await.is_err() {
                return Ok(());
            }
        }
    }
}
