//! The shard service's client: what a node uses to call another.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{AddCredential, Credential};
use crate::convert::step_to_pb;
use crate::error::{Error, Result};
use crate::pb;
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::types::{
    AssignReport, Assignment, GenerateCall, GenerateEvent, Limits, NodeStatus, RequestOpen, Step,
    StepInput, TokenReply, WireDtype,
};

type Inner = pb::shard_client::ShardClient<InterceptedService<Channel, AddCredential>>;

/// A connection to one node's shard service. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct ShardClient {
    inner: Inner,
    endpoint: String,
}

/// Counts of what a client sent to the next stage.
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
        Ok(reply.into_inner().into())
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

    /// Opens a request on the node's stage; activations are sent as `wire`.
    pub async fn open(
        &self,
        open: RequestOpen,
        wire: WireDtype,
        counters: Arc<SentCounters>,
    ) -> Result<ForwardSession> {
        let (tx, rx) = mpsc::channel(4);
        let replies = self
            .inner
            .clone()
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|s| self.remote(&s))?
            .into_inner();
        Ok(ForwardSession {
            tx,
            replies,
            open,
            sent_first: false,
            wire,
            endpoint: self.endpoint.clone(),
            counters,
        })
    }

    /// Generates text on the node, which acts as the request's origin. Dropping the returned
    /// stream cancels the generation.
    pub async fn generate(&self, call: &GenerateCall) -> Result<GenerateStream> {
        let events = self
            .inner
            .clone()
            .generate(pb::GenerateRequest::from(call))
            .await
            .map_err(|s| self.remote(&s))?
            .into_inner();
        Ok(GenerateStream {
            events,
            endpoint: self.endpoint.clone(),
        })
    }
}

/// One request's stream to the next stage.
#[derive(Debug)]
pub struct ForwardSession {
    tx: mpsc::Sender<pb::ForwardFrame>,
    replies: Streaming<pb::ForwardReply>,
    open: RequestOpen,
    sent_first: bool,
    wire: WireDtype,
    endpoint: String,
    counters: Arc<SentCounters>,
}

impl ForwardSession {
    /// Sends the next step.
    pub async fn send(&mut self, step: &Step) -> Result<()> {
        let frame = step_to_pb(&self.open, !self.sent_first, step, self.wire);
        if let (StepInput::Hidden(a), Some(pb::forward_frame::Input::Hidden(t))) =
            (&step.input, &frame.input)
        {
            self.counters
                .bytes
                .fetch_add(t.data.len() as u64, Ordering::Relaxed);
            self.counters.frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .positions
                .fetch_add(a.positions as u64, Ordering::Relaxed);
        }
        self.sent_first = true;
        if self.tx.send(frame).await.is_err() {
            // The stream is gone; its status says why.
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Waits for the next token the later stages send back.
    pub async fn next_token(&mut self) -> Result<TokenReply> {
        match self.replies.message().await {
            Ok(Some(reply)) => Ok(reply.into()),
            Ok(None) => Err(self.closed()),
            Err(status) => Err(Error::remote(&self.endpoint, &status)),
        }
    }

    async fn failure(&mut self) -> Error {
        match self.replies.message().await {
            Err(status) => Error::remote(&self.endpoint, &status),
            _ => self.closed(),
        }
    }

    fn closed(&self) -> Error {
        Error::Remote {
            endpoint: self.endpoint.clone(),
            code: crate::Code::Unavailable,
            message: "the stage closed the request's stream".to_owned(),
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
    /// The next event; `None` once the node ends the stream.
    pub async fn next(&mut self) -> Result<Option<GenerateEvent>> {
        match self.events.message().await {
            Ok(Some(event)) => GenerateEvent::try_from(event).map(Some),
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

impl ForwardSession {
    pub(crate) async fn send_raw(&mut self, frame: pb::ForwardFrame) -> Result<()> {
        self.sent_first = true;
        if self.tx.send(frame).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }
}
