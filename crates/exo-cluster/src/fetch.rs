//! Models over the LAN: this node's model in the store (`exo-store`), the chunks it sends to
//! peers that lack them, and the fetch of the chunks its own shard needs from the peers that
//! hold them, several at once, every chunk checked against the manifest.
//!
//! A node announces the model's manifest hash and the chunks it holds in its membership profile
//! (`ModelFile::manifest`, `ModelFile::chunks`). A node assigned layers whose chunks it lacks
//! fetches them before loading: the missing chunks form one queue, and one task per peer that
//! holds some of them takes batches from it, so a faster link takes more. A chunk whose bytes do
//! not hash to the manifest's value drops that peer for the rest of the fetch and goes back to
//! the queue for another; a peer whose stream fails is tried again in the next round. Verified
//! chunks are made durable every two seconds (the store's held record), so a node killed
//! mid-fetch fetches only the rest when it starts again.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exo_core::NodeId;
use exo_store::{ChunkSet, Entry, ShardParts, Store};
use exo_topology::Topology;
use exo_transport::{ChunkItems, FetchStatus};
use tokio::sync::mpsc;

use crate::clients::ClientPool;
use crate::plan::{held_by, reachable};

/// Chunks asked of one peer in one call: enough to keep a link busy, few enough that a slow
/// peer does not hold back much of the queue.
const BATCH_CHUNKS: usize = 8;

/// How long a fetch waits for a peer holding the chunks it still needs before it gives up.
const NO_SOURCE_WAIT: Duration = Duration::from_secs(60);

/// How often progress is logged and verified chunks are made durable.
const TICK: Duration = Duration::from_secs(2);

/// This node's model in the store, what it sends to peers, and how it fetches its shard.
#[derive(Debug)]
pub(crate) struct ModelStore {
    pub(crate) entry: Arc<Entry>,
    pub(crate) store: Store,
    node: NodeId,
    topology: Topology,
    clients: Arc<ClientPool>,
    upload: Upload,
    progress: Arc<Mutex<Option<Progress>>>,
    /// Test hook: flip a byte of every chunk sent (a peer that corrupts data).
    corrupt: bool,
    /// Chunk bytes sent to peers and received (verified) from them since the node started.
    pub(crate) traffic: Traffic,
}

/// Chunk bytes a node sent and received.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

/// A fetch under way, for status and logs.
#[derive(Debug)]
struct Progress {
    total: u64,
    done: Arc<AtomicU64>,
    /// (when, bytes done) a few seconds back, for the rate.
    mark: (Instant, u64),
    rate: f64,
}

impl Progress {
    fn status(&self) -> FetchStatus {
        FetchStatus {
            done_bytes: self.done.load(Ordering::Relaxed),
            total_bytes: self.total,
            bytes_per_s: self.rate,
        }
    }
}

/// A fetch running: on drop (its end, or the fetch dropped) the progress is cleared and the
/// ticker stopped.
struct Running {
    progress: Arc<Mutex<Option<Progress>>>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ticker.abort();
        if let Ok(mut slot) = self.progress.lock() {
            *slot = None;
        }
    }
}

/// A cap on the bytes per second this node sends to peers (`--upload-limit`): each chunk
/// reserves its share of time, so concurrent calls share the cap.
#[derive(Debug)]
struct Upload {
    bytes_per_s: Option<u64>,
    next: Mutex<Instant>,
}

impl Upload {
    /// How long to wait before sending `bytes`.
    fn reserve(&self, bytes: u64) -> Duration {
        let Some(rate) = self.bytes_per_s.filter(|&r| r > 0) else {
            return Duration::ZERO;
        };
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let Ok(mut next) = self.next.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let start = (*next).max(now);
        *next = start + cost;
        start + cost - now
    }
}

/// A peer that holds chunks of the model.
#[derive(Debug, Clone)]
struct Source {
    node: String,
    endpoint: String,
    chunks: ChunkSet,
}

/// How one peer's part of a round ended.
enum SourceEnd {
    /// Nothing left in the queue that it holds.
    Done,
    /// It sent a chunk that does not match the manifest.
    Corrupt(String),
    /// Its stream or connection failed.
    Failed(String),
    /// Writing to this node's store failed (a full disk): the fetch cannot go on.
    Local(String),
}

