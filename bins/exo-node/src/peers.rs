//! `exo-node peers`: join the cluster as an observer, then print who is there, how good the
//! links are, and why a peer that was seen is not connected.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use exo_topology::{NodeRole, Topology, TopologyConfig, cpu_name};
use futures::StreamExt;

use crate::shutdown_signal;

/// How a command that joins as an observer (it computes nothing) finds the cluster.
#[derive(Args, Debug)]
pub(crate) struct ObserverArgs {
    /// The cluster key: 64 hexadecimal digits, or a passphrase of at least 12 characters
    /// typed the same on every device. Without it the key in $EXO_HOME/cluster.key is used
    /// (created on first use); every device of a cluster needs the same key.
    #[arg(long, env = "EXO_CLUSTER_KEY", hide_env_values = true)]
    pub(crate) cluster_key: Option<String>,
    /// A node to dial directly, for networks that block multicast (may be repeated):
    /// `/ip4/10.0.0.5/tcp/52416`, `10.0.0.5:52416` or `10.0.0.5`.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Membership address to listen on while it runs (may be repeated), so that the nodes can
    /// connect back; its traffic is encrypted under the cluster key. A port in use is replaced
    /// by a free one.
    #[arg(long, default_values_t = [format!("/ip4/0.0.0.0/tcp/{}", exo_topology::DEFAULT_PORT)])]
    listen: Vec<String>,
    /// Do not discover nodes by mDNS; only --peer.
    #[arg(long)]
    no_mdns: bool,
}

impl ObserverArgs {
    /// Membership settings from these flags, as an observer.
    pub(crate) fn config(&self) -> Result<TopologyConfig> {
        let mut config = TopologyConfig::new(exo_model::exo_home());
        config.apply_flags(
            self.cluster_key.as_deref(),
            &self.peers,
            &self.listen,
            !self.no_mdns,
        )?;
        config.role = NodeRole::Observer;
        // Not the identity of a node this device may run from the same home.
        config.ephemeral_identity = true;
        config.backend = "none".to_owned();
        config.device = cpu_name();
        Ok(config)
    }
}

#[derive(Args, Debug)]
pub(crate) struct PeersArgs {
    #[command(flatten)]
    membership: ObserverArgs,
    /// Seconds to gather before printing.
    #[arg(long, default_value_t = 3.0)]
    wait: f64,
    /// Keep running and print events (joins, departures, measurements, problems) as they
    /// happen, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print JSON: the snapshot, or with --watch one JSON object per line (first the snapshot,
    /// then the events).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: PeersArgs) -> Result<()> {
    let runtime = crate::multi_thread_runtime()?;
    runtime.block_on(peers(args))
}

async fn peers(args: PeersArgs) -> Result<()> {
    let config = args.membership.config()?;

    // A key generated now comes with a warning that says how to share it (from exo-topology).
    let topology = Topology::start(config).await?;
    if args.watch {
        let (snapshot, mut events) = topology.subscribe().await?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "event": "snapshot", "snapshot": snapshot })
            );
        } else {
            println!("{snapshot}");
        }
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(event) if args.json => println!("{}", serde_json::to_string(&event)?),
                    Some(event) => println!("{event}"),
                    None => break,
                },
                () = &mut shutdown => break,
            }
        }
    } else {
        let wait = Duration::try_from_secs_f64(args.wait.max(0.0)).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown_signal() => {}
        }
        let snapshot = topology.snapshot().await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
        } else {
            print!("{snapshot}");
        }
    }
    // Leave cleanly: the other nodes see this one go at once.
    topology.shutdown().await?;
    Ok(())
}
