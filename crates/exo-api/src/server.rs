//! Serving the router on a listener: one task per connection, with the limits a listener open
//! to a network needs (a cap on open connections, idle and header timeouts), and an accept
//! loop that outlives errors such as running out of file descriptors.
//!
//! `axum::serve` has none of these limits, and hyper has only one timer for them:
//! `header_read_timeout` starts as soon as hyper waits for a request, so it also closes idle
//! keep-alive connections, at the same moment. Telling "idle" from "slow to send its head"
//! needs to know when a request is in flight, which only the code that serves it knows, so the
//! phases are tracked here (as Go's `IdleTimeout` and `ReadHeaderTimeout` do).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::ApiConfig;
use crate::error::ApiError;

/// The connection limits of [`serve`], taken from [`ApiConfig`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    max_connections: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Limits {
    pub(crate) fn new(config: &ApiConfig) -> Self {
        Self {
            max_connections: config.max_connections.max(1),
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
        }
    }
}

/// How long the accept loop waits after an error that is not one connection's (out of file
/// descriptors, out of memory) before accepting again; the listener stays readable, so without
/// a pause the loop would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a refused connection is kept to deliver its 503: long enough for the client's
/// request to arrive and be drained, so that closing does not reset the connection (a reset
/// can discard the 503 before the client reads it).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Refused connections lingering at once; beyond that the 503 is written without waiting and
/// the connection closed at once, so that refusals cannot hold many file descriptors.
const MAX_LINGERING_REFUSALS: usize = 32;

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting and waits
/// for every connection's requests in flight, streams included, to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Arc::new(Registry::new(limits.max_connections));
    let refusal: Bytes = over_capacity_response(limits.max_connections).into();
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS));
    let tracker = TaskTracker::new();
    let stopping = CancellationToken::new();
    let mut errors = AcceptErrors::default();
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                errors.record(&error);
                // Out of file descriptors is the likely cause: the longest-idle connection's
                // descriptor is better spent on the connection waiting to be accepted.
                registry.evict_one();
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        // Small writes (SSE events) must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        match Registry::admit(&registry) {
            Some(connection) => {
                tracker.spawn(serve_connection(
                    stream,
                    remote,
                    router.clone(),
                    connection,
                    limits,
                    stopping.clone(),
                ));
            }
            None => refuse(stream, refusal.clone(), &lingering, &tracker),
        }
    }
    drop(listener);
    stopping.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Errors that concern one connection only (it was reset before it was accepted): the next
/// accept may well succeed at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Logs accept errors at most once a second, with the number left out since the last line.
#[derive(Debug, Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    fn record(&mut self, error: &io::Error) {
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            %error,
            suppressed = self.suppressed,
            "accepting an API connection failed; retrying shortly",
        );
        self.last_logged = Some(now);
        self.suppressed = 0;
    }
}

/// Answers a connection over the cap with 503 and closes it.
fn refuse(
    mut stream: TcpStream,
    response: Bytes,
    lingering: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    tracing::debug!("refusing an API connection: at the connection cap");
    let Ok(permit) = Arc::clone(lingering).try_acquire_owned() else {
        // A fresh connection's send buffer is empty: the response fits in it.
        let _ = stream.try_write(&response);
        return;
    };
    tracker.spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async move {
            stream.write_all(&response).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
    });
}

