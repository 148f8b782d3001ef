//! Embeddings: OpenAI's `/v1/embeddings` and Ollama's `/api/embed` and `/api/embeddings`.
//! Each input runs through the cluster as a request of its own that generates nothing: the
//! last stage pools the prompt's last hidden states (their mean after the final norm,
//! L2-normalised, as llama.cpp's `--pooling mean` does) and hands the vector back. Inputs run
//! up to `--max-concurrent` at a time, so several share the stages' batched steps.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use exo_core::GenerationRequest;

use crate::error::ApiError;
use crate::fields::{describe, missing};
use crate::generate::{Params, Running};
use crate::middleware::RequestLog;
use crate::ollama::{OllamaError, resolve};
use crate::request::JsonObject;
use crate::schema::ollama::{
    OllamaEmbedRequest, OllamaEmbedResponse, OllamaEmbeddingsRequest, OllamaEmbeddingsResponse,
};
use crate::schema::{self, Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, MAX_INPUTS};
use crate::state::AppState;

/// The fields blamed for an engine's error about an input.
const PARAMS: Params = Params {
    prompt: "input",
    constraint: "input",
};

/// `POST /v1/embeddings`.
pub(crate) async fn openai(
    State(state): State<AppState>,
    log: RequestLog,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = schema::read(&body)?;
    let model = request.model;
    let inputs = inputs(request.input.as_ref(), "input")?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("'encoding_format' must be 'float' or 'base64', got '{other}'"),
            ));
        }
    };
    let dimensions = request.dimensions;
    let (vectors, prompt_tokens) = embed_all(&state, &log, &model, inputs).await?;
    if let (Some(asked), Some(first)) = (dimensions, vectors.first())
        && asked != first.len() as u64
    {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!(
                "this model's embeddings have {} dimensions and cannot be shortened; \
                 leave 'dimensions' out or set it to {}",
                first.len(),
                first.len()
            ),
        ));
    }
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: schema::EmbeddingObject::Name,
            index,
            embedding: if base64 {
                Value::String(base64_f32(v))
            } else {
                json!(v)
            },
        })
        .collect();
    Ok(Json(EmbeddingList {
        object: schema::ListObject::Name,
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
    .into_response())
}

/// `POST /api/embed` (Ollama): `input` a string or strings; `embeddings` back.
pub(crate) async fn ollama_embed(
    State(state): State<AppState>,
    log: RequestLog,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, OllamaError> {
    let started = std::time::Instant::now();
    let JsonObject(body) = body?;
    let typed: OllamaEmbedRequest = schema::read(&body)?;
    let inputs = inputs(typed.input.as_ref(), "input")?;
    let (embeddings, prompt_eval_count) =
        embed_all(&state, &log, &resolve(&state, &typed.model), inputs).await?;
    Ok(Json(OllamaEmbedResponse {
        model: typed.model,
        embeddings,
        total_duration: started.elapsed().as_nanos() as u64,
        load_duration: 0,
        prompt_eval_count,
    })
    .into_response())
}

/// `POST /api/embeddings` (Ollama's older form): one `prompt`, one `embedding` back.
pub(crate) async fn ollama_embeddings(
    State(state): State<AppState>,
    log: RequestLog,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, OllamaError> {
    let JsonObject(body) = body?;
    let typed: OllamaEmbeddingsRequest = schema::read(&body)?;
    let inputs = inputs(typed.prompt.as_ref(), "prompt")?;
    let (mut vectors, _) = embed_all(&state, &log, &resolve(&state, &typed.model), inputs).await?;
    Ok(Json(OllamaEmbeddingsResponse {
        embedding: vectors.pop().unwrap_or_default(),
    })
    .into_response())
}

/// The texts to embed: `name` holds a string or an array of strings, each non-empty.
fn inputs(value: Option<&Value>, name: &str) -> Result<Vec<String>, ApiError> {
    let token_ids = || {
        ApiError::invalid_param(
            name,
            format!(
                "'{name}' holds token ids; this server embeds text only, as its own tokenizer \
                 reads it: send the strings (LangChain's OpenAIEmbeddings: set \
                 check_embedding_ctx_length=False)"
            ),
        )
    };
    let texts = match value {
        None => return Err(missing(name)),
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid_param(
                name,
                format!("'{name}' must hold at least one text"),
            ));
        }
        Some(Value::Array(items)) if items.len() > MAX_INPUTS => {
            return Err(ApiError::invalid_param(
                name,
                format!(
                    "'{name}' holds {} inputs; at most {MAX_INPUTS} per request",
                    items.len()
                ),
            ));
        }
        Some(Value::Array(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(text) => texts.push(text.clone()),
                    Value::Number(_) | Value::Array(_) => return Err(token_ids()),
                    other => {
                        return Err(ApiError::invalid_param(
                            name,
                            format!("'{name}[{i}]' must be a string, got {}", describe(other)),
                        ));
                    }
                }
            }
            texts
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                name,
                format!(
                    "'{name}' must be a string or an array of strings, got {}",
                    describe(other)
                ),
            ));
        }
    };
    if let Some(i) = texts.iter().position(String::is_empty) {
        let at = if texts.len() == 1 {
            format!("'{name}'")
        } else {
            format!("'{name}[{i}]'")
        };
        return Err(ApiError::invalid_param(
            name,
            format!("{at} is empty: there is nothing to embed"),
        ));
    }
    Ok(texts)
}

