//! A scripted engine that records what the API asked of it: the API's tests run against it
//! instead of a model.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exo_api::{
    ClusterView, Engine, FinishReason, Finished, Generation, GenerationError, GenerationEvent,
    GenerationRequest, LinkView, Logprob, ModelCard, NodeState, NodeView, PlanView, Readiness,
    StageView, TokenText, ToolSyntax,
};
use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc, watch};

/// How long a test waits for something that should happen promptly before failing.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// What the fake does for each generation.
#[derive(Clone, Debug)]
pub struct Script {
    pub pieces: Vec<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Refuse to start with this error.
    pub start_error: Option<GenerationError>,
    /// Send this error instead of the piece at this index.
    pub error_at: Option<(usize, GenerationError)>,
    /// After sending this many pieces, wait until the API drops the receiver.
    pub hang_after: Option<usize>,
    /// Pause before each piece.
    pub delay: Duration,
    /// How long the work goes on after the fake noticed its client left (a stage finishing
    /// its step), before it lets go of the sender.
    pub stop_delay: Duration,
}

/// What the fake observed, shared with the test.
#[derive(Debug, Default)]
pub struct Probe {
    pub requests: Mutex<Vec<GenerationRequest>>,
    pub started: AtomicUsize,
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub finished: AtomicBool,
    changed: Notify,
}

impl Probe {
    /// Waits until `condition` holds, failing the test if it does not within [`PROMPTLY`].
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&Probe) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if condition(self) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(PROMPTLY, wait).await.is_err() {
            panic!("timed out waiting for {what}: {self:?}");
        }
    }

    pub fn requests(&self) -> Vec<GenerationRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn touch(&self) {
        self.changed.notify_waiters();
    }
}

/// An engine that plays a [`Script`] for every generation and records what it was asked in
/// its [`Probe`].
#[derive(Debug)]
pub struct FakeEngine {
    /// The models it claims to serve.
    pub models: Vec<ModelCard>,
    /// What every generation does.
    pub script: Script,
    /// What it observed.
    pub probe: Arc<Probe>,
    /// What `readiness` answers.
    pub readiness: Readiness,
    /// What `cluster` answers; a test changes it with `send_replace` to play a cluster that
    /// changes.
    pub cluster: watch::Sender<ClusterView>,
    /// Whether `cluster_events` offers the changes of `cluster` (otherwise it offers none,
    /// like an engine that keeps no live view).
    pub live: bool,
}

/// A model card for `id` with an 8192-token context.
pub fn card(id: &str) -> ModelCard {
    ModelCard {
        id: id.to_owned(),
        created: 1_700_000_000,
        owned_by: "exo".to_owned(),
        context_length: 8192,
        tool_syntax: None,
    }
}

impl Default for FakeEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeEngine {
    /// Serves `llama-3.2-1b` and `meta-llama/Llama-3.2-1B`, answering "Hello, world!" in
    /// three pieces.
    pub fn new() -> Self {
        Self {
            models: vec![card("llama-3.2-1b"), card("meta-llama/Llama-3.2-1B")],
            script: Script {
                pieces: vec!["Hello".into(), ", wor".into(), "ld!".into()],
                finish_reason: FinishReason::Stop,
                prompt_tokens: 7,
                start_error: None,
                error_at: None,
                hang_after: None,
                delay: Duration::ZERO,
                stop_delay: Duration::ZERO,
            },
            probe: Arc::default(),
            readiness: Readiness::Ready,
            cluster: watch::Sender::new(sample_cluster()),
            live: false,
        }
    }

    /// Offers the changes of [`FakeEngine::cluster`] to `GET /v1/cluster/events`.
    pub fn live(mut self) -> Self {
        self.live = true;
        self
    }

    /// Answers `GET /readyz` as not ready, for `reason`.
    pub fn not_ready(mut self, reason: &str) -> Self {
        self.readiness = Readiness::NotReady(reason.to_owned());
        self
    }

