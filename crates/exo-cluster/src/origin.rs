//! The origin of a request: the node that received it tokenizes the prompt, sends it through
//! the stages in order, and turns the tokens that come back into streamed text.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use exo_model::ChatMessage;
use exo_shard::StopScanner;
use exo_transport::{
    Assignment, Code, Error as TError, FinishReason, Finished, GenerateCall, GenerateEvent, Prompt,
    RequestOpen, Step, StepInput,
};
use tokio::sync::mpsc;

use crate::planning::ActivePlan;
use crate::runtime::{Runtime, model_id, stage_error};

type TResult<T> = exo_transport::Result<T>;

/// Checks `call`, then starts generating on a task; the receiver streams text and a final
/// [`Finished`]. Dropping the receiver cancels the request on every stage.
pub(crate) async fn start(
    runtime: Arc<Runtime>,
    call: GenerateCall,
) -> TResult<mpsc::Receiver<TResult<GenerateEvent>>> {
    if !call.model.is_empty() && !runtime.model_matches(&call.model) {
        return Err(TError::service(
            Code::NotFound,
            format!(
                "model `{}` is not served here; available: {}",
                call.model, runtime.model_name
            ),
        ));
    }
    let plan = runtime.active_plan()?;
    let prompt_ids = runtime.prompt_ids(&call.prompt)?;
    let context = runtime.config.max_position_embeddings;
    if prompt_ids.len() >= context {
        return Err(TError::invalid(format!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt_ids.len()
        )));
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let outcome = drive(&runtime, &plan, &call, prompt_ids, &tx).await;
        match outcome {
            Ok(finished) => {
                let _ = tx.send(Ok(GenerateEvent::Finished(finished))).await;
            }
            Err(e) if tx.is_closed() => {
                tracing::debug!(error = %e, "request cancelled by its caller");
            }
            Err(e) => {
                tracing::warn!(error = %e, "request failed");
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    Ok(rx)
}

impl Runtime {
    pub(crate) fn model_matches(&self, name: &str) -> bool {
        model_id(name) == model_id(&self.model_name)
    }

    /// Token ids of a prompt: chat messages through the chat template, or text as is.
    pub(crate) fn prompt_ids(&self, prompt: &Prompt) -> TResult<Vec<u32>> {
        let text = match prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => {
                let messages: Vec<ChatMessage> = messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect();
                exo_model::render_prompt(self.template.as_ref(), &messages)
                    .map_err(|e| TError::invalid(format!("chat template: {e}")))?
            }
        };
        let ids = self
            .tokenizer
            .encode(&text)
            .map_err(|e| TError::invalid(format!("tokenizing the prompt: {e}")))?;
        if ids.is_empty() {
            return Err(TError::invalid("the prompt is empty"));
        }
        Ok(ids)
    }

    /// Makes sure every stage of `plan` holds its shard (each node computes the same plan and
    /// loads by itself; this is the barrier that waits for them, and tells a node that has not
    /// seen the change yet).
    async fn assign_all(&self, plan: &ActivePlan) -> TResult<()> {
        let assignment = Assignment {
            model: plan.model.clone(),
            epoch: plan.epoch,
            stages: plan.stages.clone(),
        };
        let calls = plan.stages.iter().map(|stage| {
            let assignment = &assignment;
            async move {
                let result = if stage.node_id == self.node_id {
                    self.hold(assignment).await
                } else {
                    match self.client(&stage.endpoint).await {
                        Ok(c) => c.assign(assignment).await,
                        Err(e) => Err(e),
                    }
                };
                result.map_err(|e| {
                    self.forget_client(&stage.endpoint);
                    TError::service(
                        e.code(),
                        format!(
                            "node {} could not take layers {:?}: {e}",
                            stage.node_id, stage.layers
                        ),
                    )
                })
            }
        });
        futures::future::try_join_all(calls).await?;
        Ok(())
    }
}

async fn drive(
    runtime: &Runtime,
    plan: &ActivePlan,
    call: &GenerateCall,
    prompt_ids: Vec<u32>,
    tx: &mpsc::Sender<TResult<GenerateEvent>>,
) -> TResult<Finished> {
    let started = Instant::now();
    // Once per epoch: afterwards every stage holds its shard (a node that restarts plans and
    // loads by itself, and its stage waits for that load).
    if runtime.assigned_epoch.load(Ordering::Acquire) != plan.epoch {
        runtime.assign_all(plan).await?;
        runtime.assigned_epoch.store(plan.epoch, Ordering::Release);
    }
    let Some(first) = plan.stages.first() else {
        return Err(TError::service(Code::Unavailable, "the plan has no stages"));
    };
    let open = RequestOpen {
        request_id: format!("{}-{:016x}", runtime.node_id_short(), rand::random::<u64>()),
        epoch: plan.epoch,
        sampling: call.sampling,
    };
    let client = runtime.client(&first.endpoint).await.inspect_err(|_| {
        runtime.forget_client(&first.endpoint);
    })?;
    let stage_error = |e: TError| {
        runtime.forget_client(&first.endpoint);
        stage_error(first, e)
    };
    let mut session = client
        .open(open, runtime.wire, Arc::clone(&runtime.sent))
        .await
        .map_err(stage_error)?;

    let context = runtime.config.max_position_embeddings;
    let max_tokens = call
        .max_tokens
        .map_or(runtime.default_max_tokens, |m| m as usize)
        .min(context - prompt_ids.len());
    let eos = &runtime.config.eos_token_ids;
    let mut text = runtime.tokenizer.stream();
    let mut stops = StopScanner::new(&call.stop);
    let mut ids: Vec<u32> = Vec::new();
    let mut first_token_at = None;
    let mut reason = FinishReason::Length;
    let mut position = 0u32;
    // The prompt goes in chunks so that no frame outgrows the limits; the last one samples.
    let chunks: Vec<&[u32]> = prompt_ids.chunks(runtime.prefill_chunk.max(1)).collect();
    let mut input: Vec<u32> = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let step = Step {
            position,
            input: StepInput::Tokens(chunk.to_vec()),
            sample: i + 1 == chunks.len(),
        };
        session.send(&step).await.map_err(stage_error)?;
        position += chunk.len() as u32;
    }
    let mut pending: Vec<String> = Vec::new();
    while ids.len() < max_tokens {
        if !input.is_empty() {
            let step = Step {
                position,
                input: StepInput::Tokens(std::mem::take(&mut input)),
                sample: true,
            };
            session.send(&step).await.map_err(stage_error)?;
            position += 1;
        }
        let token = tokio::select! {
            reply = session.next_token() => reply.map_err(stage_error)?.token,
            () = tx.closed() => return Err(TError::service(Code::Cancelled, "the caller went away")),
        };
        first_token_at.get_or_insert_with(Instant::now);
        ids.push(token);
        if !call.ignore_eos && eos.contains(&token) {
            reason = FinishReason::Stop;
            break;
        }
        let piece = text
            .push(token)
            .map_err(|e| TError::service(Code::Internal, format!("decoding token {token}: {e}")))?;
        let stopped = stops.push(&piece, &mut |t| pending.push(t.to_owned()));
        for t in pending.drain(..) {
            if tx.send(Ok(GenerateEvent::Text(t))).await.is_err() {
                return Err(TError::service(Code::Cancelled, "the caller went away"));
            }
        }
        if stopped {
            reason = FinishReason::Stop;
            break;
        }
        input.push(token);
    }
    if reason == FinishReason::Length {
        stops.flush(&mut |t| pending.push(t.to_owned()));
        for t in pending.drain(..) {
            let _ = tx.send(Ok(GenerateEvent::Text(t))).await;
        }
    }
    // Closing the stream ends the request on every stage and frees its caches.
    drop(session);
    let first = first_token_at.unwrap_or_else(Instant::now);
    Ok(Finished {
        reason,
        prompt_tokens: prompt_ids.len() as u32,
        token_ids: ids,
        time_to_first_token_s: first.duration_since(started).as_secs_f64(),
        decode_s: first.elapsed().as_secs_f64(),
    })
}

impl Runtime {
    fn node_id_short(&self) -> &str {
        let id = self.node_id.as_str();
        id.get(id.len().saturating_sub(8)..).unwrap_or(id)
    }
}
