//! The origin: the node a request comes in at. It admits the request (model, sampling, one
//! templating and tokenization, one context rule), routes it to the current plan, and runs it
//! as a state machine ([`request`]) that sends its steps into the ring and turns the tokens
//! the last stage delivers into text.

pub(crate) mod request;
pub(crate) mod route;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use exo_core::{Epoch, GenerationError, GenerationRequest, NodeId, Prompt, RequestId, ToolSpec};
use exo_model::{ChatTemplate, Tokenizer};
use tokio::sync::{mpsc, watch};

use crate::grammar::ModelGrammars;
use crate::inbox::Inboxes;
use crate::origin::request::{Journal, RequestTask, ResumePolicy};
use crate::origin::route::{Route, RouteDeps};
use crate::plan::{ActivePlan, PlanState};
use crate::stage::Stages;
use crate::stage::link::LinkSettings;
use crate::tasks::Tasks;

/// What the origin needs to know of the model.
#[derive(Debug)]
pub(crate) struct OriginModel {
    /// The model's name (file or folder name).
    pub(crate) name: String,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) eos: Vec<u32>,
    /// The model's grammars, to refuse a constraint they cannot compile.
    pub(crate) grammars: Arc<ModelGrammars>,
    /// Each token's bytes, for log-probabilities; read from the tokenizer on first use.
    pub(crate) token_bytes: std::sync::OnceLock<Vec<Vec<u8>>>,
    /// Positions a request may use in all (prompt plus generated): the model's context, or
    /// less, what the plan reserves keys and values for (`--plan-context`).
    pub(crate) context: usize,
    /// The most bytes of text one token stands for, so that a prompt far too long is refused
    /// before it is templated or tokenized.
    pub(crate) longest_token_bytes: usize,
    /// Tokens generated when a request does not say (`None`: as many as fit).
    pub(crate) default_max_tokens: Option<usize>,
    /// Largest prompt chunk sent in one frame.
    pub(crate) prefill_chunk: usize,
}

/// The model id clients use: the file name without `.gguf`.
pub(crate) fn model_id(name: &str) -> String {
    name.strip_suffix(".gguf").unwrap_or(name).to_owned()
}

impl OriginModel {
    /// A token as text for log-probabilities: its bytes (a control token's name), and
    /// the text they make, lossy where a character is cut.
    pub(crate) fn token_text(&self, token: u32, logprob: f32) -> exo_core::TokenText {
        let table = self
            .token_bytes
            .get_or_init(|| self.tokenizer.token_bytes().unwrap_or_default());
        let mut bytes = table.get(token as usize).cloned().unwrap_or_default();
        if bytes.first() == Some(&0xFF) {
            bytes.remove(0);
        }
        exo_core::TokenText {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    }

    /// Whether `name` names this model (with or without `.gguf`).
    pub(crate) fn matches(&self, name: &str) -> bool {
        model_id(name) == model_id(&self.name)
    }

    /// Token ids of a prompt: chat messages through the chat template (special tokens only
    /// where the template writes them), or text as is (special tokens written in it parsed
    /// only when the caller asked for that).
    fn prompt_ids(&self, prompt: &Prompt, tools: &[ToolSpec]) -> Result<Vec<u32>, GenerationError> {
        let tokenizing = |e: exo_model::Error| format!("tokenizing the prompt: {e}");
        let (ids, param) = match prompt {
            Prompt::Text(t) => (self.tokenizer.encode_plain(t).map_err(tokenizing), "prompt"),
            Prompt::Raw(t) => (self.tokenizer.encode(t).map_err(tokenizing), "prompt"),
            Prompt::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size();
                let outside = ids.iter().find(|&&id| id as usize >= vocab);
                let ids = match outside {
                    Some(id) => Err(format!(
                        "token {id} is not in this model's vocabulary of {vocab} tokens"
                    )),
                    None => Ok(ids.clone()),
                };
                (ids, "prompt")
            }
            Prompt::Chat(messages) => (
                exo_model::encode_chat(&self.tokenizer, self.template.as_ref(), messages, tools)
                    .map_err(|e| format!("chat template: {e}")),
                "messages",
            ),
        };
        let ids = ids.map_err(|message| GenerationError::invalid(param, message))?;
        if ids.is_empty() {
            return Err(GenerationError::invalid(param, "the prompt is empty"));
        }
        Ok(ids)
    }

