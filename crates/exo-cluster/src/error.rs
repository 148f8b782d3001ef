//! The runtime's error type.

/// What can go wrong starting or running a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the model failed.
    #[error(transparent)]
    Model(#[from] exo_model::Error),
    /// Building or running the shard failed.
    #[error(transparent)]
    Shard(#[from] exo_shard::Error),
    /// Cluster membership failed.
    #[error(transparent)]
    Topology(#[from] exo_topology::Error),
    /// A call between nodes failed.
    #[error(transparent)]
    Transport(#[from] exo_transport::Error),
    /// Binding a socket failed.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
