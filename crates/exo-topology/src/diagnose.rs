//! Telling apart why a connection failed or ended: unreachable, another cluster key, a copied
//! identity, a clean departure. libp2p nests transport errors several levels deep, so this
//! walks the whole chain.

use std::error::Error as StdError;

use libp2p::Multiaddr;
use libp2p::core::transport::TransportError;
use libp2p::core::transport::memory::MemoryTransportError;
use libp2p::swarm::{ConnectionError, DialError};

use crate::event::{LeaveReason, Problem};
use crate::network::KeyMismatch;
use crate::profile::NodeId;

pub(crate) fn failed_address(error: &DialError) -> Option<Multiaddr> {
    match error {
        DialError::Transport(errors) => errors.first().map(|(a, _)| a.clone()),
        DialError::LocalPeerId { address } | DialError::WrongPeerId { address, .. } => {
            Some(address.clone())
        }
        _ => None,
    }
}

pub(crate) fn leave_reason(cause: Option<&ConnectionError>) -> LeaveReason {
    match cause {
        None => LeaveReason::Disconnected,
        Some(ConnectionError::IO(e)) => {
            let closed = chain_has_io(e, |e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            }) || chain_text(e).contains("closed");
            if closed {
                LeaveReason::Closed
            } else {
                LeaveReason::Error {
                    detail: chain_text(e),
                }
            }
        }
        Some(other) => LeaveReason::Error {
            detail: other.to_string(),
        },
    }
}

/// Ranks problems so that a dial with several addresses reports the most telling one.
fn rank(problem: &Problem) -> u8 {
    match problem {
        Problem::DuplicateIdentity { .. } => 5,
        Problem::ClusterKeyMismatch { .. } => 4,
        Problem::HandshakeFailed { .. } => 3,
        Problem::IncompatibleVersion { .. } => 4,
        Problem::WrongPeer { .. } => 3,
        Problem::Other { .. } => 2,
        Problem::Unreachable { .. } => 1,
    }
}

pub(crate) fn classify_dial(error: &DialError) -> Problem {
    match error {
        DialError::LocalPeerId { address } => Problem::DuplicateIdentity {
            detail: format!("the node at {address} presents this node's own identity"),
        },
        DialError::WrongPeerId { obtained, .. } => Problem::WrongPeer {
            obtained: NodeId::from(*obtained),
        },
        DialError::Transport(errors) => errors
            .iter()
            .map(|(address, error)| match error {
                TransportError::MultiaddrNotSupported(_) => Problem::Unreachable {
                    detail: format!("{address} is not an address this node can dial"),
                },
                TransportError::Other(e) => classify_io(e),
            })
            .max_by_key(rank)
            .unwrap_or(Problem::Other {
                detail: error.to_string(),
            }),
        DialError::NoAddresses => Problem::Unreachable {
            detail: "no address to dial".to_owned(),
        },
        other => Problem::Other {
            detail: other.to_string(),
        },
    }
}

/// Tells a failed connection (refused, no route, no answer) from another cluster key (the key
/// check right after the private-network handshake says so) and from any other failed
/// handshake.
pub(crate) fn classify_io(error: &std::io::Error) -> Problem {
    use std::io::ErrorKind as K;
    let text = chain_text(error);
    if chain_has(error, |e| e.is::<KeyMismatch>()) || text.contains("another cluster key") {
        return Problem::ClusterKeyMismatch { detail: text };
    }
    let unreachable = chain_has_io(error, |e| {
        matches!(
            e.kind(),
            K::ConnectionRefused
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::AddrNotAvailable
                | K::TimedOut
        )
    }) || chain_has(error, |e| {
        matches!(
            e.downcast_ref::<MemoryTransportError>(),
            Some(MemoryTransportError::Unreachable)
        )
    }) || [
        // Some layers of libp2p's transport stack show their inner error without exposing it
        // as a source; their text is all there is to go on.
        "Timeout has been reached",
        "No listener on the given port",
        "Connection refused",
        "No route to host",
        "Network is unreachable",
    ]
    .iter()
    .any(|t| text.contains(t));
    if unreachable {
        Problem::Unreachable { detail: text }
    } else {
        Problem::HandshakeFailed { detail: text }
    }
}

/// The error and every error below it. An `io::Error` that wraps another error hides it from
/// `source()` (which skips to the wrapped error's own source), so it is opened with `get_ref`.
fn chain<'a>(error: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        out.push(e);
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
        if out.len() > 32 {
            break;
        }
    }
    out
}

fn chain_has(
    error: &(dyn StdError + 'static),
    test: impl Fn(&(dyn StdError + 'static)) -> bool,
) -> bool {
    chain(error).into_iter().any(test)
}

fn chain_has_io(error: &std::io::Error, test: impl Fn(&std::io::Error) -> bool) -> bool {
    chain_has(error, |e| {
        e.downcast_ref::<std::io::Error>().is_some_and(&test)
    })
}

/// The error and its sources, joined: libp2p nests transport errors several levels deep.
pub(crate) fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in chain(error) {
        let text = e.to_string();
        if parts.iter().all(|p| !p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn failures_are_told_apart_through_nested_errors() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            classify_io(&std::io::Error::other(std::io::Error::other(refused))),
            Problem::Unreachable { .. }
        ));
        let key = std::io::Error::new(std::io::ErrorKind::PermissionDenied, KeyMismatch);
        assert!(matches!(
            classify_io(&std::io::Error::other(key)),
            Problem::ClusterKeyMismatch { .. }
        ));
        let garbled = std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid multistream");
        assert!(matches!(
            classify_io(&garbled),
            Problem::HandshakeFailed { .. }
        ));
        let text = chain_text(&std::io::Error::other(std::io::Error::other(KeyMismatch)));
        assert_eq!(text, "the peer uses another cluster key");
    }
}