impl ModelStore {
    pub(crate) fn new(
        entry: Arc<Entry>,
        store: Store,
        node: NodeId,
        topology: Topology,
        clients: Arc<ClientPool>,
        upload_limit: Option<u64>,
        corrupt: bool,
    ) -> Self {
        ModelStore {
            entry,
            store,
            node,
            topology,
            clients,
            upload: Upload {
                bytes_per_s: upload_limit,
                next: Mutex::new(Instant::now()),
            },
            progress: Arc::default(),
            corrupt,
            traffic: Traffic::default(),
        }
    }

    /// The fetch under way, if any.
    pub(crate) fn status(&self) -> Option<FetchStatus> {
        self.progress
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(Progress::status))
    }

    /// The manifest, when `hash` (or, when empty, `model`) names this node's model.
    pub(crate) fn manifest(&self, model: &str, hash: &str) -> Option<(String, Vec<u8>)> {
        let named = hash.is_empty() && self.entry.manifest().answers_to(model);
        (hash == self.entry.hash() || named).then(|| {
            (
                self.entry.hash().to_owned(),
                self.entry.manifest_bytes().to_vec(),
            )
        })
    }

    /// Sends chunks `indices` of the model whose manifest is `hash`, read on a blocking thread
    /// and paced by the upload limit.
    pub(crate) fn send_chunks(
        self: &Arc<Self>,
        hash: &str,
        indices: Vec<u32>,
    ) -> exo_transport::Result<ChunkItems> {
        if hash != self.entry.hash() {
            return Err(exo_transport::Error::service(
                exo_transport::Code::NotFound,
                format!("this node does not hold model {hash}"),
            ));
        }
        let (tx, rx) = mpsc::channel(2);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            for index in indices {
                let entry = Arc::clone(&this.entry);
                let read = tokio::task::spawn_blocking(move || entry.read_chunk(index)).await;
                let item = match read {
                    Ok(Ok(mut bytes)) => {
                        if this.corrupt
                            && let Some(b) = bytes.first_mut()
                        {
                            *b ^= 0x5a;
                        }
                        tokio::time::sleep(this.upload.reserve(bytes.len() as u64)).await;
                        this.traffic
                            .sent
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        Ok((index, bytes))
                    }
                    Ok(Err(e)) => Err(exo_transport::Error::service(
                        exo_transport::Code::NotFound,
                        e.to_string(),
                    )),
                    Err(e) => Err(exo_transport::Error::service(
                        exo_transport::Code::Internal,
                        format!("reading a chunk: {e}"),
                    )),
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// Makes sure this node holds every chunk a shard of `parts` reads, fetching the missing
    /// ones from peers. `Err` says why it cannot.
    pub(crate) async fn ensure(&self, parts: &ShardParts) -> Result<(), String> {
        let what = format!(
            "layers {}..{}{}{}",
            parts.layers.start,
            parts.layers.end,
            if parts.embedding {
                " with the embedding"
            } else {
                ""
            },
            if parts.head { " with the head" } else { "" }
        );
        self.ensure_chunks(&self.entry.manifest().chunks_for_shard(parts), &what)
            .await
    }

    /// Makes sure this node holds the chunks `wanted` (`what` names them in the log), fetching
    /// the missing ones from peers.
    pub(crate) async fn ensure_chunks(&self, wanted: &ChunkSet, what: &str) -> Result<(), String> {
        let manifest = self.entry.manifest();
        let missing = self.entry.missing(wanted);
        if missing.is_empty() {
            return Ok(());
        }
        let total = manifest.bytes_of(&missing);
        self.make_room(wanted, total).await?;
        tracing::info!(
            model = %manifest.name,
            %what,
            chunks = missing.len(),
            mib = total as f64 / (1 << 20) as f64,
            held_chunks = self.entry.held().len(),
            "fetching from peers"
        );
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        self.set_progress(Some(Progress {
            total,
            done: Arc::clone(&done),
            mark: (started, 0),
            rate: 0.0,
        }));
        // Ends the progress and its ticker however this ends, a plan change dropping the fetch
        // included (what was written since the last tick is then fetched again next time).
        let _running = Running {
            progress: Arc::clone(&self.progress),
            ticker: self.tick(),
        };
        let fetched = self.fetch(&missing, &done).await;
        let persisted = self.persist().await;
        fetched?;
        persisted?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            model = %manifest.name,
            %what,
            mib = total as f64 / (1 << 20) as f64,
            seconds,
            mib_per_s = total as f64 / (1 << 20) as f64 / seconds.max(1e-9),
            received_bytes = done.load(Ordering::Relaxed),
            "fetched from peers"
        );
        self.announce_held().await;
        Ok(())
    }

    /// Makes room in the store for `needed` more bytes of this model: other models go first,
    /// least recently used; then, if that is not enough, this model's chunks outside `wanted`
    /// (layers of an earlier plan) are given back.
    async fn make_room(&self, wanted: &ChunkSet, needed: u64) -> Result<(), String> {
        let (store, hash) = (self.store.clone(), self.entry.hash().to_owned());
        let attempt = move || store.make_room(&hash, needed);
        let full = match tokio::task::spawn_blocking(attempt.clone()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e @ exo_store::Error::Full { .. })) => e,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) => return Err(e.to_string()),
        };
        let stale = self.entry.held().difference(wanted);
        let entry = Arc::clone(&self.entry);
        let freed = blocking(move || entry.release(&stale)).await?;
        if freed == 0 {
            return Err(full.to_string());
        }
        tracing::info!(
            model = %self.entry.manifest().name,
            freed_mib = freed as f64 / (1 << 20) as f64,
            "model store: gave back the layers this node no longer serves, to stay within its limit"
        );
        self.announce_held().await;
        blocking(attempt).await
    }

    /// Tells the cluster which chunks this node holds now.
    async fn announce_held(&self) {
        let (hash, chunks) = (self.entry.hash().to_owned(), announced_chunks(&self.entry));
        let updated = self
            .topology
            .update_profile(move |p| {
                for m in &mut p.models {
                    if m.manifest.as_deref() == Some(hash.as_str()) {
                        m.chunks.clone_from(&chunks);
                    }
                }
            })
            .await;
        if let Err(e) = updated {
            tracing::warn!(error = %e, "cannot announce the chunks this node holds");
        }
    }

    fn set_progress(&self, progress: Option<Progress>) {
        if let Ok(mut slot) = self.progress.lock() {
            *slot = progress;
        }
    }

    async fn persist(&self) -> Result<(), String> {
        let entry = Arc::clone(&self.entry);
        blocking(move || entry.persist()).await
    }

    /// Fetches `missing` in rounds: every peer holding some of what is left takes batches
    /// from one queue; a round ends when the queue is empty or every peer's task ended.
    async fn fetch(&self, missing: &ChunkSet, done: &Arc<AtomicU64>) -> Result<(), String> {
        let queue: Arc<Mutex<VecDeque<u32>>> = Arc::new(Mutex::new(missing.iter().collect()));
        let mut bad: HashSet<String> = HashSet::new();
        let mut last_progress = Instant::now();
        let mut last_done = 0;
        let mut told: HashSet<String> = HashSet::new();
        loop {
            let left: Vec<u32> = queue
                .lock()
                .map(|q| q.iter().copied().collect())
                .unwrap_or_default();
            if left.is_empty() {
                return Ok(());
            }
            let sources = self.sources(&bad).await;
            let useful: Vec<Source> = sources
                .into_iter()
                .filter(|s| left.iter().any(|&i| s.chunks.contains(i)))
                .collect();
            let now_done = done.load(Ordering::Relaxed);
            if now_done > last_done {
                last_done = now_done;
                last_progress = Instant::now();
            }
            if last_progress.elapsed() > NO_SOURCE_WAIT {
                let why = if useful.is_empty() {
                    "no peer holds them"
                } else {
                    "the peers that hold them do not send them"
                };
                return Err(format!(
                    "{} chunk(s) of {} this node still needs came from nowhere for {} s \
                         ({why}): start a node that has the model file",
                    left.len(),
                    self.entry.manifest().name,
                    NO_SOURCE_WAIT.as_secs()
                ));
            }
            if useful.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let runs = useful.iter().map(|source| {
                let queue = Arc::clone(&queue);
                async move {
                    let end = self.take_from(source, &queue, done).await;
                    (source.clone(), end)
                }
            });
            let mut local = None;
            for (source, end) in futures::future::join_all(runs).await {
                match end {
                    SourceEnd::Done => {}
                    SourceEnd::Local(reason) => local = Some(reason),
                    SourceEnd::Corrupt(reason) => {
                        tracing::warn!(
                            peer = %source.node,
                            %reason,
                            "a peer sent a chunk that does not match the model's manifest: \
                             it is no longer a source, the chunk comes from another"
                        );
                        bad.insert(source.node.clone());
                    }
                    SourceEnd::Failed(reason) => {
                        // Once per peer and fetch: a peer that keeps failing is retried
                        // quietly until the fetch gives up.
                        if told.insert(source.node.clone()) {
                            tracing::warn!(
                                peer = %source.node,
                                %reason,
                                "fetching chunks from a peer failed; trying again"
                            );
                        }
                        self.clients.forget(&source.endpoint);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            if let Some(reason) = local {
                return Err(reason);
            }
        }
    }

    /// Logs progress, updates the rate and makes verified chunks durable every [`TICK`]; the
    /// caller aborts it.
    fn tick(&self) -> tokio::task::JoinHandle<()> {
        let entry = Arc::clone(&self.entry);
        let progress = Arc::clone(&self.progress);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.tick().await;
            loop {
                interval.tick().await;
                let e = Arc::clone(&entry);
                if let Ok(Err(error)) = tokio::task::spawn_blocking(move || e.persist()).await {
                    tracing::warn!(%error, "cannot make fetched chunks durable");
                }
                let figures = progress.lock().ok().and_then(|mut slot| {
                    let p = slot.as_mut()?;
                    let (now, done) = (Instant::now(), p.done.load(Ordering::Relaxed));
                    let seconds = now.duration_since(p.mark.0).as_secs_f64().max(1e-9);
                    p.rate = done.saturating_sub(p.mark.1) as f64 / seconds;
                    p.mark = (now, done);
                    Some((done, p.total, p.rate))
                });
                let Some((done, total, rate)) = figures else {
                    continue;
                };
                tracing::info!(
                    model = %entry.manifest().name,
                    done_mib = done as f64 / (1 << 20) as f64,
                    total_mib = total as f64 / (1 << 20) as f64,
                    mib_per_s = rate / (1 << 20) as f64,
                    eta_s = (total.saturating_sub(done) as f64 / rate.max(1.0)).round(),
                    "fetching"
                );
            }
        })
    }

    /// The peers that announce this model's manifest, but this node and `bad` ones.
    async fn sources(&self, bad: &HashSet<String>) -> Vec<Source> {
        let Ok(snapshot) = self.topology.snapshot().await else {
            return Vec::new();
        };
        let count = self.entry.manifest().chunk_count();
        let hash = self.entry.hash();
        let mut sources: Vec<Source> = snapshot
            .nodes
            .iter()
            .filter(|p| p.profile.id.as_str() != self.node.as_str())
            .filter(|p| !bad.contains(p.profile.id.as_str()))
            .filter_map(|p| {
                let endpoint = p.profile.grpc_endpoint.as_deref()?;
                let model = p
                    .profile
                    .models
                    .iter()
                    .find(|m| m.manifest.as_deref() == Some(hash))?;
                Some(Source {
                    node: p.profile.id.as_str().to_owned(),
                    endpoint: reachable(endpoint, &p.addresses),
                    chunks: held_by(model, count),
                })
            })
            .collect();
        sources.sort_by(|a, b| a.node.cmp(&b.node));
        sources
    }

    /// Takes batches of chunks `source` holds from `queue` until none is left for it.
    async fn take_from(
        &self,
        source: &Source,
        queue: &Mutex<VecDeque<u32>>,
        done: &AtomicU64,
    ) -> SourceEnd {
        let client = match self.clients.get(&source.endpoint).await {
            Ok(c) => c,
            Err(e) => return SourceEnd::Failed(e.to_string()),
        };
        let hash = self.entry.hash().to_owned();
        loop {
            let batch = take_batch(queue, &source.chunks);
            if batch.is_empty() {
                return SourceEnd::Done;
            }
            let mut stream = match client.chunks(&hash, &batch).await {
                Ok(s) => s,
                Err(e) => {
                    give_back(queue, &batch);
                    return SourceEnd::Failed(e.to_string());
                }
            };
            for (position, &expected) in batch.iter().enumerate() {
                if let Err(end) = self.receive(&mut stream, expected, done).await {
                    give_back(queue, &batch[position..]);
                    return end;
                }
            }
        }
    }

    /// Receives chunk `expected` from `stream`, checks it and writes it; `Err` says how the
    /// source's part ends.
    async fn receive(
        &self,
        stream: &mut exo_transport::ChunkStream,
        expected: u32,
        done: &AtomicU64,
    ) -> Result<(), SourceEnd> {
        let (index, bytes) = match stream.next().await {
            Ok(Some(item)) => item,
            Ok(None) => return Err(SourceEnd::Failed("the peer ended the stream early".into())),
            Err(e) => return Err(SourceEnd::Failed(e.to_string())),
        };
        if index != expected {
            return Err(SourceEnd::Failed(format!(
                "sent chunk {index} where chunk {expected} was asked for"
            )));
        }
        let entry = Arc::clone(&self.entry);
        let len = bytes.len() as u64;
        match tokio::task::spawn_blocking(move || entry.write_chunk(index, &bytes)).await {
            Ok(Ok(())) => {
                done.fetch_add(len, Ordering::Relaxed);
                self.traffic.received.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(exo_store::Error::BadChunk { reason, .. })) => {
                Err(SourceEnd::Corrupt(format!("chunk {index}: {reason}")))
            }
            // The local disk failed (full, gone): no peer can help.
            Ok(Err(e)) => Err(SourceEnd::Local(e.to_string())),
            Err(e) => Err(SourceEnd::Failed(e.to_string())),
        }
    }
}

