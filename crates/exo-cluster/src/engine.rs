//! The API crate's engine trait, implemented over a node's runtime and over a gateway's view
//! of the cluster.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use exo_api::{
    Chunk, ClusterView, EngineError, GenerationRequest, LinkView, ModelCard, NodeView, PlanView,
    StageView,
};
use exo_topology::{NodeRole, TopologySnapshot};
use exo_transport::{
    Code, FinishReason, GenerateCall, GenerateEvent, Prompt, PromptMessage, SamplingSpec,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::node::{Node, PlanState};
use crate::runtime::model_id;

pub(crate) type Events = mpsc::Receiver<Result<Chunk, EngineError>>;

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn to_call(request: &GenerationRequest) -> GenerateCall {
    GenerateCall {
        model: request.model.clone(),
        prompt: match &request.prompt {
            exo_api::Prompt::Text(t) => Prompt::Text(t.clone()),
            exo_api::Prompt::Chat(messages) => Prompt::Chat(
                messages
                    .iter()
                    .map(|m| PromptMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ),
        },
        max_tokens: request
            .max_tokens
            .map(|m| u32::try_from(m).unwrap_or(u32::MAX)),
        sampling: SamplingSpec {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: 0,
            // Without a seed every request samples differently, as OpenAI's API does.
            seed: request.seed.unwrap_or_else(rand::random),
        },
        stop: request.stop.clone(),
        ignore_eos: false,
    }
}

/// What the API is told about a failure of the cluster.
pub(crate) fn engine_error(e: &exo_transport::Error, available: &[String]) -> EngineError {
    let message = e.to_string();
    match e.code() {
        Code::NotFound => EngineError::UnknownModel {
            model: String::new(),
            available: available.to_vec(),
        },
        Code::InvalidArgument => EngineError::Invalid {
            param: None,
            message,
        },
        Code::Unavailable | Code::FailedPrecondition | Code::DeadlineExceeded => {
            EngineError::Unavailable(message)
        }
        Code::ResourceExhausted => EngineError::Busy,
        _ => EngineError::Internal(message),
    }
}

/// Where a generation's events come from.
pub(crate) enum Source {
    /// This node's own runtime.
    Local(mpsc::Receiver<exo_transport::Result<GenerateEvent>>),
    /// A node's shard service (the gateway).
    Remote(Box<exo_transport::GenerateStream>),
}

impl Source {
    async fn next(&mut self) -> Option<exo_transport::Result<GenerateEvent>> {
        match self {
            Source::Local(rx) => rx.recv().await,
            Source::Remote(stream) => stream.next().await.transpose(),
        }
    }
}

/// Turns the cluster's events into the API's chunks, until the API drops its receiver.
pub(crate) fn relay(mut source: Source, available: Vec<String>) -> Events {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                event = source.next() => event,
                // The client went away: dropping the source cancels the request everywhere.
                () = tx.closed() => return,
            };
            let item = match event {
                None => Err(EngineError::Internal(
                    "the generation ended without a final event".to_owned(),
                )),
                Some(Ok(GenerateEvent::Text(t))) => Ok(Chunk::Text(t)),
                Some(Ok(GenerateEvent::Finished(f))) => Ok(Chunk::Finished {
                    finish_reason: match f.reason {
                        FinishReason::Stop => exo_api::FinishReason::Stop,
                        FinishReason::Length => exo_api::FinishReason::Length,
                    },
                    prompt_tokens: f.prompt_tokens as usize,
                    completion_tokens: f.token_ids.len(),
                }),
                Some(Err(e)) => Err(engine_error(&e, &available)),
            };
            let last = !matches!(item, Ok(Chunk::Text(_)));
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// Serves the API from a node's own runtime: the node is the origin of every request.
#[derive(Debug)]
pub struct NodeEngine {
    node: Arc<Node>,
    created: u64,
}

impl NodeEngine {
    /// An engine over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        NodeEngine {
            node,
            created: now_s(),
        }
    }
}

impl exo_api::Engine for NodeEngine {
    fn models(&self) -> Vec<ModelCard> {
        vec![ModelCard {
            id: model_id(self.node.model_name()),
            created: self.created,
            owned_by: "exo-rs".to_owned(),
            context_length: self.node.context_length(),
        }]
    }

