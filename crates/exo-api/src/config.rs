//! How the HTTP API is configured.

use std::fmt;
use std::time::Duration;

/// Settings for [`router`](crate::router) and [`serve`](crate::serve).
#[derive(Clone)]
pub struct ApiConfig {
    /// When set, every `/v1/*` route and `/metrics` require `Authorization: Bearer <key>`;
    /// `/healthz` and `/openapi.json` stay open. A missing or wrong key gets 401.
    pub api_key: Option<String>,
    /// Origins allowed to call the API from a browser; `"*"` allows any. Empty means no CORS
    /// headers at all, so browsers on other origins are refused.
    pub cors_origins: Vec<String>,
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Generations running at once; 0 is treated as 1.
    pub max_concurrent: usize,
    /// Generations allowed to wait for a running slot; beyond that, requests get 429 at once.
    pub max_queued: usize,
    /// The `max_tokens` used when a request gives none; `None` leaves it to the engine.
    pub default_max_tokens: Option<usize>,
    /// Connections [`serve`](crate::serve) keeps open at once; 0 is treated as 1. At the cap a
    /// new connection closes the longest-idle one (no request in flight), or failing that the
    /// one slowest to send its request's head; when every connection has a request in flight,
    /// the new one gets 503 with `Retry-After` and is closed.
    pub max_connections: usize,
    /// How long a request's head (request line and headers) may take to arrive, counted from
    /// its first byte; a slower client's connection is closed.
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive, counted from the end of its head; a
    /// slower one gets 408 and its connection is closed.
    pub request_body_timeout: Duration,
    /// How long a connection may stay open with no request in flight and no byte of a next
    /// one; it is then closed. Responses, streamed ones included, are never cut by it.
    pub idle_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            cors_origins: Vec::new(),
            max_body_bytes: 4 << 20,
            max_concurrent: 16,
            max_queued: 64,
            default_max_tokens: None,
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

// Written by hand so that the API key never reaches a log line.
impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("cors_origins", &self.cors_origins)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_queued", &self.max_queued)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .field("request_body_timeout", &self.request_body_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_api_key() {
        let config = ApiConfig {
            api_key: Some("sk-secret".into()),
            ..ApiConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
