//! The shard service's accepted connections: a cap on how many are open, a time limit on a
//! connection's first byte, and an accept loop that outlives errors such as running out of
//! file descriptors.
//!
//! tonic has no connection cap, and its accept loop retries a failed accept at once: with the
//! process out of file descriptors the listener stays readable, so it spins. The limits tonic
//! does have are set in `server::serve`; a request timeout is not among them, since links and
//! deliveries are streams that last as long as a plan.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections the shard service keeps open at once: far more than a cluster's peers, clients
/// and gateways need, and far fewer than a default soft limit of 1,024 open files, so that a
/// flood of connections here leaves the process descriptors for its HTTP API and its peers.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// How long an accepted connection may stay silent before its first byte. gRPC clients send
/// the HTTP/2 preface at once; after it, HTTP/2 keep-alive pings find a dead peer.
pub(crate) const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the accept loop waits after an error that is not one connection's (out of file
/// descriptors, out of memory) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections accepted on `listener` once each has completed a TLS handshake with `tls`
/// within `first_byte_timeout`. At most `max_connections` are open at once (handshaking or
/// not); beyond that a new one is closed at once. Errors accepting are logged at most once a
/// second and retried. Handshakes run side by side, so a slow or silent client delays no one;
/// a failed one closes its connection and is logged (at most once a second). Dropping the
/// stream closes the listener.
pub(crate) fn accept_tls(
    listener: TcpListener,
    max_connections: usize,
    first_byte_timeout: Duration,
    tls: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsStream<Capped>>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Refused handshakes are logged like the accept loop's errors, at most once a second.
    let refusals = Arc::new(std::sync::Mutex::new(RareLog::default()));
    tokio::spawn(async move {
        let mut state = Accepting::new(listener, max_connections, first_byte_timeout);
        loop {
            let capped = tokio::select! {
                capped = state.next() => capped,
                () = tx.closed() => return,
            };
            let (acceptor, tx, refusals) = (acceptor.clone(), tx.clone(), Arc::clone(&refusals));
            tokio::spawn(async move {
                let peer = capped.stream.peer_addr().ok();
                let handshake = acceptor.accept(capped);
                match tokio::time::timeout(first_byte_timeout, handshake).await {
                    Ok(Ok(secured)) => {
                        let _ = tx.send(Ok(secured)).await;
                    }
                    Ok(Err(e)) => match crate::tls::refusal(&e) {
                        Some(why) => {
                            let peer = peer
                                .map_or_else(|| "an unknown address".to_owned(), |p| p.to_string());
                            if let Ok(mut log) = refusals.lock() {
                                log.warn(&format!("refused a shard connection from {peer}: {why}"));
                            }
                        }
                        None => tracing::debug!(?peer, error = %e, "a TLS handshake failed"),
                    },
                    Err(_) => tracing::debug!(?peer, "a TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

struct Accepting {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    first_byte_timeout: Duration,
    log: RareLog,
}

impl Accepting {
    fn new(listener: TcpListener, max_connections: usize, first_byte_timeout: Duration) -> Self {
        Accepting {
            listener,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            first_byte_timeout,
            log: RareLog::default(),
        }
    }

    async fn next(&mut self) -> Capped {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    self.log
                        .warn(&format!("accepting a shard connection failed: {error}"));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                self.log
                    .warn("refusing a shard connection: at the connection cap");
                continue;
            };
            // Activation frames are latency-bound: they must not wait for Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            return Capped {
                stream,
                _permit: permit,
                first_byte: Some(Box::pin(tokio::time::sleep(self.first_byte_timeout))),
            };
        }
    }
}

/// A warning logged at most once a second, with the number of lines left out since the last
/// (a flood of bad connections must not flood the log).
#[derive(Default)]
struct RareLog {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl RareLog {
    fn warn(&mut self, message: &str) {
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = self.suppressed, "{message}");
        self.last_logged = Some(now);
        self.suppressed = 0;
    }
}

/// Errors that concern one connection only: the next accept may well succeed at once.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// An accepted connection holding its place under the cap until it is dropped.
pub(crate) struct Capped {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Runs until the first byte arrives; a connection still silent when it ends fails.
    first_byte: Option<Pin<Box<Sleep>>>,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_byte = None,
            Poll::Pending => {
                if let Some(first_byte) = self.first_byte.as_mut()
                    && first_byte.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no byte within the first-byte timeout",
                    )));
                }
            }
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for Capped {
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

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The connections accepted on `listener`, at most `max_connections` open at once; beyond
    /// that a new connection is closed at once (its client sees a reset and may retry). Never
    /// yields an error and never ends: errors accepting are logged at most once a second and
    /// retried. Dropping the stream closes the listener.
    fn accept(
        listener: TcpListener,
        max_connections: usize,
        first_byte_timeout: Duration,
    ) -> impl Stream<Item = io::Result<Capped>> + Send + 'static {
        let state = Accepting::new(listener, max_connections, first_byte_timeout);
        futures::stream::unfold(state, |mut state| async move {
            let capped = state.next().await;
            Some((Ok(capped), state))
        })
    }

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    #[tokio::test]
    async fn beyond_the_cap_a_connection_is_closed_until_a_place_frees() {
        let (listener, address) = listener().await;
        let mut incoming = Box::pin(accept(listener, 1, Duration::from_secs(10)));
        let mut first = TcpStream::connect(address).await.unwrap();
        let held = incoming.next().await.unwrap().unwrap();

        let mut refused = TcpStream::connect(address).await.unwrap();
        // The accept loop refuses `refused` while looking for a connection it can hold.
        let next = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), refused.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        first.write_all(b"x").await.unwrap();

        drop(held);
        let _third = TcpStream::connect(address).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(10), next).await;
        assert!(matches!(accepted, Ok(Ok(Some(true)))), "{accepted:?}");
    }

    #[tokio::test]
    async fn a_connection_silent_past_the_first_byte_timeout_fails() {
        let (listener, address) = listener().await;
        let mut incoming = Box::pin(accept(listener, 4, Duration::from_millis(200)));
        let _silent = TcpStream::connect(address).await.unwrap();
        let mut server_side = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(10), server_side.read(&mut buf)).await;
        let error = read.unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        let mut talking = TcpStream::connect(address).await.unwrap();
        talking.write_all(b"PRI").await.unwrap();
        let mut server_side = incoming.next().await.unwrap().unwrap();
        let read = server_side.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..read], b"PRI");
        tokio::time::sleep(Duration::from_millis(400)).await;
        talking.write_all(b" *").await.unwrap();
        let read = server_side.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..read],
            b" *",
            "a connection that spoke is not timed out"
        );
    }
}
