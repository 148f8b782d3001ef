//! `exo-gateway`: serves the OpenAI-compatible API for a cluster without computing. It joins
//! the cluster as an observer (never given layers) and forwards each request to a node that
//! serves the model.
//!
//! This binary is glue: it parses flags, sets up logging, and calls `exo_cluster::run_gateway`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use exo_topology::{TopologyConfig, parse_peer_address};

/// An OpenAI-compatible API front for an exo-rs cluster: point clients at http://ADDR/v1.
#[derive(Parser, Debug)]
#[command(name = "exo-gateway", version, about, long_about = None)]
struct Cli {
    /// Log level filter (`info`, `debug`, ...); also read from RUST_LOG.
    #[arg(long, env = "EXO_LOG", default_value = "info")]
    log: String,
    /// The cluster key: 64 hexadecimal digits, or the passphrase (at least 12 characters) the
    /// cluster's nodes were started with (default: $EXO_HOME/cluster.key).
    #[arg(long, env = "EXO_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
    /// A node to dial directly, for networks that block multicast (may be repeated).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Membership address to listen on (may be repeated), so that the nodes can reach the
    /// gateway; its traffic is encrypted under the cluster key.
    #[arg(long)]
    listen: Vec<String>,
    /// Do not discover nodes by mDNS; only --peer.
    #[arg(long)]
    no_mdns: bool,
    /// Where the API listens (loopback by default: only this device's programs; give a LAN
    /// address with --api-key to serve others; plain HTTP).
    #[arg(long, default_value = "127.0.0.1:52415")]
    api_addr: SocketAddr,
    /// Require this key as `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "EXO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow browsers on this origin to call the API (may be repeated; `*` for any).
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Requests forwarded at once; more wait in the queue.
    #[arg(long, default_value_t = 16)]
    max_concurrent: usize,
    /// Requests that may wait; beyond that the API answers 429.
    #[arg(long, default_value_t = 256)]
    max_queued: usize,
    /// HTTP connections kept open at once. At the cap a new connection closes the longest-idle
    /// one; when every one has a request in flight it gets 503 (retry after 1 s).
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Before anything opens a socket: a soft limit of 1,024 open files, common by default, is
    // too low for a server's connections.
    exo_topology::raise_open_file_limit_at_start();
    let mut topology = TopologyConfig::new(exo_model::exo_home());
    // A gateway beside a node on the same machine must not take the node's port.
    topology.listen = vec![parse_peer_address("/ip4/0.0.0.0/tcp/0")?];
    topology.apply_flags(
        cli.cluster_key.as_deref(),
        &cli.peers,
        &cli.listen,
        !cli.no_mdns,
    )?;
    let config = exo_cluster::GatewayConfig {
        topology,
        api_listen: cli.api_addr,
        api: exo_api::ApiConfig {
            api_key: cli.api_key.filter(|k| !k.is_empty()),
            cors_origins: cli.cors_origins,
            max_concurrent: cli.max_concurrent.max(1),
            max_queued: cli.max_queued,
            max_connections: cli.max_connections.max(1),
            ..exo_api::ApiConfig::default()
        },
        limits: Default::default(),
    };
    eprintln!(
        "exo-gateway: OpenAI-compatible API at http://{}/v1",
        cli.api_addr
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(exo_cluster::run_gateway(
        config,
        exo_cluster::shutdown_signal(),
    ))?;
    Ok(())
}
