//! How the HTTP API is configured.

use std::fmt;

/// Settings for [`router`](crate::router) and [`serve`](crate::serve).
#[derive(Clone)]
pub struct ApiConfig {
    /// When set, every `/v1/*` route requires `Authorization: Bearer <key>`; `/healthz` and
    /// `/openapi.json` stay open. A missing or wrong key gets 401.
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