    pub fn pieces(mut self, pieces: &[&str]) -> Self {
        self.script.pieces = pieces.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    pub fn finish_reason(mut self, reason: FinishReason) -> Self {
        self.script.finish_reason = reason;
        self
    }

    pub fn start_error(mut self, error: GenerationError) -> Self {
        self.script.start_error = Some(error);
        self
    }

    pub fn error_at(mut self, index: usize, error: GenerationError) -> Self {
        self.script.error_at = Some((index, error));
        self
    }

    pub fn hang_after(mut self, pieces: usize) -> Self {
        self.script.hang_after = Some(pieces);
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.script.delay = delay;
        self
    }

    pub fn stop_delay(mut self, delay: Duration) -> Self {
        self.script.stop_delay = delay;
        self
    }

    /// Says every model's chat template writes tool calls in `syntax`.
    pub fn tool_syntax(mut self, syntax: ToolSyntax) -> Self {
        for card in &mut self.models {
            card.tool_syntax = Some(syntax);
        }
        self
    }

    pub fn no_models(mut self) -> Self {
        self.models.clear();
        self
    }

    pub fn build(self) -> Arc<Self> {
        Arc::new(self)
    }
}

/// A one-node cluster view.
pub fn sample_cluster() -> ClusterView {
    ClusterView {
        nodes: vec![NodeView {
            id: "12D3KooWA".into(),
            name: "desktop".into(),
            role: "worker".into(),
            address: Some("192.0.2.1:52416".into()),
            memory_bytes: 64 << 30,
            offered_memory_bytes: 48 << 30,
            flops: 2.0e13,
            models: vec!["llama-3.2-1b".into()],
            is_self: true,
            state: NodeState::Ready,
            os: "Debian GNU/Linux 12".into(),
            device: "AMD Ryzen 9 7950X".into(),
            cores: 32,
            backend: "flex".into(),
            used_memory_bytes: Some(3 << 30),
            weight_bytes: Some(2 << 30),
            ..NodeView::default()
        }],
        links: vec![LinkView {
            from: "12D3KooWA".into(),
            to: "12D3KooWB".into(),
            latency_ms: Some(0.8),
            bandwidth_bytes_per_s: None,
        }],
        plan: Some(PlanView {
            epoch: "7".into(),
            model: "llama-3.2-1b".into(),
            stages: vec![StageView {
                node: "12D3KooWA".into(),
                layers_start: 0,
                layers_end: 16,
                embeds: true,
                has_head: true,
                step_ms: Some(21.5),
                tokens_per_s: Some(46.5),
                requests: Some(0),
                sent_bytes: Some(4096),
                ..StageView::default()
            }],
            predicted_decode_tokens_per_s: Some(42.0),
            predicted_time_to_first_token_ms: None,
            explanation: vec!["one node holds every layer".into()],
        }),
        status: "ready".into(),
        ready: true,
        problems: Vec::new(),
    }
}

impl Engine for FakeEngine {
    fn models(&self) -> Vec<ModelCard> {
        self.models.clone()
    }

    fn cluster(&self) -> BoxFuture<'_, ClusterView> {
        Box::pin(async { self.cluster.borrow().clone() })
    }

    fn cluster_events(&self) -> Option<watch::Receiver<ClusterView>> {
        self.live.then(|| self.cluster.subscribe())
    }

    fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GenerationError>> {
        Box::pin(async move {
            self.probe.requests.lock().unwrap().push(request.clone());
            self.probe.touch();
            if let Some(error) = &self.script.start_error {
                return Err(error.clone());
            }
            if !self.models.iter().any(|card| card.id == request.model) {
                return Err(GenerationError::UnknownModel {
                    model: request.model,
                    available: self.models.iter().map(|card| card.id.clone()).collect(),
                });
            }
            let (tx, rx) = mpsc::channel(1);
            let script = self.script.clone();
            let logprobs = request.logprobs;
            let embedding = request.embed.then(|| fake_embedding(&request.prompt));
            let prompt_logprobs = request.prompt_logprobs;
            let probe = Arc::clone(&self.probe);
            probe.started.fetch_add(1, Ordering::SeqCst);
            let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
            probe.peak.fetch_max(now, Ordering::SeqCst);
            probe.touch();
            tokio::spawn(async move {
                let cancelled = !match embedding {
                    Some(values) => embed(&script, values, &tx).await,
                    None => {
                        let scored = match prompt_logprobs {
                            Some(n) => tx
                                .send(Ok(GenerationEvent::PromptLogprobs(fake_prompt_logprobs(n))))
                                .await
                                .is_ok(),
                            None => true,
                        };
                        scored && run(&script, logprobs, &tx).await
                    }
                };
                if cancelled {
                    probe.cancelled.fetch_add(1, Ordering::SeqCst);
                    probe.touch();
                    tokio::time::sleep(script.stop_delay).await;
                } else {
                    probe.finished.store(true, Ordering::SeqCst);
                }
                probe.running.fetch_sub(1, Ordering::SeqCst);
                probe.touch();
            });
            Ok(rx)
        })
    }
}

