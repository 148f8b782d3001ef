//! The shard service's server: accepts only this cluster's TLS connections, checks every
//! message, then hands plain types to a [`ShardHandler`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use exo_core::{
    Epoch, GenerationError, GenerationEvent, GenerationRequest, NodeId, StepFrame, TokenOut,
};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Credential;
use crate::convert::{frame_from_pb, generation_item_to_pb};
use crate::error::{Error, Result};
use crate::pb;
use crate::types::{AssignReport, Assignment, Limits, LinkOpen, NodeStatus};

/// Where the frames of one inbound link go. Dropping it closes the link: the stage ends every
/// request that came over it.
pub trait FrameSink: Send + 'static {
    /// Hands a checked frame to the stage; fails once the stage cannot take frames on this
    /// link any more.
    fn send(&mut self, frame: StepFrame) -> BoxFuture<'_, Result<()>>;
}

/// A generation's items: events, then the end or a typed failure.
pub type GenerationItems = mpsc::Receiver<std::result::Result<GenerationEvent, GenerationError>>;

/// What a node does when the shard service is called. The node runtime implements it.
pub trait ShardHandler: Send + Sync + 'static {
    /// Holds `assignment`'s shard for this node; resolves once it is ready.
    fn assign(&self, assignment: Assignment) -> BoxFuture<'_, Result<AssignReport>>;

    /// The node's report on itself.
    fn status(&self) -> BoxFuture<'_, NodeStatus>;

    /// Opens an inbound link to this node's stage of `open.epoch`.
    fn open_link(&self, open: LinkOpen) -> BoxFuture<'_, Result<Box<dyn FrameSink>>>;

    /// Subscribes `origin` to what this node's stage of `epoch` delivers for the requests that
    /// came in at `origin`. Dropping the receiver ends the subscription.
    fn deliveries(
        &self,
        epoch: Epoch,
        origin: NodeId,
    ) -> BoxFuture<'_, Result<mpsc::UnboundedReceiver<Vec<TokenOut>>>>;

    /// Generates text end to end, this node acting as the request's origin. Dropping the
    /// receiver cancels the generation.
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, std::result::Result<GenerationItems, GenerationError>>;

    /// A model's manifest from this node's model store, by its hash (`hash`), or by the
    /// model's name when `hash` is empty: the hash and the manifest's bytes.
    fn manifest(&self, model: String, hash: String) -> BoxFuture<'_, Result<(String, Vec<u8>)>> {
        let _ = (model, hash);
        Box::pin(async {
            Err(Error::service(
                crate::Code::NotFound,
                "this node keeps no model store",
            ))
        })
    }

    /// Chunks `indices` of the model whose manifest hashes to `hash`, in that order, each as
    /// `(index, bytes)`; an item that is an error ends the stream.
    fn chunks(&self, hash: String, indices: Vec<u32>) -> BoxFuture<'_, Result<ChunkItems>> {
        let _ = (hash, indices);
        Box::pin(async {
            Err(Error::service(
                crate::Code::NotFound,
                "this node keeps no model store",
            ))
        })
    }
}

/// Chunks a handler sends, in the order asked; an error ends the stream.
pub type ChunkItems = mpsc::Receiver<Result<(u32, Vec<u8>)>>;

/// The most chunks one `Chunks` call may ask for.
pub const MAX_CHUNKS_PER_CALL: usize = 1024;

