//! How a node joins the cluster: where it keeps its identity, where it listens, whom it dials,
//! what it announces and how often it measures.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

use crate::bench::Benchmark;
use crate::error::{Error, Result};
use crate::identity::ClusterKey;
use crate::profile::{ModelFile, NodeRole};
use crate::protocol::PROTOCOL_VERSION;

/// The TCP port a node listens on unless told otherwise (and the one a bare `--peer 10.0.0.5`
/// dials).
pub const DEFAULT_PORT: u16 = 52416;

/// Which transport carries the cluster's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// TCP, wrapped in the cluster key, then Noise and Yamux. What real nodes use.
    #[default]
    Tcp,
    /// libp2p's in-process memory transport (`/memory/<n>` addresses), wrapped the same way. For
    /// tests: several nodes in one process, no sockets.
    Memory,
}

/// Everything [`crate::Topology::start`] needs.
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    /// The node's home folder (`$EXO_HOME`): `node.key` and, unless a key is given,
    /// `cluster.key` live here.
    pub home: PathBuf,
    /// The cluster key; `None` reads `home/cluster.key`, or generates it there.
    pub cluster_key: Option<ClusterKey>,
    /// The transport.
    pub transport: TransportKind,
    /// Addresses to listen on. A TCP port already in use is replaced by a free one (with a
    /// warning), so a diagnostic run beside a running node still works.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial and keep dialling (with backoff) whatever mDNS says: for networks that
    /// block multicast.
    pub static_peers: Vec<Multiaddr>,
    /// Discover peers on the local network by multicast DNS.
    pub mdns: bool,
    /// What the node does; announced in its profile.
    pub role: NodeRole,
    /// The compute backend to announce.
    pub backend: String,
    /// The device to announce.
    pub device: String,
    /// The shard service endpoint to announce, if any.
    pub grpc_endpoint: Option<String>,
    /// Model files to announce.
    pub models: Vec<ModelFile>,
    /// Caps the memory the node announces (total and available), bytes.
    pub memory_limit: Option<u64>,
    /// Start-up measurements to announce; `None` runs the micro-benchmark (about 250 ms).
    pub benchmark: Option<Benchmark>,
    /// How often each connection is pinged.
    pub ping_interval: Duration,
    /// A connection silent (no ping answered) for this long is closed and its node declared
    /// gone. With the defaults a node that vanishes without closing its connections is declared
    /// gone within 2.1 s.
    pub liveness_timeout: Duration,
    /// How often each link's bandwidth is measured again.
    pub probe_interval: Duration,
    /// The largest bandwidth probe, bytes. Probes are sized to last about
    /// [`TopologyConfig::probe_target`] on the link measured, between 256 KiB and this.
    pub probe_max_bytes: u64,
    /// How long a probe should take once the link's bandwidth is roughly known.
    pub probe_target: Duration,
    /// The protocol version announced. Leave it at [`PROTOCOL_VERSION`]; tests change it to
    /// play a node of another release.
    pub protocol_version: String,
    /// Join under an identity made for this run instead of `home/node.key`: for observers
    /// (`exo-node peers`, `exo-node revoke`, a gateway), which may run on a device whose home
    /// a node uses too. Two processes under one identity look like a copied home folder to the
    /// others, and a node would take the observer's messages for its own.
    pub ephemeral_identity: bool,
}

