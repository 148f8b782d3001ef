//! The shard service's client: what a node uses to call another.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use exo_core::{
    Epoch, GenerationError, GenerationEvent, GenerationRequest, NodeId, StepFrame, StepInput,
    TokenOut,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::auth::Credential;
use crate::convert::{frame_to_pb, generation_item_from_pb};
use crate::error::{Error, Result};
use crate::pb;
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::tls::Tls;
use crate::types::{AssignReport, Assignment, Limits, LinkOpen, NodeStatus, WireDtype};

type Inner = pb::shard_client::ShardClient<Channel>;

/// How long a client waits for the TCP connection and the TLS handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to one node's shard service. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct ShardClient {
    inner: Inner,
    endpoint: String,
}

/// Counts of what a node sent to the next stage.
#[derive(Debug, Default)]
pub struct SentCounters {
    /// Activation payload bytes.
    pub bytes: AtomicU64,
    /// Frames carrying activations.
    pub frames: AtomicU64,
    /// Positions whose activations were sent.
    pub positions: AtomicU64,
}

impl ShardClient {
    /// Connects to the shard service at `endpoint` (`http://host:port`) over TLS 1.3, with a
    /// certificate of `credential`'s cluster, and checks that the node's certificate is of the
    /// same cluster (`Unauthenticated` when it is not). `None` connects without TLS, only to
    /// test that servers refuse such connections.
    pub async fn connect(
        endpoint: &str,
        credential: Option<&Credential>,
        limits: Limits,
    ) -> Result<Self> {
        let connect_error = |message: String| Error::Connect {
            endpoint: endpoint.to_owned(),
            message,
        };
        let tls = credential
            .map(Credential::tls)
            .transpose()
            .map_err(connect_error)?;
        // tonic bounds this connector (TCP and TLS handshake together) by `connect_timeout`,
        // on every reconnection too.
        let connector =
            tower::service_fn(move |uri: tonic::codegen::http::Uri| dial(uri, tls.clone()));
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| connect_error(format!("not a valid endpoint: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| match not_of_cluster(&e) {
                Some(why) => Error::Unauthenticated {
                    endpoint: endpoint.to_owned(),
                    message: why,
                },
                None => connect_error(source_chain(&e)),
            })?;
        let inner = pb::shard_client::ShardClient::new(channel)
            .max_decoding_message_size(limits.max_message_bytes())
            .max_encoding_message_size(limits.max_message_bytes());
        Ok(ShardClient {
            inner,
            endpoint: endpoint.to_owned(),
        })
    }