/// Whether `hash` is 64 hex digits.
fn is_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// How long a connection may stay silent before keep-alive pings give up on it.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Streams one connection may have open at once (tonic sets no limit): far more than the links,
/// deliveries and generations a peer or a gateway holds, but a bound on what one connection
/// can make the server keep.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Serves the shard service on `listener` until `shutdown` resolves, over TLS 1.3 with a
/// certificate of `credential`'s cluster on both ends (a connection without one is closed
/// during its handshake, before any call); malformed messages end their stream with
/// `InvalidArgument` and leave the server serving. At most 256 connections are open at once
/// (more are closed at once), a connection silent for 10 s after it is accepted is closed, and
/// errors accepting (such as running out of file descriptors) are retried, never fatal.
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
    // Links and deliveries are long-lived streams: on shutdown they end too, or the graceful
    // shutdown would wait for them forever.
    let (stopping, stopped) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let service = Service {
        handler,
        limits,
        stopped,
    };
    let server = pb::shard_server::ShardServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes())
        .max_encoding_message_size(limits.max_message_bytes());
    // No request timeout: links and deliveries are streams that last as long as a plan. A
    // dead peer is found by the keep-alive pings, a silent connection by the first-byte timeout
    // of `incoming`, and open connections and each one's streams are capped.
    // Every connection is TLS 1.3 with a certificate of the cluster's authority on both ends:
    // a caller without the cluster key does not get as far as HTTP/2.
    let tls = credential.tls().map_err(|message| Error::Connect {
        endpoint: local.clone(),
        message,
    })?;
    let incoming = crate::incoming::accept_tls(
        listener,
        crate::incoming::MAX_CONNECTIONS,
        crate::incoming::FIRST_BYTE_TIMEOUT,
        Arc::clone(&tls.server),
    );
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(server)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Connect {
            endpoint: local,
            message: format!("serving: {e}"),
        })
}

struct Service {
    handler: Arc<dyn ShardHandler>,
    limits: Limits,
    /// Turns true when the server shuts down.
    stopped: watch::Receiver<bool>,
}

/// Resolves once the server shuts down.
async fn stopping(mut stopped: watch::Receiver<bool>) {
    while !*stopped.borrow_and_update() {
        if stopped.changed().await.is_err() {
            return;
        }
    }
}

type ReplyStream<T> = ReceiverStream<std::result::Result<T, Status>>;