impl TopologyConfig {
    /// Defaults for a real node with its home folder at `home`: TCP on [`DEFAULT_PORT`] on every
    /// IPv4 interface, mDNS on, a worker that announces the `flex` backend on its CPU.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            cluster_key: None,
            transport: TransportKind::Tcp,
            listen: vec![
                Multiaddr::empty()
                    .with(Protocol::Ip4(std::net::Ipv4Addr::UNSPECIFIED))
                    .with(Protocol::Tcp(DEFAULT_PORT)),
            ],
            static_peers: Vec::new(),
            mdns: true,
            role: NodeRole::Worker,
            backend: "flex".to_owned(),
            device: crate::host::cpu_name(),
            grpc_endpoint: None,
            models: Vec::new(),
            memory_limit: None,
            benchmark: None,
            ping_interval: Duration::from_millis(500),
            liveness_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(30),
            probe_max_bytes: 4 << 20,
            probe_target: Duration::from_secs(1),
            protocol_version: PROTOCOL_VERSION.to_owned(),
            ephemeral_identity: false,
        }
    }

    /// Applies the membership flags every binary offers: the cluster key as typed
    /// (`--cluster-key`: 64 hexadecimal digits or a passphrase, see [`ClusterKey::parse`]),
    /// static peers (`--peer`), listen addresses (`--listen`; none keeps the
    /// current ones) and whether to use mDNS.
    pub fn apply_flags(
        &mut self,
        cluster_key: Option<&str>,
        peers: &[String],
        listen: &[String],
        mdns: bool,
    ) -> Result<()> {
        self.cluster_key = cluster_key
            .map(|k| ClusterKey::parse(k, "--cluster-key"))
            .transpose()?;
        self.static_peers = peers
            .iter()
            .map(|p| parse_peer_address(p))
            .collect::<Result<_>>()?;
        if !listen.is_empty() {
            self.listen = listen
                .iter()
                .map(|a| parse_peer_address(a))
                .collect::<Result<_>>()?;
        }
        self.mdns = mdns;
        Ok(())
    }

    /// Defaults for an in-process test node: the memory transport listening on `/memory/<port>`,
    /// no mDNS, fixed benchmark figures, probes every 2 s.
    pub fn in_memory(home: impl Into<PathBuf>, port: u64) -> Self {
        Self {
            transport: TransportKind::Memory,
            listen: vec![Multiaddr::empty().with(Protocol::Memory(port))],
            mdns: false,
            benchmark: Some(Benchmark {
                flops_per_s: 1e10,
                mem_bandwidth_bytes_per_s: 1e10,
            }),
            probe_interval: Duration::from_secs(2),
            ..Self::new(home)
        }
    }
}

/// Parses a peer address as a user types it: a multiaddr (`/ip4/10.0.0.5/tcp/52416`), an IP
/// and port (`10.0.0.5:52416`, `[fe80::1]:52416`) or a bare IP (port [`DEFAULT_PORT`]).
pub fn parse_peer_address(text: &str) -> Result<Multiaddr> {
    let text = text.trim();
    if text.starts_with('/') {
        return text
            .parse()
            .map_err(|e: libp2p::multiaddr::Error| Error::Address {
                address: text.to_owned(),
                message: e.to_string(),
            });
    }
    let socket = if let Ok(socket) = text.parse::<SocketAddr>() {
        socket
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        SocketAddr::new(ip, DEFAULT_PORT)
    } else {
        return Err(Error::Address {
            address: text.to_owned(),
            message: "expected a multiaddr (/ip4/10.0.0.5/tcp/52416), IP:PORT or an IP".to_owned(),
        });
    };
    let ip = match socket.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Ok(Multiaddr::empty()
        .with(ip)
        .with(Protocol::Tcp(socket.port())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn peer_addresses_are_read_in_every_form_a_user_types() {
        let want: Multiaddr = "/ip4/10.0.0.5/tcp/52416".parse().unwrap();
        assert_eq!(parse_peer_address("/ip4/10.0.0.5/tcp/52416").unwrap(), want);
        assert_eq!(parse_peer_address("10.0.0.5:52416").unwrap(), want);
        assert_eq!(parse_peer_address(" 10.0.0.5 ").unwrap(), want);
        assert_eq!(
            parse_peer_address("[::1]:9").unwrap(),
            "/ip6/::1/tcp/9".parse::<Multiaddr>().unwrap()
        );
        let err = parse_peer_address("nowhere").unwrap_err();
        assert!(err.to_string().contains("`nowhere`"), "{err}");
        assert!(parse_peer_address("/ip4/1.2.3").is_err());
    }

    #[test]
    fn the_cluster_key_flag_takes_hex_digits_or_a_passphrase() {
        let mut config = TopologyConfig::in_memory("/nonexistent", 1);
        let hex = "5eed".repeat(16);
        config.apply_flags(Some(&hex), &[], &[], false).unwrap();
        assert_eq!(config.cluster_key.as_ref().unwrap().to_hex(), hex);

        let phrase = "four words typed everywhere";
        config.apply_flags(Some(phrase), &[], &[], false).unwrap();
        let key = config.cluster_key.clone().unwrap();
        assert_eq!(key, ClusterKey::parse(phrase, "elsewhere").unwrap());
        assert_ne!(key.to_hex(), hex);

        let err = config
            .apply_flags(Some("too short"), &[], &[], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cluster-key"), "{err}");
        assert!(err.contains("at least 12 characters"), "{err}");
        config.apply_flags(None, &[], &[], false).unwrap();
        assert_eq!(config.cluster_key, None);
    }
}