/// Runs store work on a blocking thread; its error, or the thread's, as text.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> exo_store::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The chunks a node announces of `entry`: `None` when it holds them all.
pub(crate) fn announced_chunks(entry: &Entry) -> Option<Vec<[u32; 2]>> {
    (!entry.is_complete()).then(|| entry.held().runs().to_vec())
}

/// Up to [`BATCH_CHUNKS`] chunks of `queue` that `held` contains, taken out of it.
fn take_batch(queue: &Mutex<VecDeque<u32>>, held: &ChunkSet) -> Vec<u32> {
    let Ok(mut queue) = queue.lock() else {
        return Vec::new();
    };
    let mut batch = Vec::with_capacity(BATCH_CHUNKS);
    let mut kept = VecDeque::with_capacity(queue.len());
    while let Some(i) = queue.pop_front() {
        if batch.len() < BATCH_CHUNKS && held.contains(i) {
            batch.push(i);
        } else {
            kept.push_back(i);
        }
    }
    *queue = kept;
    batch
}

/// Puts chunks not received back at the head of the queue.
fn give_back(queue: &Mutex<VecDeque<u32>>, chunks: &[u32]) {
    if let Ok(mut queue) = queue.lock() {
        for &i in chunks.iter().rev() {
            queue.push_front(i);
        }
    }
}

