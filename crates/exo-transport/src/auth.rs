//! The cluster credential: a secret derived from the cluster key. It never crosses the wire:
//! every node derives the cluster's certificate authority from it, and the shard service runs
//! over TLS 1.3 in which both ends prove with a certificate of that authority that they hold
//! it (see `tls`).

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::tls::Tls;

/// What proves that a process belongs to one cluster.
#[derive(Clone)]
pub struct Credential {
    secret: [u8; 32],
    /// This process's certificate under the cluster's authority, made on first use and shared
    /// by clones.
    tls: Arc<OnceLock<Result<Arc<Tls>, String>>>,
}

impl Credential {
    /// The purpose string to derive a credential from the cluster key with (the cluster key's
    /// `derive`), so that every node derives the same one.
    pub const PURPOSE: &'static str = "exo.shard.v1 credential";

    /// Wraps a derived secret.
    pub fn new(secret: [u8; 32]) -> Self {
        Credential {
            secret,
            tls: Arc::new(OnceLock::new()),
        }
    }

    /// This process's TLS settings (its key and certificate, the cluster's authority).
    pub(crate) fn tls(&self) -> Result<Arc<Tls>, String> {
        self.tls
            .get_or_init(|| Tls::new(&self.secret).map(Arc::new))
            .clone()
    }
}

impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        // Constant time: how much of a secret matched must not show in the time taken.
        self.secret
            .iter()
            .zip(&other.secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for Credential {}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(..)")
    }
}