/// The fake's embedding of a prompt of `L` bytes: `(L, 1)`, normalised (so that tests can
/// tell inputs and their order apart).
pub fn fake_embedding(prompt: &exo_api::Prompt) -> Vec<f32> {
    let bytes = match prompt {
        exo_api::Prompt::Text(t) | exo_api::Prompt::Raw(t) => t.len(),
        exo_api::Prompt::Tokens(ids) => ids.len(),
        exo_api::Prompt::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
    } as f32;
    let norm = (bytes * bytes + 1.0).sqrt();
    vec![bytes / norm, 1.0 / norm]
}

/// The fake's prompt log-probabilities: the prompt is the tokens `P` and `rompt` (-0.25), with
/// `n` alternatives `alt0`, `alt1`... at -1, -2...
pub fn fake_prompt_logprobs(n: u32) -> exo_api::PromptLogprobs {
    let text = |token: &str, logprob: f32| TokenText {
        bytes: token.as_bytes().to_vec(),
        token: token.to_owned(),
        logprob,
    };
    exo_api::PromptLogprobs {
        first: text("P", 0.0),
        rest: vec![Logprob {
            chosen: text("rompt", -0.25),
            top: (0..n)
                .map(|i| text(&format!("alt{i}"), -1.0 - i as f32))
                .collect(),
        }],
    }
}

/// Answers an embedding request: the script's error at 0 if it has one, else the embedding
/// and a final event with no tokens. Returns false when the receiver was dropped.
async fn embed(
    script: &Script,
    values: Vec<f32>,
    tx: &mpsc::Sender<Result<GenerationEvent, GenerationError>>,
) -> bool {
    if let Some((0, error)) = &script.error_at {
        return tx.send(Err(error.clone())).await.is_ok();
    }
    if tx
        .send(Ok(GenerationEvent::Embedding(values)))
        .await
        .is_err()
    {
        return false;
    }
    let finished = Finished {
        reason: FinishReason::Stop,
        prompt_tokens: script.prompt_tokens as u32,
        token_ids: Vec::new(),
        time_to_first_token_s: 0.0,
        decode_s: 0.0,
    };
    tx.send(Ok(GenerationEvent::Finished(finished)))
        .await
        .is_ok()
}

/// Plays the script; returns false when it noticed the receiver was dropped. With `logprobs`
/// asked, each piece is one token whose log-probability is -0.5, after `n` alternatives
/// `alt0`, `alt1`... at -1, -2...
async fn run(
    script: &Script,
    logprobs: Option<u32>,
    tx: &mpsc::Sender<Result<GenerationEvent, GenerationError>>,
) -> bool {
    for (index, piece) in script.pieces.iter().enumerate() {
        if script.hang_after == Some(index) {
            tx.closed().await;
            return false;
        }
        if !script.delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(script.delay) => {}
                () = tx.closed() => return false,
            }
        }
        if let Some((at, error)) = &script.error_at
            && *at == index
        {
            return tx.send(Err(error.clone())).await.is_ok();
        }
        if let Some(n) = logprobs {
            let text = |token: String, logprob: f32| TokenText {
                bytes: token.clone().into_bytes(),
                token,
                logprob,
            };
            let entry = Logprob {
                chosen: text(piece.clone(), -0.5),
                top: (0..n)
                    .map(|i| text(format!("alt{i}"), -1.0 - i as f32))
                    .collect(),
            };
            if tx.send(Ok(GenerationEvent::Logprob(entry))).await.is_err() {
                return false;
            }
        }
        if tx
            .send(Ok(GenerationEvent::Text(piece.clone())))
            .await
            .is_err()
        {
            return false;
        }
    }
    if script.hang_after == Some(script.pieces.len()) {
        tx.closed().await;
        return false;
    }
    let finished = Finished {
        reason: script.finish_reason,
        prompt_tokens: script.prompt_tokens as u32,
        token_ids: (0..script.pieces.len() as u32).collect(),
        time_to_first_token_s: 0.0,
        decode_s: 0.0,
    };
    tx.send(Ok(GenerationEvent::Finished(finished)))
        .await
        .is_ok()
}
