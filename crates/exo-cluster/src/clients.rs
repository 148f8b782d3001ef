//! Connections to other nodes' shard services, dialled on first use and shared by every
//! request (a tonic channel multiplexes streams).

use std::collections::HashMap;
use std::sync::Mutex;

use exo_transport::{Credential, Limits, ShardClient};

/// One connection per endpoint, presenting the cluster's credential.
#[derive(Debug)]
pub(crate) struct ClientPool {
    credential: Credential,
    limits: Limits,
    clients: Mutex<HashMap<String, ShardClient>>,
}

impl ClientPool {
    pub(crate) fn new(credential: Credential, limits: Limits) -> Self {
        ClientPool {
            credential,
            limits,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client for `endpoint`, connecting on first use.
    pub(crate) async fn get(&self, endpoint: &str) -> exo_transport::Result<ShardClient> {
        if let Some(c) = self
            .clients
            .lock()
            .ok()
            .and_then(|m| m.get(endpoint).cloned())
        {
            return Ok(c);
        }
        let client = ShardClient::connect(endpoint, Some(&self.credential), self.limits).await?;
        if let Ok(mut map) = self.clients.lock() {
            map.insert(endpoint.to_owned(), client.clone());
        }
        Ok(client)
    }

    /// Forgets a connection that failed, so the next call dials again.
    pub(crate) fn forget(&self, endpoint: &str) {
        if let Ok(mut map) = self.clients.lock() {
            map.remove(endpoint);
        }
    }
}