    /// Refuses, from its length in bytes alone, a prompt that cannot fit the context however
    /// it tokenizes: a prompt of megabytes is turned away before any work (templating and
    /// tokenizing it would take seconds and a lot of memory).
    fn refuse_far_too_long(&self, prompt: &Prompt) -> Result<(), GenerationError> {
        let (bytes, param) = match prompt {
            Prompt::Text(t) | Prompt::Raw(t) => (t.len(), "prompt"),
            // Counted exactly when the context rule sees them.
            Prompt::Tokens(_) => return Ok(()),
            Prompt::Chat(messages) => (
                messages.iter().map(|m| m.content.len()).sum::<usize>(),
                "messages",
            ),
        };
        let at_least = bytes / self.longest_token_bytes.max(1);
        if at_least < self.context {
            return Ok(());
        }
        Err(GenerationError::invalid(
            param,
            format!(
                "this model's maximum context length is {} tokens, but the prompt alone takes \
                 at least {at_least} tokens ({bytes} bytes of text)",
                self.context
            ),
        ))
    }

    /// The one context rule: the prompt and the tokens asked for must fit the context; a
    /// request that asks for no number gets the default, cut to what fits.
    fn max_tokens(&self, prompt: usize, asked: Option<u32>) -> Result<usize, GenerationError> {
        let exceeded = |max_tokens: usize| GenerationError::ContextExceeded {
            prompt_tokens: prompt,
            max_tokens,
            context_length: self.context,
        };
        match asked {
            _ if prompt >= self.context => Err(exceeded(asked.map_or(1, |m| m as usize))),
            Some(m) if prompt + m as usize > self.context => Err(exceeded(m as usize)),
            Some(m) => Ok(m as usize),
            None => Ok(self
                .default_max_tokens
                .unwrap_or(usize::MAX)
                .min(self.context - prompt)
                .max(1)),
        }
    }
}

/// The requests that come in at this node, and the routes they run on.
#[derive(Debug)]
pub(crate) struct Origins {
    pub(crate) node: NodeId,
    pub(crate) model: Arc<OriginModel>,
    pub(crate) stages: Arc<Stages>,
    pub(crate) inboxes: Arc<Inboxes>,
    pub(crate) links: LinkSettings,
    pub(crate) tasks: Tasks,
    pub(crate) plan: watch::Receiver<PlanState>,
    /// When requests give up on a stage and how long they wait to resume.
    pub(crate) policy: ResumePolicy,
    /// Requests moved onto another plan after a stage failed.
    pub(crate) resumed: std::sync::atomic::AtomicU64,
    /// One route per plan epoch; building one is serialised.
    routes: tokio::sync::Mutex<HashMap<Epoch, Arc<Route>>>,
    /// Prompts templated and tokenized at once: half the cores, at least one.
    tokenizing: Arc<tokio::sync::Semaphore>,
    /// The first choices of answers whose other choices start from their prompt's keys and
    /// values (`GenerationRequest::share_prefill`), by key.
    shares: std::sync::Mutex<HashMap<u64, Shared>>,
}

/// The first choice of an answer, as its other choices find it.
#[derive(Debug)]
struct Shared {
    parent: RequestId,
    prompt: Vec<u32>,
    /// `true` once the parent's prompt is computed on every stage (its first token came); the
    /// sender goes with the parent.
    ready: watch::Receiver<bool>,
}

/// A request's part in an answer of several choices that share their prompt.
#[derive(Debug)]
pub(crate) enum Share {
    /// The first: it tells the others when its prompt is computed, and leaves the registry
    /// when it ends.
    Parent {
        key: u64,
        ready: watch::Sender<bool>,
    },
    /// Another: it starts from the parent's keys and values once they are computed (or, if
    /// the parent ends first, computes its prompt itself).
    Child {
        parent: RequestId,
        ready: watch::Receiver<bool>,
    },
}

impl Origins {
    pub(crate) fn new(
        node: NodeId,
        model: Arc<OriginModel>,
        stages: Arc<Stages>,
        links: LinkSettings,
        tasks: Tasks,
        plan: watch::Receiver<PlanState>,
        policy: ResumePolicy,
    ) -> Self {
        Origins {
            node,
            model,
            stages,
            inboxes: Arc::default(),
            links,
            tasks,
            plan,
            policy,
            resumed: std::sync::atomic::AtomicU64::new(0),
            routes: tokio::sync::Mutex::new(HashMap::new()),
            tokenizing: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            )),
            shares: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The part request `id` (prompt `prompt`) takes among the choices sharing `key`: the
    /// parent if it is the first, a child if the parent's prompt is the same; `None` otherwise.
    fn share(&self, key: u64, id: RequestId, prompt: &[u32]) -> Option<Share> {
        let mut shares = self
            .shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match shares.get(&key) {
            Some(s) if s.prompt == prompt => Some(Share::Child {
                parent: s.parent,
                ready: s.ready.clone(),
            }),
            Some(_) => None,
            None => {
                let (tx, rx) = watch::channel(false);
                shares.insert(
                    key,
                    Shared {
                        parent: id,
                        prompt: prompt.to_vec(),
                        ready: rx,
                    },
                );
                Some(Share::Parent { key, ready: tx })
            }
        }
    }

