//! The libp2p stack: transport (cluster key, Noise, Yamux) and the composed behaviour.

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, MemoryTransport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PnetOutput, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{PeerId, Swarm, Transport, identify, mdns, noise, ping, tcp, yamux};

use crate::config::{TopologyConfig, TransportKind};
use crate::error::{Error, Result};
use crate::profile::NodeProfile;
use crate::protocol::{
    PROBE_PROTOCOL, PROFILE_PROTOCOL, ProbeCodec, REKEY_PROTOCOL, RekeyReply, RekeyRequest,
};

/// Everything a node speaks, in one behaviour.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Versions, agent (with the instance tag) and listen addresses, on every connection.
    pub(crate) identify: identify::Behaviour,
    /// Round trips, and the liveness that declares a silent node gone.
    pub(crate) ping: ping::Behaviour,
    /// Local-network discovery; off for the memory transport.
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    /// The profile exchange.
    pub(crate) profile: request_response::json::Behaviour<NodeProfile, NodeProfile>,
    /// The bandwidth probe.
    pub(crate) probe: request_response::Behaviour<ProbeCodec>,
    /// Cluster key rotations.
    pub(crate) rekey: request_response::json::Behaviour<RekeyRequest, RekeyReply>,
}

/// How long a connection may take from the first packet to a finished Yamux handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What each end sends first through the private-network layer. Decrypted with the same key it
/// reads back as itself; with another key, as noise.
const KEY_CHECK: &[u8; 16] = b"exo cluster key\n";

/// The peer's bytes did not decrypt to [`KEY_CHECK`]: it encrypts with another cluster key.
#[derive(Debug, thiserror::Error)]
#[error("the peer uses another cluster key")]
pub(crate) struct KeyMismatch;

/// Wraps a fresh connection in the cluster key, then checks that the peer has the same key.
///
/// Without the check, two ends with different keys each read the other's bytes as garbage
/// somewhere inside protocol negotiation, which may then wait for a length it read from noise
/// until the handshake times out, and the failure looks like any other. Both ends write the
/// check before reading, so it costs half a round trip and cannot deadlock.
async fn private_handshake<S>(socket: S, psk: PreSharedKey) -> io::Result<PnetOutput<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut stream = PnetConfig::new(psk)
        .handshake(socket)
        .await
        .map_err(io::Error::other)?;
    stream.write_all(KEY_CHECK).await?;
    stream.flush().await?;
    let mut answer = [0u8; KEY_CHECK.len()];
    stream.read_exact(&mut answer).await?;
    if &answer != KEY_CHECK {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, KeyMismatch));
    }
    Ok(stream)
}

/// Builds the swarm. Every connection is, from the bottom: TCP (or memory), the private-network
/// layer keyed by the cluster key, Noise (authenticating the peer's identity), Yamux.
///
/// Protocol negotiation is not lazy (`V1`, not `V1Lazy`): the dialer waits for the listener to
/// accept each step, so both ends finish the handshake and both can report what they found
/// (two nodes with one identity, in particular) instead of one end seeing a broken pipe.
///
/// QUIC is deliberately absent: it encrypts with its own TLS handshake below anything we could
/// wrap, so the cluster key could not keep other nodes out of a QUIC connection.
pub(crate) fn build_swarm(
    keypair: &Keypair,
    psk: PreSharedKey,
    config: &TopologyConfig,
    agent_version: String,
) -> Result<Swarm<Behaviour>> {
    let noise = noise::Config::new(keypair).map_err(|e| Error::Network(e.to_string()))?;
    let transport: Boxed<(PeerId, StreamMuxerBox)> = match config.transport {
        TransportKind::Tcp => tcp::tokio::Transport::new(tcp::Config::new().nodelay(true))
            .and_then(move |socket, _| private_handshake(socket, psk))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
        TransportKind::Memory => MemoryTransport::default()
            .and_then(move |socket, _| private_handshake(socket, psk))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
    };
    let peer_id = keypair.public().to_peer_id();

    let identify = identify::Behaviour::new(
        identify::Config::new(config.protocol_version.clone(), keypair.public())
            .with_agent_version(agent_version)
            .with_push_listen_addr_updates(true),
    );
    let ping = ping::Behaviour::new(
        ping::Config::new()
            .with_interval(config.ping_interval)
            .with_timeout(config.liveness_timeout),
    );
    let mdns = if config.mdns {
        // Ask again every minute (not five) so a node that missed the first exchange finds
        // the others soon; records live three query intervals.
        let mdns_config = mdns::Config {
            query_interval: Duration::from_secs(60),
            ttl: Duration::from_secs(180),
            ..mdns::Config::default()
        };
        Some(
            mdns::tokio::Behaviour::new(mdns_config, peer_id)
                .map_err(|e| Error::Network(format!("mdns: {e}")))?,
        )
    } else {
        None
    };
    let profile = request_response::json::Behaviour::new(
        [(PROFILE_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
    );
    let probe = request_response::Behaviour::with_codec(
        ProbeCodec,
        [(PROBE_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
    );
    let rekey = request_response::json::Behaviour::new(
        [(REKEY_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
    );
    let behaviour = Behaviour {
        identify,
        ping,
        mdns: Toggle::from(mdns),
        profile,
        probe,
        rekey,
    };
    // Connections stay open while both nodes live: membership is the connection, and liveness
    // is judged by pings, not by idleness.
    let swarm_config = libp2p::swarm::Config::with_tokio_executor()
        .with_idle_connection_timeout(Duration::from_secs(u64::MAX));
    Ok(Swarm::new(transport, behaviour, peer_id, swarm_config))
}
