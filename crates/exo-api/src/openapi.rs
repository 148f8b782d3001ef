//! The OpenAPI 3.1 document served at `/openapi.json`.
//!
//! The request and response bodies are derived from the types the handlers read and write
//! (`schema.rs` and the cluster views, with utoipa); the paths are written here. It names only
//! the fields the API reads or writes; other request fields are accepted and ignored, as
//! OpenAI's are.

use serde_json::{Value, json};

/// The OpenAPI 3.1 document describing every route, its request and response bodies, and
/// the error envelope. It is also served at `GET /openapi.json`.
pub fn openapi() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "exo-rs OpenAI-compatible API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Chat and text completions served by a cluster of exo-rs nodes. \
                When the server has an API key configured, every /v1 route, /metrics and \
                every /api route (Ollama's dialect) require `Authorization: Bearer <key>`.",
        },
        "paths": paths(),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": schemas(),
            "responses": error_responses(),
        },
    })
}

fn paths() -> Value {
    let secured = json!([{"bearer": []}]);
    let mut paths = json!({
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "summary": "Generate the assistant's next message",
                "security": secured,
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": schema_ref("ChatCompletionRequest")}},
                },
                "responses": generation_responses("ChatCompletion", "ChatCompletionChunk"),
            },
        },
        "/v1/completions": {
            "post": {
                "operationId": "createCompletion",
                "summary": "Continue a text prompt (legacy completions)",
                "security": secured,
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": schema_ref("CompletionRequest")}},
                },
                "responses": generation_responses("Completion", "Completion"),
            },
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "List the models the cluster can serve now",
                "security": secured,
                "responses": with_errors(
                    json!({"200": ok_json("The models", "ModelList")}),
                    &["401"],
                ),
            },
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "summary": "Describe one model",
                "security": secured,
                "parameters": [{
                    "name": "model",
                    "in": "path",
                    "required": true,
                    "description": "The model id; it may contain slashes.",
                    "schema": {"type": "string"},
                }],
                "responses": with_errors(
                    json!({"200": ok_json("The model", "Model")}),
                    &["401", "404"],
                ),
            },
        },
        "/v1/cluster": {
            "get": {
                "operationId": "getCluster",
                "summary": "The cluster's nodes, measured links and placement plan",
                "security": secured,
                "responses": with_errors(
                    json!({"200": ok_json("The cluster", "ClusterView")}),
                    &["401"],
                ),
            },
        },
        "/v1/cluster/events": {
            "get": {
                "operationId": "watchCluster",
                "summary": "The cluster view now, then again each time it changes (the web page's live view)",
                "description": "A server-sent event stream: one event named `cluster` whose `data:` \
                    line is a ClusterView, sent at once and again whenever the view changes \
                    (membership, the plan, loading progress, and while the stream is open the \
                    stages' figures, at most about once a second). Idle streams carry comment \
                    lines every 15 s. Browsers read it with `fetch` and a streaming reader, \
                    which can send the API key (`EventSource` cannot).",
                "security": secured,
                "responses": with_errors(
                    json!({
                        "200": {
                            "description": "Server-sent events",
                            "content": {
                                "text/event-stream": {
                                    "schema": {"type": "string"},
                                    "itemSchema": schema_ref("ClusterView"),
                                },
                            },
                        },
                    }),
                    &["401"],
                ),
            },
        },
        "/": {
            "get": {
                "operationId": "webPage",
                "summary": "The web page: a chat and the cluster, live; never requires a key (the page asks for it)",
                "responses": {
                    "200": {
                        "description": "An HTML page whose scripts and style sheet are served under /ui/",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                },
            },
        },
        "/ui/{file}": {
            "get": {
                "operationId": "webAsset",
                "summary": "A file of the web page (scripts, style sheet, icon), embedded in the binary",
                "parameters": [{
                    "name": "file",
                    "in": "path",
                    "required": true,
                    "schema": {"type": "string"},
                }],
                "responses": with_errors(
                    json!({
                        "200": {
                            "description": "The file",
                            "content": {
                                "text/javascript": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                                "image/svg+xml": {"schema": {"type": "string"}},
                            },
                        },
                    }),
                    &["404"],
                ),
            },
        },
        "/v1/embeddings": {
            "post": {
                "operationId": "createEmbedding",
                "summary": "Embeddings of one text or several",
                "description": "Each input runs through the cluster's stages like a prompt (as \
                    is, without the chat template); the last stage takes the mean of its last \
                    hidden states after the final norm and L2-normalises it (llama.cpp's \
                    `--pooling mean`). Inputs run up to --max-concurrent at once, in batched \
                    steps.",
                "security": secured,
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": schema_ref("EmbeddingRequest")}},
                },
                "responses": with_errors(
                    json!({"200": ok_json("One embedding per input, in order", "EmbeddingList")}),
                    &["400", "401", "404", "413", "429", "500", "503"],
                ),
            },
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness check; never requires a key",
                "responses": {"200": ok_json("The server is up", "Health")},
            },
        },
        "/health": {
            "get": {
                "operationId": "healthAlias",
                "summary": "The same as /healthz, under the name some load balancers ask for; never requires a key",
                "responses": {"200": ok_json("The server is up", "Health")},
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Counters, gauges and histograms in Prometheus's text format",
                "description": "Requests by route and status, prompt and completion tokens, \
                    time to first token and between tokens, generations running, queued, \
                    refused and failed, and each pipeline stage's step time, throughput and \
                    requests (labelled by stage index and layer range). Requires the API key \
                    when one is configured, as /v1 does.",
                "security": secured,
                "responses": with_errors(
                    json!({
                        "200": {
                            "description": "The Prometheus text exposition format, version 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                    }),
                    &["401"],
                ),
            },
        },
        "/readyz": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: 200 once the cluster can serve the model, 503 with the reason until then; never requires a key",
                "responses": {
                    "200": ok_json("The node can serve", "Readiness"),
                    "503": ok_json("The node cannot serve yet, and why", "Readiness"),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document; never requires a key",
                "responses": {
                    "200": {
                        "description": "An OpenAPI 3.1 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                },
            },
        },
    });
    if let Value::Object(map) = &mut paths {
        map.extend(ollama_paths(&secured));
    }
    paths
}

/// Ollama's dialect (its shapes are Ollama's own, derived from `schema::ollama`; its errors
/// are `{"error": "<message>"}`), and the Responses and Anthropic dialects.
fn ollama_paths(secured: &Value) -> serde_json::Map<String, Value> {
    let error = json!({
        "description": "Ollama's error shape, with the status OpenAI's routes give the same \
            failure (400, 401, 404 unknown model, 413, 429, 500, 503)",
        "content": {"application/json": {"schema": schema_ref("OllamaError")}},
    });
    let generation = |operation: &str, summary: &str, request: &str, line: &str| {
        json!({"post": {
            "operationId": operation,
            "summary": summary,
            "security": secured,
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref(request)}}},
            "responses": {
                "200": {
                    "description": "With `stream` absent or true, NDJSON: one line per piece \
                        of the answer with `done: false`, then one with `done: true`, \
                        `done_reason` (`stop` or `length`), token counts and durations in \
                        nanoseconds; an error after the first line arrives as a line \
                        `{\"error\": ...}`. With `stream: false`, one object with the whole \
                        answer.",
                    "content": {
                        "application/x-ndjson": {"schema": schema_ref(line)},
                        "application/json": {"schema": schema_ref(line)},
                    },
                },
                "default": error,
            },
        }})
    };
    let read = |method: &str,
                operation: &str,
                summary: &str,
                request: Option<&str>,
                answer: &str| {
        let mut item = json!({
            "operationId": operation,
            "summary": summary,
            "security": secured,
            "responses": {
                "200": {"description": summary, "content": {"application/json": {"schema": schema_ref(answer)}}},
                "default": error,
            },
        });
        if let Some(request) = request {
            item["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": schema_ref(request)}},
            });
        }
        json!({method: item})
    };
    serde_json::Map::from_iter([
        (
            "/api/chat".to_owned(),
            generation(
                "ollamaChat",
                "Ollama: the assistant's next message; calls of `tools` come back in \
                 `message.tool_calls`",
                "OllamaChatRequest",
                "OllamaChatLine",
            ),
        ),
        (
            "/api/generate".to_owned(),
            generation(
                "ollamaGenerate",
                "Ollama: continue a prompt (the user's turn of the chat template, or `raw`)",
                "OllamaGenerateRequest",
                "OllamaGenerateLine",
            ),
        ),
        (
            "/api/tags".to_owned(),
            read(
                "get",
                "ollamaTags",
                "Ollama: the models served",
                None,
                "OllamaModels",
            ),
        ),
        (
            "/api/show".to_owned(),
            read(
                "post",
                "ollamaShow",
                "Ollama: one model's details",
                Some("OllamaShowRequest"),
                "OllamaShowResponse",
            ),
        ),
        (
            "/api/ps".to_owned(),
            read(
                "get",
                "ollamaPs",
                "Ollama: the models loaded",
                None,
                "OllamaModels",
            ),
        ),
        (
            "/api/version".to_owned(),
            read(
                "get",
                "ollamaVersion",
                "Ollama: this server's version",
                None,
                "OllamaVersion",
            ),
        ),
        (
            "/api/embed".to_owned(),
            read(
                "post",
                "ollamaEmbed",
                "Ollama: embeddings of `input` (a string or strings)",
                Some("OllamaEmbedRequest"),
                "OllamaEmbedResponse",
            ),
        ),
        (
            "/api/embeddings".to_owned(),
            read(
                "post",
                "ollamaEmbeddings",
                "Ollama's older form: the embedding of one `prompt`",
                Some("OllamaEmbeddingsRequest"),
                "OllamaEmbeddingsResponse",
            ),
        ),
        (
            "/v1/responses".to_owned(),
            json!({"post": {
                "operationId": "createResponse",
                "summary": "OpenAI Responses: `input` (a string or message, function_call and \
                    function_call_output items), `instructions`, function `tools`, \
                    `tool_choice`, `text.format` by constrained decoding; nothing is stored, \
                    so `previous_response_id` is refused",
                "security": secured,
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": schema_ref("ResponsesRequest")}},
                },
                "responses": with_errors(
                    json!({"200": {
                        "description": "The response; with `stream`, its typed events, each \
                            event's name its data's `type`",
                        "content": {
                            "application/json": {"schema": schema_ref("ResponseObject")},
                            "text/event-stream": {"schema": schema_ref("ResponseEvent")},
                        },
                    }}),
                    &["400", "401", "404", "413", "429", "500", "503"],
                ),
            }}),
        ),
        (
            "/v1/messages".to_owned(),
            json!({"post": {
                "operationId": "anthropicMessages",
                "summary": "Anthropic: the assistant's next message (text, tool_use and \
                    tool_result blocks, tools, stop sequences); the key may come in `x-api-key`",
                "security": secured,
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {"schema": schema_ref("AnthropicRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "The message; with `stream`, Anthropic's named events, \
                            each event's name its data's `type`",
                        "content": {
                            "application/json": {"schema": schema_ref("AnthropicMessage")},
                            "text/event-stream": {"schema": schema_ref("AnthropicEvent")},
                        },
                    },
                    "default": {
                        "description": "Anthropic's error shape, with the status OpenAI's \
                            routes give the same failure",
                        "content": {"application/json": {"schema": schema_ref("AnthropicError")}},
                    },
                },
            }}),
        ),
    ])
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn ok_json(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema_ref(schema)}},
    })
}