/// Sends `items` to a reply stream's sender `tx`, each made a message by `message` (which also
/// says whether it is the last), until the items end, the server stops, or the caller goes away
/// (then `items` is dropped, which tells the handler).
fn relay<I, T>(
    tx: mpsc::Sender<std::result::Result<T, Status>>,
    items: impl futures::Stream<Item = I> + Send + 'static,
    stopped: watch::Receiver<bool>,
    mut message: impl FnMut(I) -> (std::result::Result<T, Status>, bool) + Send + 'static,
) where
    I: Send + 'static,
    T: Send + 'static,
{
    use futures::StreamExt;
    tokio::spawn(async move {
        let stop = stopping(stopped);
        tokio::pin!(stop, items);
        loop {
            tokio::select! {
                () = &mut stop => break,
                item = items.next() => {
                    let Some(item) = item else { break };
                    let (reply, last) = message(item);
                    if tx.send(reply).await.is_err() || last {
                        break;
                    }
                }
                () = tx.closed() => break,
            }
        }
    });
}

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

    async fn forward(
        &self,
        request: Request<Streaming<pb::LinkMessage>>,
    ) -> std::result::Result<Response<pb::LinkClosed>, Status> {
        let link = run_link(&*self.handler, &self.limits, request.into_inner());
        tokio::select! {
            outcome = link => outcome.map_err(|e| {
                tracing::debug!(error = %e, "link ended with an error");
                e.into_status()
            })?,
            () = stopping(self.stopped.clone()) => {
                return Err(Error::service(
                    crate::Code::Unavailable,
                    "the node is shutting down",
                )
                .into_status());
            }
        }
        Ok(Response::new(pb::LinkClosed {}))
    }

    type DeliveriesStream = ReplyStream<pb::Delivery>;

    async fn deliveries(
        &self,
        request: Request<pb::DeliveriesRequest>,
    ) -> std::result::Result<Response<Self::DeliveriesStream>, Status> {
        let request = request.into_inner();
        let epoch = Epoch::new(request.epoch)
            .ok_or_else(|| Error::invalid("plan epoch 0 is no epoch").into_status())?;
        if request.origin.is_empty() {
            return Err(Error::invalid("a subscription must name its origin").into_status());
        }
        let items = self
            .handler
            .deliveries(epoch, NodeId::from(request.origin))
            .await
            .map_err(Error::into_status)?;
        let (tx, rx) = mpsc::channel(64);
        let subscribed = pb::Delivery {
            subscribed: true,
            items: Vec::new(),
        };
        let _ = tx.send(Ok(subscribed)).await;
        // The origin going away drops `items`, which ends the subscription.
        relay(
            tx,
            tokio_stream::wrappers::UnboundedReceiverStream::new(items),
            self.stopped.clone(),
            |batch: Vec<TokenOut>| {
                let delivery = pb::Delivery {
                    subscribed: false,
                    items: batch.iter().map(pb::TokenOut::from).collect(),
                };
                (Ok(delivery), false)
            },
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type GenerateStream = ReplyStream<pb::GenerateEvent>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<Self::GenerateStream>, Status> {
        let request =
            GenerationRequest::try_from(request.into_inner()).map_err(Error::into_status)?;
        let (tx, rx) = mpsc::channel(16);
        let events = match self.handler.generate(request).await {
            Ok(events) => events,
            Err(e) => {
                // A refusal is the stream's one event, as data, like a later failure.
                let _ = tx.send(Ok(generation_item_to_pb(&Err(e)))).await;
                return Ok(Response::new(ReceiverStream::new(rx)));
            }
        };
        // The caller going away drops `events`, which cancels the generation.
        relay(
            tx,
            ReceiverStream::new(events),
            self.stopped.clone(),
            |item| {
                // Only the final event or an error ends a generation.
                let last = matches!(item, Ok(GenerationEvent::Finished(_)) | Err(_));
                (Ok(generation_item_to_pb(&item)), last)
            },
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn manifest(
        &self,
        request: Request<pb::ManifestRequest>,
    ) -> std::result::Result<Response<pb::ManifestReply>, Status> {
        let request = request.into_inner();
        if !request.hash.is_empty() && !is_hash(&request.hash) {
            return Err(Error::invalid("a manifest hash is 64 hex digits").into_status());
        }
        if request.hash.is_empty() && (request.model.is_empty() || request.model.len() > 1024) {
            return Err(Error::invalid("ask for a manifest by hash or by name").into_status());
        }
        let (hash, manifest) = self
            .handler
            .manifest(request.model, request.hash)
            .await
            .map_err(Error::into_status)?;
        Ok(Response::new(pb::ManifestReply { hash, manifest }))
    }

    type ChunksStream = ReplyStream<pb::ChunkData>;

    async fn chunks(
        &self,
        request: Request<pb::ChunksRequest>,
    ) -> std::result::Result<Response<Self::ChunksStream>, Status> {
        let request = request.into_inner();
        if !is_hash(&request.hash) {
            return Err(Error::invalid("a manifest hash is 64 hex digits").into_status());
        }
        if request.indices.is_empty() || request.indices.len() > MAX_CHUNKS_PER_CALL {
            return Err(Error::invalid(format!(
                "ask for 1 to {MAX_CHUNKS_PER_CALL} chunks at a time"
            ))
            .into_status());
        }
        let items = self
            .handler
            .chunks(request.hash, request.indices)
            .await
            .map_err(Error::into_status)?;
        let (tx, rx) = mpsc::channel(2);
        relay(
            tx,
            ReceiverStream::new(items),
            self.stopped.clone(),
            |item| match item {
                Ok((index, data)) => (Ok(pb::ChunkData { index, data }), false),
                Err(e) => (Err(e.into_status()), true),
            },
        );
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
        format!("the sender's stream failed: {}", status.message()),
    )
}

/// Serves one inbound link: the opening message, then frames until the sender closes.
async fn run_link(
    handler: &dyn ShardHandler,
    limits: &Limits,
    mut inbound: Streaming<pb::LinkMessage>,
) -> Result<()> {
    let open = match inbound.message().await {
        Ok(Some(pb::LinkMessage {
            kind: Some(pb::link_message::Kind::Open(open)),
        })) => LinkOpen::try_from(&open)?,
        Ok(Some(_)) => return Err(Error::invalid("a link must open with its epoch and sender")),
        Ok(None) => return Ok(()),
        Err(status) => return Err(inbound_error(&status)),
    };
    let mut sink = handler.open_link(open).await?;
    loop {
        let frame = match inbound.message().await {
            Ok(Some(pb::LinkMessage {
                kind: Some(pb::link_message::Kind::Frame(frame)),
            })) => frame_from_pb(&frame, limits)?,
            Ok(Some(_)) => return Err(Error::invalid("a link opens once; send frames after it")),
            // The sender closed the link.
            Ok(None) => return Ok(()),
            Err(status) => return Err(inbound_error(&status)),
        };
        sink.send(frame).await?;
    }
}