    /// The endpoint this client calls.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn remote(&self, status: &tonic::Status) -> Error {
        Error::remote(&self.endpoint, status)
    }

    /// Asks the node to hold its part of `assignment`; resolves once it is loaded.
    pub async fn assign(&self, assignment: &Assignment) -> Result<AssignReport> {
        let reply = self
            .inner
            .clone()
            .assign(pb::AssignRequest::from(assignment))
            .await
            .map_err(|s| self.remote(&s))?;
        reply.into_inner().try_into()
    }

    /// The node's report on itself.
    pub async fn status(&self) -> Result<NodeStatus> {
        let reply = self
            .inner
            .clone()
            .status(pb::StatusRequest {})
            .await
            .map_err(|s| self.remote(&s))?;
        Ok(reply.into_inner().into())
    }

    /// Opens a link to the node's stage of `open.epoch`; activations are sent as `wire` and
    /// counted in `counters`. The link lives until the sender is dropped or the node ends it
    /// ([`LinkSender::ended`]).
    pub async fn link(
        &self,
        open: LinkOpen,
        wire: WireDtype,
        counters: Arc<SentCounters>,
    ) -> Result<LinkSender> {
        let (tx, rx) = mpsc::channel(8);
        let first = pb::LinkMessage {
            kind: Some(pb::link_message::Kind::Open((&open).into())),
        };
        if tx.send(first).await.is_err() {
            return Err(Error::Connect {
                endpoint: self.endpoint.clone(),
                message: "the link closed before it opened".to_owned(),
            });
        }
        let (done, ended) = watch::channel(None);
        let mut inner = self.inner.clone();
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            let outcome = inner
                .forward(ReceiverStream::new(rx))
                .await
                .map(|_| ())
                .map_err(|s| Error::remote(&endpoint, &s));
            let _ = done.send(Some(outcome));
        });
        Ok(LinkSender {
            tx,
            ended: LinkEnded(ended),
            wire,
            counters,
        })
    }

    /// Subscribes `origin` to what this node's stage of `epoch` delivers for the requests that
    /// came in at `origin`; resolves once the subscription is in place.
    pub async fn deliveries(&self, epoch: Epoch, origin: &NodeId) -> Result<DeliveryStream> {
        let mut stream = self
            .inner
            .clone()
            .deliveries(pb::DeliveriesRequest {
                epoch: epoch.get(),
                origin: origin.as_str().to_owned(),
            })
            .await
            .map_err(|s| self.remote(&s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(first)) if first.subscribed => Ok(DeliveryStream {
                stream,
                endpoint: self.endpoint.clone(),
            }),
            Ok(_) => Err(Error::Remote {
                endpoint: self.endpoint.clone(),
                code: crate::Code::Internal,
                message: "the node did not confirm the subscription".to_owned(),
            }),
            Err(status) => Err(self.remote(&status)),
        }
    }

    /// Generates text on the node, which acts as the request's origin. Dropping the returned
    /// stream cancels the generation.
    pub async fn generate(&self, request: &GenerationRequest) -> Result<GenerateStream> {
        let events = self
            .inner
            .clone()
            .generate(pb::GenerateRequest::from(request))
            .await
            .map_err(|s| self.remote(&s))?
            .into_inner();
        Ok(GenerateStream {
            events,
            endpoint: self.endpoint.clone(),
        })
    }

    /// A model's manifest from the node's store, by hash (or by name when `hash` is empty):
    /// the hash the node gives and the bytes, which the caller must check.
    pub async fn manifest(&self, model: &str, hash: &str) -> Result<(String, Vec<u8>)> {
        let reply = self
            .inner
            .clone()
            .manifest(pb::ManifestRequest {
                model: model.to_owned(),
                hash: hash.to_owned(),
            })
            .await
            .map_err(|s| self.remote(&s))?
            .into_inner();
        Ok((reply.hash, reply.manifest))
    }

    /// Chunks of the model whose manifest hashes to `hash`, streamed in the order asked (at
    /// most [`crate::MAX_CHUNKS_PER_CALL`]).
    pub async fn chunks(&self, hash: &str, indices: &[u32]) -> Result<ChunkStream> {
        let stream = self
            .inner
            .clone()
            .chunks(pb::ChunksRequest {
                hash: hash.to_owned(),
                indices: indices.to_vec(),
            })
            .await
            .map_err(|s| self.remote(&s))?
            .into_inner();
        Ok(ChunkStream {
            stream,
            endpoint: self.endpoint.clone(),
        })
    }

    pub(crate) fn raw(&self) -> Inner {
        self.inner.clone()
    }
}

/// The sending end of a link to a stage.
#[derive(Debug)]
pub struct LinkSender {
    tx: mpsc::Sender<pb::LinkMessage>,
    ended: LinkEnded,
    wire: WireDtype,
    counters: Arc<SentCounters>,
}