fn with_errors(mut responses: Value, statuses: &[&str]) -> Value {
    if let Value::Object(map) = &mut responses {
        for status in statuses {
            map.insert(
                (*status).to_owned(),
                json!({"$ref": format!("#/components/responses/{status}")}),
            );
        }
    }
    responses
}

fn generation_responses(whole: &str, chunk: &str) -> Value {
    with_errors(
        json!({
            "200": {
                "description": "The completion as one JSON object, or with `stream: true` a \
                    server-sent event stream: one `data:` line per chunk, then `data: [DONE]`. \
                    An error after the first chunk arrives as a `data:` line holding the error \
                    envelope, and the stream ends without `[DONE]`.",
                "content": {
                    "application/json": {"schema": schema_ref(whole)},
                    "text/event-stream": {
                        "schema": {"type": "string"},
                        "itemSchema": schema_ref(chunk),
                    },
                },
            },
        }),
        &["400", "401", "404", "413", "429", "500", "503"],
    )
}

fn error_responses() -> Value {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": schema_ref("ErrorResponse")}},
        })
    };
    json!({
        "400": error("Malformed or unsupported request; `param` names the field at fault"),
        "401": error("Missing or wrong API key (code `invalid_api_key`)"),
        "404": error("Unknown model (code `model_not_found`, the message lists the available ones) or route"),
        "413": error("Request body over the server's limit"),
        "429": error("Generation queue full or engine busy; retry after the `Retry-After` seconds"),
        "500": error("Internal error; details are in the node's log"),
        "503": error("The cluster cannot serve the model now, for example for lack of memory"),
    })
}