    fn cluster(&self) -> BoxFuture<'_, ClusterView> {
        Box::pin(async move {
            let snapshot = self.node.topology().snapshot().await.ok();
            let (plan, status) = match self.node.plan_state() {
                PlanState::Ready(plan) => {
                    let stages = plan
                        .stages
                        .iter()
                        .enumerate()
                        .map(|(i, s)| StageView {
                            node: s.node_id.clone(),
                            layers_start: s.layers.start,
                            layers_end: s.layers.end,
                            embeds: i == 0,
                            has_head: i + 1 == plan.stages.len(),
                        })
                        .collect();
                    (
                        Some(PlanView {
                            epoch: format!("{:016x}", plan.epoch),
                            model: model_id(&plan.model),
                            stages,
                            predicted_decode_tokens_per_s: Some(
                                plan.plan.predicted.decode_tokens_per_s,
                            ),
                            predicted_time_to_first_token_ms: Some(
                                plan.plan.predicted.ttft_s * 1e3,
                            ),
                            explanation: plan.plan.explanation.clone(),
                        }),
                        "ready".to_owned(),
                    )
                }
                PlanState::Waiting(reason) => (None, format!("waiting: {reason}")),
            };
            let (nodes, links) = snapshot.as_ref().map(view_of).unwrap_or_default();
            ClusterView {
                nodes,
                links,
                plan,
                status,
            }
        })
    }

    fn generate(&self, request: GenerationRequest) -> BoxFuture<'_, Result<Events, EngineError>> {
        Box::pin(async move {
            let available = vec![model_id(self.node.model_name())];
            if !self.node.serves_model(&request.model) {
                return Err(EngineError::UnknownModel {
                    model: request.model.clone(),
                    available,
                });
            }
            let call = to_call(&request);
            let prompt_tokens = self
                .node
                .count_prompt_tokens(&call.prompt)
                .map_err(|e| engine_error(&e, &available))?;
            let context = self.node.context_length();
            let max = request.max_tokens.unwrap_or(1);
            if prompt_tokens + max > context {
                return Err(EngineError::ContextExceeded {
                    prompt_tokens,
                    max_tokens: max,
                    context_length: context,
                });
            }
            let events = self.node.generate(call).await.map_err(|e| {
                let mut err = engine_error(&e, &available);
                if let EngineError::UnknownModel { model, .. } = &mut err {
                    model.clone_from(&request.model);
                }
                err
            })?;
            Ok(relay(Source::Local(events), available))
        })
    }
}

pub(crate) fn view_of(snapshot: &TopologySnapshot) -> (Vec<NodeView>, Vec<LinkView>) {
    let node = |p: &exo_topology::NodeProfile, is_self: bool, address: Option<String>| NodeView {
        id: p.id.as_str().to_owned(),
        name: p.name.clone(),
        role: match p.role {
            NodeRole::Worker => "worker",
            NodeRole::Observer => "observer",
        }
        .to_owned(),
        address: p.grpc_endpoint.clone().or(address),
        memory_bytes: p.memory.total_bytes.unwrap_or(0),
        offered_memory_bytes: p
            .memory
            .available_bytes
            .or(p.memory.total_bytes)
            .unwrap_or(0),
        flops: p.flops_per_s,
        models: p.models.iter().map(|m| model_id(&m.name)).collect(),
        is_self,
    };
    let mut nodes = vec![node(&snapshot.local, true, None)];
    nodes.extend(
        snapshot
            .nodes
            .iter()
            .map(|p| node(&p.profile, false, p.addresses.first().cloned())),
    );
    let links = snapshot
        .nodes
        .iter()
        .map(|p| LinkView {
            from: snapshot.local.id.as_str().to_owned(),
            to: p.profile.id.as_str().to_owned(),
            latency_ms: p.link.latency_s().map(|s| s * 1e3),
            bandwidth_bytes_per_s: p.link.bandwidth_bytes_per_s,
        })
        .collect();
    (nodes, links)
}

pub use crate::gateway::GatewayEngine;
