//! What every handler shares: the engine, the configuration, the admission queue and the
//! metrics. Its own module so that the handlers' modules and the router do not depend on each
//! other.

use std::sync::Arc;

use exo_core::ToolSyntax;

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

impl AppState {
    /// The tool-call syntax of the chat template of the model a request names (`None`: the
    /// model takes no tools through its template, or is unknown). An id the engine does not
    /// list exactly, with one model served, is taken for that model, as engines resolve it.
    pub(crate) fn tool_syntax(&self, model: Option<&str>) -> Option<ToolSyntax> {
        let models = self.engine.models();
        let card = match models.iter().find(|c| Some(c.id.as_str()) == model) {
            Some(card) => Some(card),
            None if models.len() == 1 => models.first(),
            None => None,
        };
        card.and_then(|c| c.tool_syntax)
    }
}