impl LinkSender {
    /// Sends a frame. Fails with the reason the link ended, if it has.
    pub async fn send(&mut self, frame: &StepFrame) -> Result<()> {
        let message = pb::LinkMessage {
            kind: Some(pb::link_message::Kind::Frame(frame_to_pb(frame, self.wire))),
        };
        let hidden_bytes = match &message.kind {
            Some(pb::link_message::Kind::Frame(pb::Frame {
                input: Some(pb::frame::Input::Hidden(t)),
                ..
            })) => Some(t.data.len() as u64),
            _ => None,
        };
        if self.tx.send(message).await.is_err() {
            return Err(self
                .ended
                .clone()
                .wait()
                .await
                .err()
                .unwrap_or_else(|| Error::Remote {
                    endpoint: String::new(),
                    code: crate::Code::Unavailable,
                    message: "the stage closed the link".to_owned(),
                }));
        }
        if let (Some(bytes), StepInput::Hidden(a)) = (hidden_bytes, &frame.input) {
            self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.counters.frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .positions
                .fetch_add(a.rows as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A handle that resolves when the link ends.
    pub fn ended(&self) -> LinkEnded {
        self.ended.clone()
    }
}

/// Resolves when a link ends: `Ok` when the stage closed it after the sender let go, the
/// error when the stage refused or failed it, or the connection was lost.
#[derive(Clone, Debug)]
pub struct LinkEnded(watch::Receiver<Option<Result<()>>>);

impl LinkEnded {
    /// Waits for the end.
    pub async fn wait(mut self) -> Result<()> {
        loop {
            if let Some(outcome) = self.0.borrow_and_update().clone() {
                return outcome;
            }
            if self.0.changed().await.is_err() {
                return Err(Error::Remote {
                    endpoint: String::new(),
                    code: crate::Code::Unavailable,
                    message: "the link's call ended without an outcome".to_owned(),
                });
            }
        }
    }
}

/// Chunks coming from a node's model store.
#[derive(Debug)]
pub struct ChunkStream {
    stream: Streaming<pb::ChunkData>,
    endpoint: String,
}

impl ChunkStream {
    /// The next chunk as `(index, bytes)`; `None` once the node sent every chunk asked for.
    pub async fn next(&mut self) -> Result<Option<(u32, Vec<u8>)>> {
        match self.stream.message().await {
            Ok(Some(chunk)) => Ok(Some((chunk.index, chunk.data))),
            Ok(None) => Ok(None),
            Err(status) => Err(Error::remote(&self.endpoint, &status)),
        }
    }
}

/// What a stage delivers to one origin.
#[derive(Debug)]
pub struct DeliveryStream {
    stream: Streaming<pb::Delivery>,
    endpoint: String,
}

impl DeliveryStream {
    /// The next items; `None` once the node ends the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Vec<TokenOut>>> {
        match self.stream.message().await {
            Ok(Some(delivery)) => delivery
                .items
                .iter()
                .map(TokenOut::try_from)
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Ok(None) => Ok(None),
            Err(status) => Err(Error::remote(&self.endpoint, &status)),
        }
    }
}

/// Events of a generation running on another node.
#[derive(Debug)]
pub struct GenerateStream {
    events: Streaming<pb::GenerateEvent>,
    endpoint: String,
}

impl GenerateStream {
    /// The next item: an event, or the generation's typed failure; `None` once the node ends
    /// the stream. `Err` is a failure of the call itself (connection lost, refused).
    pub async fn next(
        &mut self,
    ) -> Result<Option<std::result::Result<GenerationEvent, GenerationError>>> {
        match self.events.message().await {
            Ok(Some(event)) => generation_item_from_pb(event).map(Some),
            Ok(None) => Ok(None),
            Err(status) => Err(Error::remote(&self.endpoint, &status)),
        }
    }
}

/// A TCP connection to `uri`'s host and port, secured with `tls` when given.
async fn dial(
    uri: tonic::codegen::http::Uri,
    tls: Option<Arc<Tls>>,
) -> std::io::Result<TokioIo<Dialled>> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let host = uri
        .host()
        .ok_or_else(|| invalid("the endpoint names no host"))?;
    // An IPv6 address comes in brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .ok_or_else(|| invalid("the endpoint names no port"))?;
    let tcp = TcpStream::connect((host, port)).await?;
    // Activation frames are latency-bound: they must not wait for Nagle's algorithm.
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(TokioIo::new(Either::Left(tcp)));
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
    match connector.connect(Tls::server_name(), tcp).await {
        Ok(secured) => Ok(TokioIo::new(Either::Right(secured))),
        Err(e) => Err(match crate::tls::refusal(&e) {
            Some(why) => std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                NotOfCluster(format!("the node is not of this cluster: {why}")),
            ),
            None => e,
        }),
    }
}

/// A dialled connection: TLS, or plain TCP for tests of refusal.
type Dialled = Either<TcpStream, TlsStream<TcpStream>>;

/// A handshake refused for the cluster's certificates (either end's).
#[derive(Debug)]
struct NotOfCluster(String);

impl std::fmt::Display for NotOfCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotOfCluster {}

/// What a [`NotOfCluster`] among `e`'s causes says.
fn not_of_cluster(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(e);
    while let Some(s) = source {
        // An `io::Error`'s own source skips the error it wraps: look inside.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if let Some(refused) = [Some(s), inner]
            .into_iter()
            .flatten()
            .find_map(|e| e.downcast_ref::<NotOfCluster>())
        {
            return Some(refused.0.clone());
        }
        source = s.source();
    }
    None
}

/// The error and its causes on one line (tonic's transport errors hide the useful part in
/// their sources).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