    /// Request `id`, the parent of the choices sharing `key`, has ended.
    pub(crate) fn unshare(&self, key: u64, id: RequestId) {
        let mut shares = self
            .shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shares.get(&key).is_some_and(|s| s.parent == id) {
            shares.remove(&key);
        }
    }

    /// The current plan, or why there is none.
    pub(crate) fn current_plan(&self) -> Result<Arc<ActivePlan>, GenerationError> {
        match &*self.plan.borrow() {
            PlanState::Ready(plan) => Ok(Arc::clone(plan)),
            PlanState::Waiting(reason) => Err(GenerationError::Unavailable(format!(
                "the cluster cannot serve `{}` now: {reason}",
                model_id(&self.model.name)
            ))),
        }
    }

    /// The route of `plan`, built if this node has none that works. Routes of older plans
    /// are dropped once no request runs on them.
    pub(crate) async fn route(
        &self,
        plan: &Arc<ActivePlan>,
    ) -> Result<Arc<Route>, GenerationError> {
        let mut routes = self.routes.lock().await;
        routes.retain(|epoch, r| (*epoch == plan.epoch && r.broken().is_none()) || r.running() > 0);
        if let Some(route) = routes.get(&plan.epoch).filter(|r| r.broken().is_none()) {
            return Ok(Arc::clone(route));
        }
        let deps = RouteDeps {
            node: &self.node,
            stages: &self.stages,
            inboxes: &self.inboxes,
            links: &self.links,
            tasks: &self.tasks,
        };
        let route = route::build(deps, Arc::clone(plan)).await?;
        routes.insert(plan.epoch, Arc::clone(&route));
        Ok(route)
    }

