//! Zero-configuration cluster membership for exo-rs: nodes on one network find each other by
//! mDNS (or by static addresses where multicast is blocked), prove they belong to the same
//! private cluster, exchange profiles and measure the links between them.
//!
//! Each node runs a libp2p swarm over TCP. Every connection is wrapped in the cluster key
//! (libp2p's pre-shared-key private network), then Noise and Yamux, so a node with another key
//! cannot connect at all, and nothing travels in clear. On every connection nodes run identify
//! (carrying the protocol version [`PROTOCOL_VERSION`]), ping (round trips, and liveness: a node
//! silent for two seconds is gone), a profile exchange ([`NodeProfile`]: memory, backend,
//! measured compute and memory bandwidth, models held, shard endpoint) and a bandwidth probe (a
//! timed transfer of up to a few MiB, one at a time, every 30 s).
//!
//! A new device gets the cluster key by a short code ([`offer_key`] on a device of the cluster,
//! [`fetch_key`] on the new one: SPAKE2, so the code cannot be tested offline).
//!
//! [`Topology::start`] joins; the returned client gives a [`TopologySnapshot`] and a stream of
//! [`TopologyEvent`]s. Peers that were seen but could not join are kept as
//! [`PeerDiagnostic`]s that say why (another cluster key, another version, a copied identity,
//! an unreachable address).
//!
//! This crate knows libp2p and must NOT know about tensors, models, the planner or the shard
//! service: it reports plain data (serde types) and the node runtime converts it into the
//! planner's inputs. Model files are names and sizes here, the shard service an endpoint
//! string.
//!
//! ```no_run
//! # async fn demo() -> exo_topology::Result<()> {
//! use futures::StreamExt;
//! use exo_topology::{Topology, TopologyConfig};
//!
//! let topology = Topology::start(TopologyConfig::new("/home/me/.cache/exo")).await?;
//! let (snapshot, mut events) = topology.subscribe().await?;
//! println!("{snapshot}");
//! while let Some(event) = events.next().await {
//!     println!("{event}");
//! }
//! # Ok(())
//! # }
//! ```

mod bench;
mod client;
mod config;
mod diagnose;
mod error;
mod event;
mod event_loop;
mod format;
mod host;
mod identity;
mod join;
mod network;
mod open_files;
mod profile;
mod protocol;
mod rotation;

pub use bench::Benchmark;
pub use client::{EventStream, Topology};
pub use config::{DEFAULT_PORT, TopologyConfig, TransportKind, parse_peer_address};
pub use error::{Error, Result};
pub use event::{
    Discovery, LeaveReason, PeerDiagnostic, PeerInfo, Problem, TopologyEvent, TopologySnapshot,
};
pub use host::{ProcessMemory, cpu_name, process_memory};
pub use identity::{
    CLUSTER_KEY_FILE, ClusterKey, ClusterKeyInfo, KeyOrigin, MIN_PASSPHRASE_CHARS, NODE_KEY_FILE,
    resolve_cluster_key,
};
#[doc(hidden)]
pub use join::testing as join_testing;
pub use join::{INVITE_PORT, JoinCode, MAX_WRONG_CODES, fetch_key, offer_key, save_cluster_key};
pub use libp2p::{Multiaddr, multiaddr};
pub use open_files::{OpenFileLimit, raise_open_file_limit, raise_open_file_limit_at_start};
pub use profile::{LinkMeasurement, MemoryInfo, ModelFile, NodeId, NodeProfile, NodeRole};
pub use protocol::PROTOCOL_VERSION;
pub use rotation::{Rotation, RotationAck};
