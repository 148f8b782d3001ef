//! What every handler shares: the engine, the configuration, the admission queue and the
//! metrics. Its own module so that the handlers' modules and the router do not depend on each
//! other.

use std::sync::Arc;

use crate::config::ApiConfig;
use crate::engine::Engine;
use crate::queue::Admission;
use crate::telemetry::Metrics;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) metrics: Arc<Metrics>,
}