    /// Admits `request` and starts it; the receiver streams its text and its end. Dropping
    /// the receiver cancels it on every stage.
    pub(crate) async fn start(
        self: &Arc<Self>,
        request: GenerationRequest,
    ) -> Result<mpsc::Receiver<Result<exo_core::GenerationEvent, GenerationError>>, GenerationError>
    {
        let started = Instant::now();
        if !request.model.is_empty() && !self.model.matches(&request.model) {
            return Err(GenerationError::UnknownModel {
                model: request.model,
                available: vec![model_id(&self.model.name)],
            });
        }
        request.sampling.validate()?;
        request.penalties.validate()?;
        if let Some(top) = [request.logprobs, request.prompt_logprobs]
            .into_iter()
            .flatten()
            .find(|&t| t > GenerationRequest::MAX_TOP_LOGPROBS)
        {
            return Err(GenerationError::invalid(
                "top_logprobs",
                format!(
                    "at most {} alternatives per token, got {top}",
                    GenerationRequest::MAX_TOP_LOGPROBS
                ),
            ));
        }
        let vocab = self.model.tokenizer.vocab_size();
        if let Some((token, _)) = request
            .penalties
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
        {
            return Err(GenerationError::invalid(
                "logit_bias",
                format!("token {token} is not in this model's vocabulary of {vocab} tokens"),
            ));
        }
        self.model.refuse_far_too_long(&request.prompt)?;
        let plan = self.current_plan()?;
        // Templating and tokenizing a long prompt takes a while: off the async workers, and a
        // bounded number at a time, so that membership and the shard service, which run on
        // those workers, always find a core (a peer that does not hear from this node for 2 s
        // declares it gone).
        let permit = Arc::clone(&self.tokenizing)
            .acquire_owned()
            .await
            .map_err(|_| GenerationError::Internal("the tokenizing pool closed".into()))?;
        let (model, prompt, tools) = (Arc::clone(&self.model), request.prompt, request.tools);
        let constraint = request.constraint.clone();
        let prompt = tokio::task::spawn_blocking(move || {
            // A grammar the last stage could not compile is refused here, before any work.
            let ids = match &constraint {
                Some(c) => model
                    .grammars
                    .guide(c)
                    .and_then(|_| model.prompt_ids(&prompt, &tools)),
                None => model.prompt_ids(&prompt, &tools),
            };
            drop(permit);
            ids
        })
        .await
        .map_err(|e| GenerationError::Internal(format!("tokenizing task: {e}")))??;
        // An embedding generates nothing: the prompt alone must fit the context.
        let asked = if request.embed {
            Some(0)
        } else {
            request.max_tokens
        };
        let max_tokens = self.model.max_tokens(prompt.len(), asked)?;
        let route = self.route(&plan).await?;
        let id = RequestId(rand::random());
        // Choices of one answer compute their prompt once. Not when every prompt row is
        // scored (each choice would need them all) or nothing is generated.
        let share = request
            .share_prefill
            .filter(|_| !request.embed && request.prompt_logprobs.is_none() && prompt.len() > 1)
            .and_then(|key| self.share(key, id, &prompt));
        let (events, rx) = mpsc::channel(64);
        let task = RequestTask {
            id,
            origin: self.node.clone(),
            origins: Arc::clone(self),
            model: Arc::clone(&self.model),
            inbox: self.inboxes.open(id, route.epoch()),
            route,
            journal: Journal {
                prompt,
                generated: Vec::new(),
            },
            sampling: request.sampling,
            constraint: request.constraint,
            penalties: request.penalties,
            logprobs: request.logprobs,
            embed: request.embed,
            prompt_logprobs: request.prompt_logprobs,
            prompt_scores: Vec::new(),
            prompt_scores_sent: false,
            max_tokens,
            stop: request.stop,
            ignore_eos: request.ignore_eos,
            events,
            started,
            policy: self.policy,
            gap_s: None,
            replay_in_place: false,
            share,
        };
        // What the request logs carries the caller's span (the API's request id).
        self.tasks
            .spawn(tracing::Instrument::in_current_span(task.run()));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn model(context: usize) -> OriginModel {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        exo_model::testing::write_gguf(&path, &exo_model::testing::tiny_config(1), 1).unwrap();
        let checkpoint = exo_model::Checkpoint::open(&path).unwrap();
        OriginModel {
            name: "m.gguf".into(),
            tokenizer: checkpoint.tokenizer().unwrap(),
            template: None,
            longest_token_bytes: 8,
            eos: vec![2],
            grammars: Arc::new(ModelGrammars::new(checkpoint.tokenizer().unwrap(), vec![2])),
            token_bytes: std::sync::OnceLock::new(),
            context,
            default_max_tokens: Some(256),
            prefill_chunk: 512,
        }
    }

    #[test]
    fn one_context_rule_for_every_request() {
        let m = model(100);
        assert_eq!(m.max_tokens(10, Some(90)).unwrap(), 90);
        assert!(matches!(
            m.max_tokens(10, Some(91)),
            Err(GenerationError::ContextExceeded {
                prompt_tokens: 10,
                max_tokens: 91,
                context_length: 100
            })
        ));
        // Without a number: the default, cut to what fits.
        assert_eq!(m.max_tokens(10, None).unwrap(), 90);
        assert_eq!(model(1000).max_tokens(10, None).unwrap(), 256);
        assert!(m.max_tokens(100, None).is_err());
        // Without a default either: what fits.
        let open = OriginModel {
            default_max_tokens: None,
            ..model(1000)
        };
        assert_eq!(open.max_tokens(10, None).unwrap(), 990);
    }

    #[test]
    fn a_prompt_far_too_long_is_refused_from_its_bytes_alone() {
        let m = model(100);
        // 8 bytes a token at most: 800 bytes cannot fit 100 positions, 792 might.
        let refused = m
            .refuse_far_too_long(&Prompt::Text("a".repeat(800)))
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("at least 100 tokens (800 bytes"),
            "{refused}"
        );
        assert!(
            m.refuse_far_too_long(&Prompt::Text("a".repeat(792)))
                .is_ok()
        );
        let chat = |n| Prompt::Chat(vec![exo_core::ChatMessage::new("user", "b".repeat(n))]);
        assert!(matches!(
            m.refuse_far_too_long(&chat(100_000)),
            Err(GenerationError::Invalid { param: Some(p), .. }) if p == "messages"
        ));
        // The real tokenizer's longest entry bounds what one token covers.
        assert!(m.tokenizer.longest_token_bytes() >= 1);
    }

    #[test]
    fn prompts_are_tokenized_once_and_empty_ones_refused() {
        let m = model(100);
        assert!(
            !m.prompt_ids(&Prompt::Text("abc".into()), &[])
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            m.prompt_ids(&Prompt::Text(String::new()), &[]),
            Err(GenerationError::Invalid { param: Some(p), .. }) if p == "prompt"
        ));
        assert!(m.matches("m") && m.matches("m.gguf") && !m.matches("n"));
    }
}
