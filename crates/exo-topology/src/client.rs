//! The client side: [`Topology`], cheap to clone, which talks to the event loop over a channel.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::stream::BoxStream;
use libp2p::Multiaddr;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::Swarm;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::bench::Benchmark;
use crate::config::TopologyConfig;
use crate::diagnose::chain_text;
use crate::error::{Error, Result};
use crate::event::{TopologyEvent, TopologySnapshot};
use crate::event_loop::{Command, EventLoop};
use crate::host::{host_name, logical_cores, os_name, read_memory};
use crate::identity::{
    ClusterKey, ClusterKeyInfo, KeyOrigin, hex, load_or_create_identity, resolve_cluster_key,
};
use crate::network::{Behaviour, build_swarm};
use crate::profile::{NodeId, NodeProfile};
use crate::rotation::{Rotation, RotationAck};

/// How long the start-up micro-benchmark runs.
const BENCHMARK_BUDGET: Duration = Duration::from_millis(240);

/// A handle on this node's cluster membership. Clone it freely; the service stops when
/// [`Topology::shutdown`] is called or when the last clone is dropped, and in both cases closes
/// its connections so that the other nodes see it leave at once.
#[derive(Debug, Clone)]
pub struct Topology {
    commands: mpsc::Sender<Command>,
    local_id: NodeId,
    cluster_key: ClusterKeyInfo,
    key: ClusterKey,
    rotations: watch::Receiver<Option<Rotation>>,
}

impl Topology {
    /// Joins the cluster: loads (or creates) the identity and cluster key in `config.home`,
    /// measures this machine, listens, dials the static peers, starts mDNS and spawns the event
    /// loop on the current tokio runtime (it must be called from within one).
    pub async fn start(config: TopologyConfig) -> Result<Self> {
        let keypair = if config.ephemeral_identity {
            libp2p::identity::Keypair::generate_ed25519()
        } else {
            load_or_create_identity(&config.home)?
        };
        let (cluster_key, key_info) =
            resolve_cluster_key(config.cluster_key.as_ref(), &config.home)?;
        match &key_info.origin {
            // Until the key is shared no other device can join, so this is said at warning
            // level: it reaches the user of every binary whatever its default log level.
            KeyOrigin::Generated { .. } => tracing::warn!("{}", key_info.share_hint()),
            _ => tracing::info!(fingerprint = %key_info.fingerprint, "using the cluster key"),
        }
        let benchmark = match config.benchmark {
            Some(b) => b,
            None => tokio::task::spawn_blocking(|| Benchmark::measure(BENCHMARK_BUDGET))
                .await
                .map_err(|e| Error::Network(format!("micro-benchmark: {e}")))?,
        };
        let instance = hex(&rand::random::<[u8; 8]>());
        let local_id = NodeId::from(keypair.public().to_peer_id());
        let local = NodeProfile {
            id: local_id.clone(),
            instance: instance.clone(),
            name: host_name(),
            os: os_name(),
            role: config.role,
            grpc_endpoint: config.grpc_endpoint.clone(),
            memory: read_memory(config.memory_limit),
            backend: config.backend.clone(),
            device: config.device.clone(),
            cores: logical_cores(),
            flops_per_s: benchmark.flops_per_s,
            mem_bandwidth_bytes_per_s: benchmark.mem_bandwidth_bytes_per_s,
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: config.protocol_version.clone(),
            models: config.models.clone(),
        };
        let agent = format!("exo-rs/{} ({instance})", env!("CARGO_PKG_VERSION"));
        let mut swarm = build_swarm(&keypair, cluster_key.psk(), &config, agent)?;
        let key = cluster_key.clone();
        let listeners = config
            .listen
            .iter()
            .map(|address| listen(&mut swarm, address))
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(id = %local_id, "joining the cluster");

        let (commands, receiver) = mpsc::channel(64);
        let (rotated, rotations) = watch::channel(None);
        let event_loop = EventLoop::new(
            swarm,
            listeners,
            receiver,
            config,
            local,
            key_info.clone(),
            rotated,
        );
        tokio::spawn(event_loop.run());
        Ok(Self {
            commands,
            local_id,
            cluster_key: key_info,
            key,
            rotations,
        })
    }

