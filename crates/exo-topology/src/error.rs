//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong starting or talking to the cluster membership service.
///
/// Problems with other nodes (a peer with another cluster key, an unreachable address) are not
/// errors: they are reported as [`crate::PeerDiagnostic`]s, because the local node keeps working.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file in the node's home folder could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The node identity file exists but does not hold a key pair.
    #[error("{path}: invalid node identity: {message} (delete the file to make a new identity)")]
    Identity {
        /// The identity file (`node.key`).
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A cluster key (given on the command line, in the environment or in a file) is malformed.
    #[error("invalid cluster key from {origin}: {message}")]
    ClusterKey {
        /// Where the key came from (`--cluster-key`, a file path).
        origin: String,
        /// What was wrong with it.
        message: String,
    },
    /// A peer or listen address could not be understood.
    #[error("invalid address `{address}`: {message}")]
    Address {
        /// The address as given.
        address: String,
        /// What was wrong with it.
        message: String,
    },
    /// The node could not listen on an address.
    #[error("cannot listen on {address}: {message}")]
    Listen {
        /// The listen address.
        address: String,
        /// What the transport said.
        message: String,
    },
    /// The libp2p swarm could not be built.
    #[error("cannot build the network stack: {0}")]
    Network(String),
    /// A dial requested through the client could not be started.
    #[error("cannot dial {address}: {message}")]
    Dial {
        /// The address dialled.
        address: String,
        /// Why it could not be dialled.
        message: String,
    },
    /// Joining by a code (or offering an invitation) failed.
    #[error("{0}")]
    Join(String),
    /// The membership service has stopped (it was shut down, or its task ended).
    #[error("the topology service has stopped")]
    Stopped,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