fn schemas() -> Value {
    let mut schemas = serde_json::Map::new();
    // Every route's bodies, derived from the types the handlers read and write.
    match crate::schema::components() {
        Ok(derived) => schemas.extend(derived),
        // Tests catch this (a written shape naming a field that is gone); a server still
        // describes its paths.
        Err(e) => tracing::error!("the OpenAPI document lacks the bodies' schemas: {e}"),
    }
    Value::Object(schemas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::PATHS;

    #[test]
    fn document_lists_exactly_the_routed_paths_and_methods() {
        let document = openapi();
        let Some(paths) = document["paths"].as_object() else {
            unreachable!("paths is built as an object")
        };
        let mut documented: Vec<(String, Vec<String>)> = paths
            .iter()
            .map(|(path, item)| {
                let methods = item
                    .as_object()
                    .map_or_else(Vec::new, |ops| ops.keys().cloned().collect());
                (path.clone(), methods)
            })
            .collect();
        let mut routed: Vec<(String, Vec<String>)> = PATHS
            .iter()
            .map(|(path, methods)| {
                (
                    (*path).to_owned(),
                    methods.iter().map(|m| (*m).to_owned()).collect(),
                )
            })
            .collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_schema_reference_resolves() {
        let document = openapi();
        let text = document.to_string();
        for reference in text.split("\"$ref\":\"").skip(1) {
            let target = reference.split('"').next().unwrap_or_default();
            let pointer = target.trim_start_matches('#');
            assert!(
                document.pointer(pointer).is_some(),
                "dangling reference {target}"
            );
        }
    }
}