/// Embeds every text, up to `--max-concurrent` at once, in the inputs' order; with the
/// prompt tokens they took in all.
async fn embed_all(
    state: &AppState,
    log: &RequestLog,
    model: &str,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, u64), ApiError> {
    let at_once = state.config.max_concurrent.max(1);
    let results: Vec<(Vec<f32>, u32)> = futures::stream::iter(texts)
        .map(|text| {
            let mut request = GenerationRequest::embedding(text);
            request.model = model.to_owned();
            let log = log.clone();
            async move {
                let mut running = Running::start(state, request, PARAMS, log).await?;
                let (values, finished) = running.embedding().await?;
                Ok::<_, ApiError>((values, finished.prompt_tokens))
            }
        })
        .buffered(at_once)
        .try_collect()
        .await?;
    let tokens = results.iter().map(|(_, t)| u64::from(*t)).sum();
    Ok((results.into_iter().map(|(v, _)| v).collect(), tokens))
}

/// Values as OpenAI's `encoding_format: "base64"` sends them: little-endian f32 bytes in
/// standard base64 (what the official SDKs ask for by default and decode).
fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 is 00 00 80 3f; 2.0f32 is 00 00 00 40.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
        assert_eq!(base64_f32(&[]), "");
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]), "AAAAAAAAAAAAAAAA");
    }

    fn parse(body: Value) -> Result<Vec<String>, ApiError> {
        inputs(body.get("input").filter(|v| !v.is_null()), "input")
    }

    #[test]
    fn inputs_are_strings_and_errors_name_what_is_wrong() {
        assert_eq!(parse(json!({"input": "a"})).unwrap(), vec!["a"]);
        assert_eq!(parse(json!({"input": ["a", "b"]})).unwrap(), vec!["a", "b"]);
        let message = |body| parse(body).unwrap_err().message().to_owned();
        assert!(message(json!({})).contains("missing"));
        assert!(message(json!({"input": [1, 2]})).contains("token ids"));
        assert!(message(json!({"input": [[1, 2]]})).contains("token ids"));
        assert!(message(json!({"input": []})).contains("at least one"));
        assert!(message(json!({"input": ["a", ""]})).contains("'input[1]' is empty"));
        assert!(message(json!({"input": ""})).contains("'input' is empty"));
        assert!(message(json!({"input": ["a", {}]})).contains("'input[1]' must be a string"));
        assert!(message(json!({"input": vec!["a"; MAX_INPUTS + 1]})).contains("at most"));
    }
}