    /// A secret derived from the cluster key for `purpose` (see [`ClusterKey::derive`]): how
    /// other services of the cluster authenticate each other.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        self.key.derive(purpose)
    }

    /// A new cluster key another member handed this node (`None` until one comes): the owner
    /// is expected to save it and start again with it (see [`Rotation`]).
    pub fn rotations(&self) -> watch::Receiver<Option<Rotation>> {
        self.rotations.clone()
    }

    /// Resolves with the first rotation another member hands this node (at once if one came
    /// already); never, if none comes.
    pub async fn rotated(&self) -> Rotation {
        let mut rotations = self.rotations.clone();
        loop {
            if let Some(rotation) = rotations.borrow_and_update().clone() {
                return rotation;
            }
            if rotations.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Hands `key` to every node of the cluster except `revoked`, and says how each answered.
    /// The nodes that take it start again with it; the revoked ones keep a key that then opens
    /// nothing. This node keeps its own key: its owner saves and uses the new one.
    pub async fn rotate_key(
        &self,
        key: ClusterKey,
        revoked: Vec<NodeId>,
    ) -> Result<Vec<RotationAck>> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Rotate(key, revoked, reply))
            .await
            .map_err(|_| Error::Stopped)?;
        answer.await.map_err(|_| Error::Stopped)
    }

    /// This node's id.
    pub fn local_id(&self) -> &NodeId {
        &self.local_id
    }

    /// The cluster key in use, described without the secret.
    pub fn cluster_key(&self) -> &ClusterKeyInfo {
        &self.cluster_key
    }

    /// Everything known now: this node, the other nodes with their links, and the peers seen
    /// but not in the cluster with the reason.
    pub async fn snapshot(&self) -> Result<TopologySnapshot> {
        self.ask(Command::Snapshot).await
    }

    /// Events from now on.
    pub async fn events(&self) -> Result<EventStream> {
        Ok(self.subscribe().await?.1)
    }

    /// A snapshot and the events that follow it, with nothing lost in between.
    pub async fn subscribe(&self) -> Result<(TopologySnapshot, EventStream)> {
        let (snapshot, receiver) = self.ask(Command::Subscribe).await?;
        Ok((snapshot, EventStream::new(receiver)))
    }

    /// Adds a static peer: dialled now and redialled with backoff whenever not connected.
    pub async fn add_peer(&self, address: Multiaddr) -> Result<()> {
        self.ask(|reply| Command::AddPeer(address, reply)).await?
    }

    /// Changes what this node announces (models held, shard endpoint, backend); the other nodes
    /// get the new profile at once. The id, instance and versions cannot be changed. Returns
    /// the profile now announced.
    pub async fn update_profile(
        &self,
        edit: impl FnOnce(&mut NodeProfile) + Send + 'static,
    ) -> Result<NodeProfile> {
        self.ask(|reply| Command::UpdateProfile(Box::new(edit), reply))
            .await
    }

    /// Leaves the cluster: closes every connection (the other nodes see this node leave at
    /// once) and stops the service, for every clone.
    pub async fn shutdown(self) -> Result<()> {
        self.ask(Command::Shutdown).await
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        answer.await.map_err(|_| Error::Stopped)
    }
}

/// Listens on `address`; a TCP port in use is replaced by a free one.
fn listen(swarm: &mut Swarm<Behaviour>, address: &Multiaddr) -> Result<ListenerId> {
    let error = match swarm.listen_on(address.clone()) {
        Ok(id) => return Ok(id),
        Err(e) => e,
    };
    let in_use = addr_in_use(&error);
    let has_port = address
        .iter()
        .any(|p| matches!(p, Protocol::Tcp(port) if port != 0));
    if in_use && has_port {
        let any_port: Multiaddr = address
            .iter()
            .map(|p| match p {
                Protocol::Tcp(_) => Protocol::Tcp(0),
                other => other,
            })
            .collect();
        tracing::warn!(
            %address,
            "address in use (another exo-node on this machine?); listening on a free port instead, so static peers must dial the address printed by `exo-node peers`"
        );
        return swarm.listen_on(any_port).map_err(|e| Error::Listen {
            address: address.to_string(),
            message: chain_text(&e),
        });
    }
    Err(Error::Listen {
        address: address.to_string(),
        message: chain_text(&error),
    })
}

fn addr_in_use(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::AddrInUse {
                return true;
            }
            if let Some(inner) = io.get_ref()
                && addr_in_use(inner)
            {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The events of one subscriber. A subscriber that falls more than 1024 events behind loses
/// the oldest (a warning is logged); a snapshot tells the current state.
pub struct EventStream {
    inner: BoxStream<'static, TopologyEvent>,
}

impl EventStream {
    fn new(receiver: broadcast::Receiver<TopologyEvent>) -> Self {
        let inner = futures::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => return Some((event, receiver)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "topology subscriber fell behind, events lost");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = TopologyEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TopologyEvent>> {
        self.inner.as_mut().poll_next(cx)
    }
}