/// A model found on this node: the file to open, and its store entry when there is a store.
#[derive(Debug)]
pub(crate) struct Located {
    pub(crate) path: std::path::PathBuf,
    pub(crate) entry: Option<Entry>,
}

/// Where this node's model is: the file or folder at `path` (imported into the store, when
/// there is one and it is a GGUF file or a Hugging Face folder, so peers can fetch from it), or the store's copy of the model `path`
/// names when that copy holds the header. `None`: it must come from a peer.
pub(crate) fn locate(
    path: &std::path::Path,
    store: Option<&Store>,
) -> crate::error::Result<Option<Located>> {
    if path.exists() {
        // A GGUF file or a Hugging Face folder; a model the store cannot describe is served
        // here but not offered to peers.
        let describable = path.is_dir()
            || path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let entry = match store.filter(|_| describable) {
            Some(store) => {
                let started = Instant::now();
                let mut told = false;
                let imported = store.import(path, |done, total| {
                    if !told && started.elapsed() > Duration::from_secs(2) {
                        told = true;
                        tracing::info!(
                            mib = total >> 20,
                            done_mib = done >> 20,
                            "describing the model file for peers (hashing its chunks, once)"
                        );
                    }
                });
                match imported {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        tracing::warn!(error = %e, "the model file cannot be offered to peers");
                        None
                    }
                }
            }
            None => None,
        };
        return Ok(Some(Located {
            path: path.to_owned(),
            entry,
        }));
    }
    let Some(store) = store else {
        return Ok(None);
    };
    let name = path.to_string_lossy();
    let found = store
        .find(&name)
        .map_err(|e| crate::error::Error::Config(e.to_string()))?;
    Ok(found
        .filter(|entry| entry.missing(&entry.manifest().header()).is_empty())
        .map(|entry| Located {
            path: entry.path().to_owned(),
            entry: Some(entry),
        }))
}

