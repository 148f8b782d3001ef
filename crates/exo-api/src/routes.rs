//! The router: which handler answers which path, and the layers around them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, Method};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::anthropic;
use crate::config::ApiConfig;
use crate::embeddings;
use crate::engine::{Engine, ModelCard, Readiness};
use crate::error::ApiError;
use crate::generate::{Api, respond};
use crate::middleware::{self, RequestLog};
use crate::ollama;
use crate::queue::Admission;
use crate::request::{self, JsonObject};
use crate::responses;
use crate::schema;
use crate::state::AppState;
use crate::telemetry::{self, Metrics};
use crate::web;

/// Every routed path, in OpenAPI's notation, with its methods. The OpenAPI document is
/// checked against this list in the tests.
#[cfg(test)]
pub(crate) const PATHS: &[(&str, &[&str])] = &[
    ("/v1/chat/completions", &["post"]),
    ("/v1/completions", &["post"]),
    ("/v1/models", &["get"]),
    ("/v1/models/{model}", &["get"]),
    ("/v1/cluster", &["get"]),
    ("/v1/cluster/events", &["get"]),
    ("/healthz", &["get"]),
    ("/health", &["get"]),
    ("/metrics", &["get"]),
    ("/readyz", &["get"]),
    ("/openapi.json", &["get"]),
    ("/", &["get"]),
    ("/ui/{file}", &["get"]),
    ("/api/chat", &["post"]),
    ("/api/generate", &["post"]),
    ("/api/tags", &["get"]),
    ("/api/show", &["post"]),
    ("/api/ps", &["get"]),
    ("/api/version", &["get"]),
    ("/v1/messages", &["post"]),
    ("/v1/responses", &["post"]),
    ("/v1/embeddings", &["post"]),
    ("/api/embed", &["post"]),
    ("/api/embeddings", &["post"]),
];

/// Builds the API's router over `engine`; see the crate documentation for the routes.
pub fn router(engine: Arc<dyn Engine>, config: ApiConfig) -> Router {
    let admission = Arc::new(Admission::new(config.max_concurrent, config.max_queued));
    let cors = cors(&config.cors_origins);
    let api_key: Option<Arc<str>> = config.api_key.as_deref().map(Arc::from);
    let body_limit = DefaultBodyLimit::max(config.max_body_bytes);
    let body_timeout = config.request_body_timeout;
    let metrics = Arc::new(Metrics::new());
    let state = AppState {
        engine,
        config: Arc::new(config),
        admission,
        metrics: Arc::clone(&metrics),
    };

    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        // Model ids such as `meta-llama/Llama-3.2-1B` contain slashes.
        .route("/v1/models/{*model}", get(get_model))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/events", get(cluster_events))
        .route("/healthz", get(healthz))
        .route("/health", get(healthz))
        .route("/metrics", get(scrape_metrics))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/", get(web::index))
        .route("/ui/{file}", get(web::asset))
        // Ollama's dialect, over the same engine and queue.
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/api/embed", post(embeddings::ollama_embed))
        .route("/api/embeddings", post(embeddings::ollama_embeddings))
        // Anthropic's Messages dialect.
        .route("/v1/messages", post(anthropic::messages))
        // OpenAI's Responses dialect.
        .route("/v1/responses", post(responses::create))
        // Embeddings, pooled on the last stage.
        .route("/v1/embeddings", post(embeddings::openai))
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .fallback(middleware::not_found)
        .layer(body_limit)
        .with_state(state);
    if let Some(key) = api_key {
        router = router.layer(axum::middleware::from_fn_with_state(
            key,
            middleware::require_api_key,
        ));
    }
    router = router.layer(axum::middleware::from_fn_with_state(
        body_timeout,
        middleware::limit_body_time,
    ));
    // Outside the key check, so that 401s are counted.
    router = router.layer(axum::middleware::from_fn_with_state(
        metrics,
        telemetry::count_requests,
    ));
    router = router.layer(axum::middleware::from_fn(middleware::log_requests));
    // Outermost, so that preflight requests are answered without a key and that errors,
    // 401s included, carry the headers a browser needs to read them.
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    router
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|origin| {
            HeaderValue::from_str(origin)
                .inspect_err(|_| tracing::warn!(%origin, "ignoring unusable CORS origin"))
                .ok()
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST])
            // A wildcard would not cover `Authorization`, so echo what the browser asks for.
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(Duration::from_secs(3600)),
    )
}