/// The whole HTTP/1.1 response a connection over the cap gets, in OpenAI's error envelope.
fn over_capacity_response(max_connections: usize) -> Vec<u8> {
    let body = ApiError::too_many_connections(max_connections)
        .envelope()
        .to_string();
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body.as_bytes());
    response
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    router: Router,
    connection: Registered,
    limits: Limits,
    stopping: CancellationToken,
) {
    let state = Arc::clone(&connection.state);
    let io = TokioIo::new(Watched {
        stream,
        state: Arc::clone(&state),
    });
    let service_state = Arc::clone(&state);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let in_flight = InFlight::start(&service_state);
        request.extensions_mut().insert(ConnectInfo(remote));
        let response = router.clone().oneshot(request.map(Body::new));
        async move {
            let response = response.await?;
            Ok::<_, Infallible>(response.map(|inner| InFlightBody {
                inner,
                _in_flight: in_flight,
            }))
        }
    });
    // The header timeout is enforced below, from the head's first byte, so hyper's own (which
    // would also close idle connections) is turned off.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let mut serving = pin!(builder.serve_connection(io, service));
    let mut draining = false;
    loop {
        let deadline = match state.deadline(&limits) {
            Deadline::Now(why) => {
                tracing::debug!(%remote, why, "closing an API connection");
                break;
            }
            Deadline::At(at) => Some(at),
            Deadline::Never => None,
        };
        let expiry = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = serving.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%remote, %error, "API connection ended with an error");
                }
                break;
            }
            () = state.changed.notified() => {}
            () = expiry => {}
            () = stopping.cancelled(), if !draining => {
                draining = true;
                // Finishes the request in flight, if any, then closes.
                serving.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What a connection is doing, for its timeouts and for choosing which one makes room.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// No request in flight and no byte of a next one yet.
    Idle { since: Instant },
    /// A request's head has started to arrive; its handler has not been called yet.
    Head { since: Instant },
    /// Requests whose handler or response body is still running.
    Busy { requests: usize },
    /// Closed to make room for a newer connection.
    Evicted,
}

enum Deadline {
    Now(&'static str),
    At(Instant),
    Never,
}

/// One connection's phase, shared by its task, its reads and its requests.
#[derive(Debug)]
struct ConnectionState {
    phase: Mutex<Phase>,
    /// Wakes the connection's task when the phase changes (a stored permit, so a change made
    /// while the task is busy elsewhere is not lost).
    changed: Notify,
}

impl ConnectionState {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Idle {
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // A phase is plain data, always valid: a panic elsewhere leaves nothing half-written.
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bytes_arrived(&self) {
        let mut phase = self.phase();
        if let Phase::Idle { .. } = *phase {
            *phase = Phase::Head {
                since: Instant::now(),
            };
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn deadline(&self, limits: &Limits) -> Deadline {
        match *self.phase() {
            Phase::Idle { since } => Self::expires(since, limits.idle_timeout, "idle"),
            Phase::Head { since } => Self::expires(since, limits.header_timeout, "header timeout"),
            Phase::Busy { .. } => Deadline::Never,
            Phase::Evicted => Deadline::Now("closed to make room for a new connection"),
        }
    }

    fn expires(since: Instant, after: Duration, why: &'static str) -> Deadline {
        match since.checked_add(after) {
            Some(at) if at <= Instant::now() => Deadline::Now(why),
            Some(at) => Deadline::At(at),
            None => Deadline::Never,
        }
    }

    /// Idle connections first, then those sending a head, the longest in that phase first;
    /// `None` for one with a request in flight.
    fn eviction_rank(&self) -> Option<(u8, Instant)> {
        match *self.phase() {
            Phase::Idle { since } => Some((0, since)),
            Phase::Head { since } => Some((1, since)),
            Phase::Busy { .. } | Phase::Evicted => None,
        }
    }

    /// Marks the connection evicted unless a request has started on it meanwhile.
    fn try_evict(&self) -> bool {
        let mut phase = self.phase();
        if let Phase::Idle { .. } | Phase::Head { .. } = *phase {
            *phase = Phase::Evicted;
            drop(phase);
            self.changed.notify_one();
            true
        } else {
            false
        }
    }
}

/// The open connections, to cap their number and choose which one makes room.
#[derive(Debug)]
struct Registry {
    limit: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    connections: HashMap<u64, Arc<ConnectionState>>,
}

/// A connection's place in the [`Registry`], given up when its task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
    state: Arc<ConnectionState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.open().connections.remove(&self.id);
    }
}

impl Registry {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Mutex::new(Open::default()),
        }
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        // The map stays consistent between statements: a poisoned lock holds valid data.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection, first evicting one if the cap is reached; `None` when every
    /// open connection has a request in flight.
    fn admit(registry: &Arc<Self>) -> Option<Registered> {
        let mut open = registry.open();
        if open.connections.len() >= registry.limit && !Self::evict_from(&mut open) {
            return None;
        }
        let id = open.next_id;
        open.next_id += 1;
        let state = Arc::new(ConnectionState::new());
        open.connections.insert(id, Arc::clone(&state));
        Some(Registered {
            registry: Arc::clone(registry),
            id,
            state,
        })
    }