/// Waits for a peer that announces the model `name` (its name, or its file's name)
/// with a manifest, takes the manifest from it (checked against the hash it announced) and
/// keeps it in `store`. Logs every ten seconds while no peer has it.
pub(crate) async fn from_peers(
    topology: &Topology,
    clients: &ClientPool,
    store: &Store,
    name: &str,
) -> crate::error::Result<Entry> {
    use futures::StreamExt;
    let mut events = topology.events().await?;
    let started = Instant::now();
    let mut told = Instant::now();
    let mut refused: HashSet<String> = HashSet::new();
    // Nodes announce a model by its checkpoint's name, the file stem (`X` for `X.gguf`).
    let stem = std::path::Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned());
    tracing::info!(model = %name, "no such file here: waiting for a peer that holds the model");
    loop {
        let snapshot = topology.snapshot().await?;
        let offers = snapshot.nodes.iter().flat_map(|peer| {
            peer.profile
                .models
                .iter()
                .filter(|m| m.name == name || Some(&m.name) == stem.as_ref())
                .filter_map(move |m| {
                    let hash = m.manifest.clone()?;
                    let endpoint = peer.profile.grpc_endpoint.as_deref()?;
                    Some((
                        peer.profile.id.clone(),
                        reachable(endpoint, &peer.addresses),
                        hash,
                    ))
                })
        });
        for (peer, endpoint, hash) in offers {
            let asked = async {
                let client = clients.get(&endpoint).await.map_err(|e| e.to_string())?;
                let (_, bytes) = client
                    .manifest(name, &hash)
                    .await
                    .map_err(|e| e.to_string())?;
                let (store, asked) = (store.clone(), hash.clone());
                blocking(move || store.create(&bytes, &asked)).await
            };
            match asked.await {
                Ok(entry) => {
                    tracing::info!(
                        model = %entry.manifest().name,
                        %peer,
                        manifest = %hash,
                        mib = entry.manifest().bytes >> 20,
                        held_chunks = entry.held().len(),
                        chunks = entry.manifest().chunk_count(),
                        "learned the model's manifest from a peer"
                    );
                    return Ok(entry);
                }
                Err(reason) => {
                    clients.forget(&endpoint);
                    if refused.insert(peer.to_string()) {
                        tracing::warn!(%peer, %reason, "cannot take the model's manifest from a peer");
                    }
                }
            }
        }
        if told.elapsed() > Duration::from_secs(10) {
            told = Instant::now();
            tracing::info!(
                model = %name,
                peers = snapshot.nodes.len(),
                waited_s = started.elapsed().as_secs(),
                "still waiting for a peer that holds the model"
            );
        }
        tokio::select! {
            event = events.next() => if event.is_none() {
                return Err(crate::error::Error::Config("membership stopped".to_owned()));
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