async fn chat_completions(
    State(state): State<AppState>,
    log: RequestLog,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let native = state.tool_syntax(body.get("model").and_then(Value::as_str));
    let parsed = request::chat(&body, state.config.default_max_tokens, native)?;
    respond(&state, Api::Chat, parsed, log).await
}

async fn completions(
    State(state): State<AppState>,
    log: RequestLog,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let parsed = request::completion(&body, state.config.default_max_tokens)?;
    respond(&state, Api::Completion, parsed, log).await
}

fn model_object(card: &ModelCard) -> schema::Model {
    schema::Model {
        id: card.id.clone(),
        object: schema::ModelObject::Name,
        created: card.created,
        owned_by: card.owned_by.clone(),
        context_length: card.context_length,
        tool_syntax: card.tool_syntax.map(|s| s.name()),
    }
}

async fn list_models(State(state): State<AppState>) -> Json<schema::ModelList> {
    Json(schema::ModelList {
        object: schema::ListObject::Name,
        data: state.engine.models().iter().map(model_object).collect(),
    })
}

async fn get_model(
    State(state): State<AppState>,
    model: Result<Path<String>, PathRejection>,
) -> Result<Json<schema::Model>, ApiError> {
    let Path(model) = model.map_err(|rejection| {
        ApiError::invalid_param(
            "model",
            format!("unreadable model id: {}", rejection.body_text()),
        )
    })?;
    let models = state.engine.models();
    match models.iter().find(|card| card.id == model) {
        Some(card) => Ok(Json(model_object(card))),
        None => Err(ApiError::unknown_model(
            &model,
            models.into_iter().map(|card| card.id).collect(),
        )),
    }
}

async fn cluster(State(state): State<AppState>) -> Response {
    Json(state.engine.cluster().await).into_response()
}

/// Comment lines sent on an idle event stream, so that proxies keep it open and a browser that
/// went away is noticed.
const EVENTS_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/cluster/events`: the cluster view now, then again each time it changes, as
/// server-sent events named `cluster` whose data is a `ClusterView`.
async fn cluster_events(State(state): State<AppState>) -> Response {
    let mut live = state.engine.cluster_events();
    let first = match live.as_mut() {
        Some(rx) => rx.borrow_and_update().clone(),
        None => state.engine.cluster().await,
    };
    let views = futures::stream::unfold((Some(first), live), |(first, live)| async move {
        if let Some(view) = first {
            return Some((view, (None, live)));
        }
        match live {
            Some(mut rx) => {
                // Only changes after the view already sent; a dropped sender ends the stream.
                rx.changed().await.ok()?;
                let view = rx.borrow_and_update().clone();
                Some((view, (None, Some(rx))))
            }
            // No live view: the stream stays open with keep-alive comments only.
            None => std::future::pending().await,
        }
    });
    let events = futures::StreamExt::map(views, |view| {
        Event::default()
            .event("cluster")
            .json_data(view)
            .or_else(|error| {
                tracing::error!(%error, "cluster view not serialisable");
                Ok::<_, Infallible>(Event::default().comment("unserialisable view"))
            })
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(EVENTS_KEEP_ALIVE))
        .into_response()
}

async fn healthz() -> Json<schema::HealthBody> {
    Json(schema::HealthBody { status: "ok" })
}

/// 200 once the engine can serve, 503 with the reason until then (`GET /healthz` only says
/// the API answers).
async fn readyz(State(state): State<AppState>) -> Response {
    let (status, body) = match state.engine.readiness() {
        Readiness::Ready => (
            axum::http::StatusCode::OK,
            schema::ReadinessBody {
                status: schema::ReadinessStatus::Ready,
                reason: None,
            },
        ),
        Readiness::NotReady(reason) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            schema::ReadinessBody {
                status: schema::ReadinessStatus::NotReady,
                reason: Some(reason),
            },
        ),
    };
    (status, Json(body)).into_response()
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::openapi())
}

/// `GET /metrics`: every metric in Prometheus's text format.
async fn scrape_metrics(State(state): State<AppState>) -> Response {
    let cluster = state.engine.cluster().await;
    let text = state.metrics.render(&state.admission, &cluster);
    (
        [(axum::http::header::CONTENT_TYPE, telemetry::CONTENT_TYPE)],
        text,
    )
        .into_response()
}
