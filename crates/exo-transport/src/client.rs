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
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{AddCredential, Credential};
use crate::convert::{frame_to_pb, generation_item_from_pb};
use crate::error::{Error, Result};
use crate::pb;
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::types::{AssignReport, Assignment, Limits, LinkOpen, NodeStatus, WireDtype};

type Inner = pb::shard_client::ShardClient<InterceptedService<Channel, AddCredential>>;

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
    /// Connects to the shard service at `endpoint` (`http://host:port`), presenting
    /// `credential` on every call (`None` only to test that servers refuse such calls).
    pub async fn connect(
        endpoint: &str,
        credential: Option<&Credential>,
        limits: Limits,
    ) -> Result<Self> {
        let connect_error = |message: String| Error::Connect {
            endpoint: endpoint.to_owned(),
            message,
        };
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| connect_error(format!("not a valid endpoint: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| connect_error(source_chain(&e)))?;
        let inner = pb::shard_client::ShardClient::new(InterceptedService::new(
            channel,
            AddCredential::new(credential),
        ))
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