    /// Evicts the connection that is least use to keep, if any is without a request in flight.
    fn evict_one(&self) {
        Self::evict_from(&mut self.open());
    }

    fn evict_from(open: &mut Open) -> bool {
        let mut candidates: Vec<((u8, Instant), u64)> = open
            .connections
            .iter()
            .filter_map(|(&id, state)| Some((state.eviction_rank()?, id)))
            .collect();
        candidates.sort_unstable();
        for (_, id) in candidates {
            let evicted = open
                .connections
                .get(&id)
                .is_some_and(|state| state.try_evict());
            if evicted {
                open.connections.remove(&id);
                return true;
            }
        }
        false
    }
}

/// A request in flight on a connection: from its handler's call to the end (or drop) of its
/// response body.
struct InFlight(Arc<ConnectionState>);

impl InFlight {
    fn start(state: &Arc<ConnectionState>) -> Self {
        {
            let mut phase = state.phase();
            *phase = match *phase {
                Phase::Busy { requests } => Phase::Busy {
                    requests: requests + 1,
                },
                // The connection is closing; the request goes with it.
                Phase::Evicted => Phase::Evicted,
                Phase::Idle { .. } | Phase::Head { .. } => Phase::Busy { requests: 1 },
            };
        }
        state.changed.notify_one();
        Self(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut phase = self.0.phase();
            if let Phase::Busy { requests } = *phase {
                *phase = match requests.checked_sub(1) {
                    Some(requests @ 1..) => Phase::Busy { requests },
                    _ => Phase::Idle {
                        since: Instant::now(),
                    },
                };
            }
        }
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until it is done or dropped, so that a
/// streamed response is never taken for an idle connection.
struct InFlightBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for InFlightBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket that tells its [`ConnectionState`] when bytes arrive, which starts a
/// request's head.
struct Watched {
    stream: TcpStream,
    state: Arc<ConnectionState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let registry = Arc::new(Registry::new(2));
        let first = Registry::admit(&registry).unwrap();
        let second = Registry::admit(&registry).unwrap();
        let _busy = InFlight::start(&first.state);
        let _third = Registry::admit(&registry).unwrap();
        assert!(matches!(*second.state.phase(), Phase::Evicted));
        assert!(matches!(*first.state.phase(), Phase::Busy { requests: 1 }));
    }

    #[test]
    fn with_every_connection_busy_a_new_one_is_refused() {
        let registry = Arc::new(Registry::new(1));
        let only = Registry::admit(&registry).unwrap();
        let busy = InFlight::start(&only.state);
        assert!(Registry::admit(&registry).is_none());
        drop(busy);
        assert!(matches!(*only.state.phase(), Phase::Idle { .. }));
        assert!(Registry::admit(&registry).is_some());
    }

    #[test]
    fn idle_connections_make_room_before_slow_heads() {
        let registry = Arc::new(Registry::new(2));
        let slow = Registry::admit(&registry).unwrap();
        slow.state.bytes_arrived();
        let idle = Registry::admit(&registry).unwrap();
        let _new = Registry::admit(&registry).unwrap();
        assert!(matches!(*idle.state.phase(), Phase::Evicted));
        assert!(matches!(*slow.state.phase(), Phase::Head { .. }));
    }

    #[test]
    fn a_dropped_connection_frees_its_place() {
        let registry = Arc::new(Registry::new(1));
        let only = Registry::admit(&registry).unwrap();
        let _busy = InFlight::start(&only.state);
        assert!(Registry::admit(&registry).is_none());
        drop(only);
        assert!(Registry::admit(&registry).is_some());
    }

    #[test]
    fn refusal_is_a_complete_response_in_the_error_envelope() {
        let response = String::from_utf8(over_capacity_response(7)).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let envelope: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(envelope["error"]["code"], "service_unavailable");
        assert!(envelope["error"]["message"].as_str().unwrap().contains('7'));
    }
}
