//! `exo-node revoke`: lock a device out of the cluster by rotating the cluster key. Joins as
//! an observer, hands a new key to every node it reaches except the revoked one (inside the
//! connections the current key protects), and keeps the new key on this device. The nodes
//! that take it join again with it; the revoked device keeps a key that opens nothing.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use exo_topology::{ClusterKey, NodeId, Topology};

use crate::peers::ObserverArgs;

#[derive(Args, Debug)]
pub(crate) struct RevokeArgs {
    /// The id of the device to lock out, as `exo-node peers` or the web page lists it
    /// (`12D3KooW...`). It may be off or lost: it is left out all the same.
    node: String,
    #[command(flatten)]
    membership: ObserverArgs,
    /// Seconds to find the cluster's nodes before handing on the new key.
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
}

pub(crate) fn run(args: RevokeArgs) -> Result<()> {
    let runtime = crate::multi_thread_runtime()?;
    runtime.block_on(revoke(args))
}

async fn revoke(args: RevokeArgs) -> Result<()> {
    let revoked = NodeId::from(
        args.node
            .trim()
            .parse::<exo_topology::multiaddr::PeerId>()
            .map_err(|e| {
                anyhow::anyhow!(
                    "`{}` is not a node id ({e}); `exo-node peers` lists them",
                    args.node
                )
            })?,
    );
    let config = args.membership.config()?;
    if args.membership.cluster_key.is_none()
        && !config.home.join(exo_topology::CLUSTER_KEY_FILE).exists()
    {
        anyhow::bail!(
            "this device has no cluster key ({} is missing): run `exo-node revoke` on a device of \
             the cluster, or give its key with --cluster-key",
            config.home.join(exo_topology::CLUSTER_KEY_FILE).display()
        );
    }
    // The command joins under an identity of its own (ObserverArgs): on a device that runs a
    // node too, the home's identity is the node's, and the new key, which is never handed back
    // to its sender, would miss that node.
    let home = config.home.clone();
    let topology = Topology::start(config).await?;
    if &revoked == topology.local_id() {
        anyhow::bail!("{revoked} is this command's own id; give the id of the device to lock out");
    }
    // Gather the cluster: until the wait ends, or until nothing new joined for a second.
    let wait = Duration::try_from_secs_f64(args.wait.max(0.0)).unwrap_or(Duration::ZERO);
    let deadline = Instant::now() + wait;
    let (mut seen, mut steady_since) = (0, Instant::now());
    while Instant::now() < deadline {
        let count = topology.snapshot().await?.nodes.len();
        if count != seen {
            (seen, steady_since) = (count, Instant::now());
        } else if count > 0 && steady_since.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = topology.snapshot().await?;
    if snapshot.node(&revoked).is_none() {
        eprintln!(
            "exo-node: {revoked} was not reached (off, lost, or not found by mDNS or --peer); \
             it is locked out all the same"
        );
    }
    let key = ClusterKey::generate();
    let acks = topology
        .rotate_key(key.clone(), vec![revoked.clone()])
        .await?;
    let saved = exo_topology::save_cluster_key(&home, &key, true)?;
    let took: Vec<_> = acks.iter().filter(|a| a.outcome.is_ok()).collect();
    for ack in &acks {
        match &ack.outcome {
            Ok(()) => eprintln!(
                "exo-node: {} took the new key and joins again with it",
                ack.node
            ),
            Err(why) => eprintln!("exo-node: {} did not take the new key: {why}", ack.node),
        }
    }
    topology.shutdown().await?;
    eprintln!(
        "exo-node: the cluster key is rotated (new fingerprint {}), kept in {}; {} node(s) took it. \
         {revoked} keeps the old key, which opens no connection and no call any more. A device \
         of the cluster that did not take it (off, or unreachable now) is locked out too: let it \
         in again with `exo-node invite` here and `exo-node join` there.",
        key.fingerprint(),
        saved.display(),
        took.len()
    );
    if args.membership.cluster_key.is_some() {
        eprintln!(
            "exo-node: --cluster-key or EXO_CLUSTER_KEY holds the old key: drop it (the devices \
             read {}) or give the new key from that file",
            saved.display()
        );
    }
    if took.len() < acks.len() {
        anyhow::bail!(
            "{} of {} node(s) did not take the new key",
            acks.len() - took.len(),
            acks.len()
        );
    }
    Ok(())
}
