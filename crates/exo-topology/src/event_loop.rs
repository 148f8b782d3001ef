//! The event loop: the one owner of the swarm. It turns libp2p events into membership (who is
//! in the cluster), measurements (round trips, bandwidth) and diagnostics (who was seen but
//! could not join, and why), and answers the client's commands.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::core::transport::TransportError;
use libp2p::multiaddr::Protocol;
use libp2p::request_response;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionError, ConnectionId, DialError, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns, ping};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::TopologyConfig;
use crate::diagnose::{classify_dial, classify_io, failed_address, leave_reason};
use crate::error::{Error, Result};
use crate::event::{
    Discovery, LeaveReason, PeerDiagnostic, PeerInfo, Problem, TopologyEvent, TopologySnapshot,
};
use crate::host::read_memory;
use crate::identity::{ClusterKey, ClusterKeyInfo};
use crate::network::{Behaviour, BehaviourEvent};
use crate::profile::{LinkMeasurement, NodeId, NodeProfile};
use crate::protocol::{RekeyReply, RekeyRequest, compatible};
use crate::rotation::{Rotation, RotationAck};

use probe::{FIRST_PROBE_BYTES, ProbeSlot};

mod probe;

/// A change to the local profile, applied by the event loop.
pub(crate) type ProfileEdit = Box<dyn FnOnce(&mut NodeProfile) + Send>;

/// What a client can ask of the event loop.
pub(crate) enum Command {
    Snapshot(oneshot::Sender<TopologySnapshot>),
    Subscribe(oneshot::Sender<(TopologySnapshot, broadcast::Receiver<TopologyEvent>)>),
    AddPeer(Multiaddr, oneshot::Sender<Result<()>>),
    UpdateProfile(ProfileEdit, oneshot::Sender<NodeProfile>),
    Rotate(ClusterKey, Vec<NodeId>, oneshot::Sender<Vec<RotationAck>>),
    Shutdown(oneshot::Sender<()>),
}

/// A rotation this node is handing on, waiting for the answers.
struct Rotating {
    key: ClusterKey,
    waiting: HashMap<request_response::OutboundRequestId, NodeId>,
    acks: Vec<RotationAck>,
    then: AfterRotation,
}

/// What a rotation does once every node has answered.
enum AfterRotation {
    /// This node started it: answer the caller.
    Reply(oneshot::Sender<Vec<RotationAck>>),
    /// Another member sent it: announce it to this node's owner.
    Announce(Rotation),
}

/// How often the loop checks liveness, schedules probes and redials.
const TICK: Duration = Duration::from_millis(100);
/// The first redial after a failure or a departure; doubled after each failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long the node with the smaller id waits for the other to dial after both heard each
/// other by mDNS.
const MDNS_DEFER: Duration = Duration::from_millis(500);
/// The longest wait between redials.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a peer with an incompatible version is left alone before it is tried again.
const INCOMPATIBLE_PAUSE: Duration = Duration::from_secs(60);
/// How often available memory is read again (and announced if it moved).
const MEMORY_REFRESH: Duration = Duration::from_secs(10);
/// How long a clean shutdown waits for its connections to close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Weight of a new round-trip sample in the smoothed value.
const RTT_WEIGHT: f64 = 0.2;

/// Owns the swarm and every piece of membership state; see the module documentation.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    listeners: Vec<ListenerId>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<TopologyEvent>,
    config: TopologyConfig,
    local: NodeProfile,
    key_info: ClusterKeyInfo,
    listen_addresses: BTreeSet<Multiaddr>,
    peers: HashMap<PeerId, Peer>,
    statics: Vec<StaticPeer>,
    mdns: HashMap<PeerId, MdnsPeer>,
    diagnostics: BTreeMap<String, Diagnostic>,
    /// Peers refused for an incompatible version, until when.
    incompatible: HashMap<PeerId, Instant>,
    /// (peer, instance) pairs found to be a second node behind a known identity.
    duplicates: HashSet<(PeerId, String)>,
    probe: ProbeSlot,
    last_memory_refresh: Instant,
    shutting_down: bool,
    /// Where a key rotation another member sent is announced.
    rotations: watch::Sender<Option<Rotation>>,
    /// A rotation this node is handing on, until every node has answered.
    rotating: Option<Rotating>,
    /// The key of the last rotation this node started.
    started_rotation: Option<ClusterKey>,
}

/// A peer with at least one open connection. It is a node of the cluster once `joined_at` is
/// set: identified as compatible, and its profile received.
struct Peer {
    connections: BTreeMap<ConnectionId, Connection>,
    via: Discovery,
    identified: bool,
    refused: bool,
    profile: Option<NodeProfile>,
    joined_at: Option<Instant>,
    profile_requested: bool,
    profile_retry_at: Instant,
    /// Since when two live connections have shown different instances.
    conflict_since: Option<Instant>,
    link: LinkMeasurement,
    last_emitted_rtt: Option<f64>,
    next_probe: Instant,
    probe_bytes: u64,
}

/// One open connection to a peer; liveness is judged per connection.
struct Connection {
    remote: Multiaddr,
    last_alive: Instant,
    instance: Option<String>,
}

/// A configured address, dialled whenever nothing is connected through it.
struct StaticPeer {
    address: Multiaddr,
    peer: Option<PeerId>,
    dialing: Option<ConnectionId>,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// A peer announced by mDNS, dialled while it is announced and not connected.
struct MdnsPeer {
    addresses: BTreeSet<Multiaddr>,
    dialing: Option<ConnectionId>,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// What went wrong with a peer that was seen; kept until the peer joins.
struct Diagnostic {
    peer: Option<PeerId>,
    address: Option<String>,
    via: Discovery,
    problem: Option<Problem>,
    attempts: u32,
}

impl Peer {
    fn new(via: Discovery, now: Instant) -> Self {
        Self {
            connections: BTreeMap::new(),
            via,
            identified: false,
            refused: false,
            profile: None,
            joined_at: None,
            profile_requested: false,
            profile_retry_at: now,
            conflict_since: None,
            link: LinkMeasurement::default(),
            last_emitted_rtt: None,
            next_probe: now,
            probe_bytes: FIRST_PROBE_BYTES,
        }
    }

    fn joined(&self) -> bool {
        self.joined_at.is_some()
    }

    fn instances(&self) -> BTreeSet<&str> {
        self.connections
            .values()
            .filter_map(|c| c.instance.as_deref())
            .collect()
    }
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        listeners: Vec<ListenerId>,
        commands: mpsc::Receiver<Command>,
        config: TopologyConfig,
        local: NodeProfile,
        key_info: ClusterKeyInfo,
        rotations: watch::Sender<Option<Rotation>>,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        let now = Instant::now();
        let statics = config
            .static_peers
            .iter()
            .map(|address| StaticPeer {
                address: address.clone(),
                peer: peer_in(address),
                dialing: None,
                next_attempt: Some(now),
                backoff: FIRST_BACKOFF,
            })
            .collect();
        Self {
            swarm,
            listeners,
            commands,
            events,
            config,
            local,
            key_info,
            listen_addresses: BTreeSet::new(),
            peers: HashMap::new(),
            statics,
            mdns: HashMap::new(),
            diagnostics: BTreeMap::new(),
            incompatible: HashMap::new(),
            duplicates: HashSet::new(),
            probe: ProbeSlot::Free,
            last_memory_refresh: now,
            shutting_down: false,
            rotations,
            rotating: None,
            started_rotation: None,
        }
    }

    /// Runs until a shutdown command or until every client is gone; then closes every
    /// connection so that the other nodes see this one leave at once.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.redial(Instant::now());
        let mut reply = None;
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        reply = Some(done);
                        break;
                    }
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(Instant::now()),
            }
        }
        self.close_all().await;
        // Listeners and sockets go with the swarm: release them before saying we are done,
        // so that a node started right after can take the same address.
        drop(self);
        if let Some(done) = reply {
            let _ = done.send(());
        }
    }

    async fn close_all(&mut self) {
        self.shutting_down = true;
        // The memory transport keeps a port taken until its listener is removed.
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        while self.swarm.network_info().num_peers() > 0 {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.on_swarm_event(event),
                Err(_) => break,
            }
        }
        tracing::debug!("topology event loop stopped");
    }

    fn emit(&self, event: TopologyEvent) {
        // No subscriber is fine: events are also reflected in snapshots.
        let _ = self.events.send(event);
    }

    // ----- commands -----

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Subscribe(reply) => {
                let _ = reply.send((self.snapshot(), self.events.subscribe()));
            }
            Command::AddPeer(address, reply) => {
                let now = Instant::now();
                self.statics.push(StaticPeer {
                    peer: peer_in(&address),
                    address,
                    dialing: None,
                    next_attempt: Some(now),
                    backoff: FIRST_BACKOFF,
                });
                self.redial(now);
                let result = match self.statics.last() {
                    Some(s) if s.dialing.is_none() && s.next_attempt.is_some() => {
                        let address = s.address.to_string();
                        let message = self
                            .diagnostics
                            .get(&static_key(&s.address))
                            .and_then(|d| d.problem.as_ref())
                            .map_or_else(|| "dial refused".to_owned(), ToString::to_string);
                        Err(Error::Dial { address, message })
                    }
                    _ => Ok(()),
                };
                let _ = reply.send(result);
            }
            Command::UpdateProfile(edit, reply) => {
                let mut profile = self.local.clone();
                edit(&mut profile);
                // What identifies this node and its release is not the caller's to change.
                profile.id = self.local.id.clone();
                profile.instance = self.local.instance.clone();
                profile.protocol_version = self.local.protocol_version.clone();
                profile.software_version = self.local.software_version.clone();
                if profile != self.local {
                    self.local = profile;
                    self.push_profile();
                }
                let _ = reply.send(self.local.clone());
            }
            Command::Rotate(key, except, reply) => self.rotate(key, &except, reply),
            Command::Shutdown(_) => {}
        }
    }

    // ----- key rotation -----

    /// Sends `request` to every node of the cluster but those in `skip`; the ids of the
    /// requests, by node.
    fn send_rotation(
        &mut self,
        request: &RekeyRequest,
        skip: &[NodeId],
    ) -> HashMap<request_response::OutboundRequestId, NodeId> {
        let members: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(peer, p)| p.joined() && !skip.contains(&NodeId::from(**peer)))
            .map(|(peer, _)| *peer)
            .collect();
        members
            .into_iter()
            .map(|peer| {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rekey
                    .send_request(&peer, request.clone());
                (id, NodeId::from(peer))
            })
            .collect()
    }

    /// Hands `key` to every node of the cluster but `except`; answers `reply` once each has
    /// answered or failed to (the request times out after 10 s).
    fn rotate(
        &mut self,
        key: ClusterKey,
        except: &[NodeId],
        reply: oneshot::Sender<Vec<RotationAck>>,
    ) {
        if self.rotating.is_some() {
            let _ = reply.send(vec![RotationAck {
                node: self.local.id.clone(),
                outcome: Err("a rotation is already under way".to_owned()),
            }]);
            return;
        }
        let request = RekeyRequest {
            key: key.to_hex(),
            revoked: except.to_vec(),
        };
        let waiting = self.send_rotation(&request, except);
        tracing::info!(
            nodes = waiting.len(),
            revoked = except.len(),
            "handing on a new cluster key"
        );
        self.started_rotation = Some(key.clone());
        self.rotating = Some(Rotating {
            key,
            waiting,
            acks: Vec::new(),
            then: AfterRotation::Reply(reply),
        });
        self.finish_rotation();
    }

    /// Once nothing is left waiting: answers the caller of a rotation this node started, or
    /// announces the one it took (after handing it on).
    fn finish_rotation(&mut self) {
        if !self.rotating.as_ref().is_some_and(|r| r.waiting.is_empty()) {
            return;
        }
        let Some(done) = self.rotating.take() else {
            return;
        };
        match done.then {
            AfterRotation::Reply(reply) => {
                let _ = reply.send(done.acks);
            }
            AfterRotation::Announce(rotation) => {
                let handed = done.acks.iter().filter(|a| a.outcome.is_ok()).count();
                tracing::info!(handed, "handed the new cluster key on; announcing it");
                self.rotations.send_replace(Some(rotation));
            }
        }
    }

    fn on_rekey_event(&mut self, event: request_response::Event<RekeyRequest, RekeyReply>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let reply = self.take_rotation(peer, &request);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rekey
                        .send_response(channel, reply);
                    self.finish_rotation();
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let outcome = if response.accepted {
                        Ok(())
                    } else {
                        Err(response.message)
                    };
                    self.rotation_answered(request_id, outcome);
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => self.rotation_answered(request_id, Err(error.to_string())),
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "answering a key rotation failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn rotation_answered(
        &mut self,
        request: request_response::OutboundRequestId,
        outcome: Result<(), String>,
    ) {
        if let Some(rotating) = self.rotating.as_mut()
            && let Some(node) = rotating.waiting.remove(&request)
        {
            rotating.acks.push(RotationAck { node, outcome });
        }
        self.finish_rotation();
    }

    /// A member's new key: taken unless it is malformed or names this node as revoked. Only
    /// a node of the cluster can send one: the connection needs the current key. Before it is
    /// announced, it is handed on to the nodes the sender may not reach (every member but the
    /// sender and the revoked; one that has it already just says yes), so that a rotation
    /// started anywhere reaches the whole cluster.
    fn take_rotation(&mut self, peer: PeerId, request: &RekeyRequest) -> RekeyReply {
        let refuse = |message: String| {
            tracing::warn!(%peer, "refused a cluster key rotation: {message}");
            RekeyReply {
                accepted: false,
                message,
            }
        };
        let accepted = RekeyReply {
            accepted: true,
            message: String::new(),
        };
        if !self.peers.get(&peer).is_some_and(Peer::joined) {
            return refuse("the sender is not a node of the cluster yet".to_owned());
        }
        if request.revoked.contains(&self.local.id) {
            return refuse("it revokes this node".to_owned());
        }
        let key = match ClusterKey::parse(&request.key, "a key rotation") {
            Ok(key) => key,
            Err(e) => return refuse(e.to_string()),
        };
        // A copy handed on by another member, or this node's own rotation coming back.
        let known = self.rotating.as_ref().is_some_and(|r| r.key == key)
            || self.started_rotation.as_ref() == Some(&key)
            || self
                .rotations
                .borrow()
                .as_ref()
                .is_some_and(|r| r.key == key);
        if known {
            return accepted;
        }
        if self.rotating.is_some() {
            return refuse("another rotation is under way".to_owned());
        }
        tracing::warn!(
            by = %peer, fingerprint = %key.fingerprint(), revoked = request.revoked.len(),
            "a member rotated the cluster key"
        );
        let mut skip = request.revoked.clone();
        skip.push(NodeId::from(peer));
        let waiting = self.send_rotation(request, &skip);
        self.rotating = Some(Rotating {
            key: key.clone(),
            waiting,
            acks: Vec::new(),
            then: AfterRotation::Announce(Rotation {
                key,
                by: NodeId::from(peer),
                revoked: request.revoked.clone(),
            }),
        });
        accepted
    }

    fn snapshot(&self) -> TopologySnapshot {
        let now = Instant::now();
        let mut nodes: Vec<PeerInfo> = self
            .peers
            .values()
            .filter_map(|p| {
                let joined_at = p.joined_at?;
                Some(PeerInfo {
                    profile: p.profile.clone()?,
                    addresses: p
                        .connections
                        .values()
                        .map(|c| c.remote.to_string())
                        .collect(),
                    via: p.via,
                    link: p.link,
                    joined_s_ago: now.duration_since(joined_at).as_secs_f64(),
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.profile.id.cmp(&b.profile.id));

        let mut diagnostics: Vec<PeerDiagnostic> =
            self.diagnostics.values().map(Diagnostic::public).collect();
        // Peers seen by mDNS or configured, with no connection and no failure yet.
        for (peer, seen) in &self.mdns {
            if !self.peers.contains_key(peer) && !self.diagnostics.contains_key(&peer_key(peer)) {
                diagnostics.push(PeerDiagnostic {
                    id: Some(NodeId::from(*peer)),
                    address: seen.addresses.first().map(ToString::to_string),
                    via: Discovery::Mdns,
                    problem: None,
                    attempts: 0,
                });
            }
        }
        for s in &self.statics {
            let connected = s.peer.is_some_and(|p| self.peers.contains_key(&p));
            if !connected && !self.diagnostics.contains_key(&static_key(&s.address)) {
                diagnostics.push(PeerDiagnostic {
                    id: s.peer.map(NodeId::from),
                    address: Some(s.address.to_string()),
                    via: Discovery::Static,
                    problem: None,
                    attempts: 0,
                });
            }
        }
        TopologySnapshot {
            local: self.local.clone(),
            listen_addresses: self
                .listen_addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            cluster_key: self.key_info.clone(),
            nodes,
            diagnostics,
        }
    }

    fn push_profile(&mut self) {
        let joined: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.joined())
            .map(|(id, _)| *id)
            .collect();
        for peer in joined {
            self.swarm
                .behaviour_mut()
                .profile
                .send_request(&peer, self.local.clone());
        }
    }

    // ----- swarm events -----

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addresses.insert(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addresses.remove(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => self.on_closed(peer_id, connection_id, cause.as_ref()),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self.on_dial_error(connection_id, peer_id, &error),
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => self.on_incoming_error(&send_back_addr, peer_id, &error),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => self.on_identify(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(event)) => self.on_ping(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => self.on_mdns(event),
            SwarmEvent::Behaviour(BehaviourEvent::Profile(event)) => self.on_profile_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Probe(event)) => self.on_probe_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Rekey(event)) => self.on_rekey_event(event),
            _ => {}
        }
    }

    fn on_connected(&mut self, peer: PeerId, connection: ConnectionId, endpoint: &ConnectedPoint) {
        let now = Instant::now();
        let mut via = if endpoint.is_dialer() {
            Discovery::Dialed
        } else {
            Discovery::Inbound
        };
        for s in &mut self.statics {
            if s.dialing == Some(connection) {
                s.dialing = None;
                s.peer = Some(peer);
                s.next_attempt = None;
                via = Discovery::Static;
            }
        }
        if let Some(m) = self.mdns.get_mut(&peer) {
            // Found by mDNS, whichever side happened to connect first.
            if via != Discovery::Static {
                via = Discovery::Mdns;
            }
            if m.dialing == Some(connection) {
                m.dialing = None;
            }
            m.next_attempt = None;
        }
        let remote = endpoint.get_remote_address().clone();
        tracing::debug!(%peer, %remote, ?via, "connection established");
        let entry = self
            .peers
            .entry(peer)
            .or_insert_with(|| Peer::new(via, now));
        if matches!(entry.via, Discovery::Inbound | Discovery::Dialed) {
            entry.via = via;
        }
        entry.connections.insert(
            connection,
            Connection {
                remote,
                last_alive: now,
                instance: None,
            },
        );
    }

    fn on_closed(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        cause: Option<&ConnectionError>,
    ) {
        tracing::debug!(%peer, ?cause, "connection closed");
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.connections.remove(&connection).is_none() || !p.connections.is_empty() {
            return;
        }
        let reason = if self.shutting_down || p.refused {
            LeaveReason::Disconnected
        } else {
            leave_reason(cause)
        };
        self.peer_gone(peer, reason);
    }

    /// Forgets a peer whose last connection is gone, tells subscribers, and plans a redial.
    fn peer_gone(&mut self, peer: PeerId, reason: LeaveReason) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        if p.joined() {
            tracing::info!(%peer, %reason, "node left");
            self.emit(TopologyEvent::NodeLeft {
                id: NodeId::from(peer),
                reason,
            });
        }
        if self.probing_with(peer) {
            self.probe = ProbeSlot::Free;
        }
        if self.shutting_down {
            return;
        }
        let now = Instant::now();
        for s in &mut self.statics {
            if s.peer == Some(peer) && s.dialing.is_none() {
                s.next_attempt = Some(now + jitter(s.backoff));
            }
        }
        if let Some(m) = self.mdns.get_mut(&peer)
            && m.dialing.is_none()
        {
            m.next_attempt = Some(now + jitter(m.backoff));
        }
    }

    fn on_dial_error(&mut self, connection: ConnectionId, peer: Option<PeerId>, error: &DialError) {
        if matches!(
            error,
            DialError::DialPeerConditionFalse(_) | DialError::Aborted
        ) {
            self.clear_dialing(connection);
            return;
        }
        let problem = classify_dial(error);
        tracing::debug!(?peer, %error, "dial failed");
        let now = Instant::now();
        let mut origin = None;
        for s in &mut self.statics {
            if s.dialing == Some(connection) {
                s.dialing = None;
                s.next_attempt = Some(now + jitter(s.backoff));
                s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                origin = Some((
                    static_key(&s.address),
                    s.peer,
                    Some(s.address.to_string()),
                    Discovery::Static,
                ));
            }
        }
        if origin.is_none()
            && let Some(peer) = peer
            && let Some(m) = self.mdns.get_mut(&peer)
            && m.dialing == Some(connection)
        {
            m.dialing = None;
            m.next_attempt = Some(now + jitter(m.backoff));
            m.backoff = (m.backoff * 2).min(MAX_BACKOFF);
            let address = failed_address(error).or_else(|| m.addresses.first().cloned());
            origin = Some((
                peer_key(&peer),
                Some(peer),
                address.map(|a| a.to_string()),
                Discovery::Mdns,
            ));
        }
        let (key, peer, address, via) = origin.unwrap_or_else(|| {
            let address = failed_address(error).map(|a| a.to_string());
            let key = peer.map_or_else(|| format!("addr {address:?}"), |p| peer_key(&p));
            (key, peer, address, Discovery::Dialed)
        });
        self.record_problem(key, peer, address, via, problem);
    }

    fn clear_dialing(&mut self, connection: ConnectionId) {
        let now = Instant::now();
        for s in &mut self.statics {
            if s.dialing == Some(connection) {
                s.dialing = None;
                s.next_attempt = Some(now + jitter(s.backoff));
            }
        }
        for m in self.mdns.values_mut() {
            if m.dialing == Some(connection) {
                m.dialing = None;
            }
        }
    }

    fn on_incoming_error(&mut self, from: &Multiaddr, peer: Option<PeerId>, error: &ListenError) {
        let problem = match error {
            ListenError::Transport(TransportError::Other(e)) => classify_io(e),
            ListenError::Transport(TransportError::MultiaddrNotSupported(_)) => return,
            ListenError::LocalPeerId { address } => Problem::DuplicateIdentity {
                detail: format!("a node at {address} presents this node's own identity"),
            },
            ListenError::WrongPeerId { obtained, .. } => Problem::WrongPeer {
                obtained: NodeId::from(*obtained),
            },
            ListenError::Aborted | ListenError::Denied { .. } => return,
        };
        tracing::debug!(%from, %error, "incoming connection failed");
        // A handshake that fails tells nothing about who called: match the caller's IP with
        // peers seen by mDNS to name it.
        let ip = ip_of(from);
        let seen = peer.or_else(|| {
            self.mdns
                .iter()
                .find(|(_, m)| m.addresses.iter().any(|a| ip.is_some() && ip_of(a) == ip))
                .map(|(p, _)| *p)
        });
        let host = ip.map_or_else(|| from.to_string(), |ip| ip.to_string());
        let (key, via) = match seen {
            Some(p) if self.mdns.contains_key(&p) => (peer_key(&p), Discovery::Mdns),
            Some(p) => (peer_key(&p), Discovery::Inbound),
            None => (format!("incoming {host}"), Discovery::Inbound),
        };
        let address = match seen.and_then(|p| self.mdns.get(&p)) {
            Some(m) => m.addresses.first().map(ToString::to_string),
            None => Some(format!("{host} (incoming)")),
        };
        self.record_problem(key, seen, address, via, problem);
    }

    /// Records (or updates) what is wrong with a peer; tells subscribers and the log when the
    /// kind of problem is new.
    fn record_problem(
        &mut self,
        key: String,
        peer: Option<PeerId>,
        address: Option<String>,
        via: Discovery,
        problem: Problem,
    ) {
        let entry = self.diagnostics.entry(key).or_insert(Diagnostic {
            peer,
            address: address.clone(),
            via,
            problem: None,
            attempts: 0,
        });
        entry.attempts += 1;
        if address.is_some() {
            entry.address = address;
        }
        if entry.peer.is_none() {
            entry.peer = peer;
        }
        let new_kind = entry
            .problem
            .as_ref()
            .is_none_or(|old| std::mem::discriminant(old) != std::mem::discriminant(&problem));
        entry.problem = Some(problem);
        if new_kind {
            let diagnostic = entry.public();
            tracing::warn!("{diagnostic}");
            self.emit(TopologyEvent::PeerProblem { diagnostic });
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received {
            connection_id,
            peer_id,
            info,
        } = event
        else {
            return;
        };
        let now = Instant::now();
        if !compatible(&self.config.protocol_version, &info.protocol_version) {
            let address = self
                .peers
                .get(&peer_id)
                .and_then(|p| p.connections.get(&connection_id))
                .map(|c| c.remote.to_string());
            let via = self
                .peers
                .get(&peer_id)
                .map_or(Discovery::Inbound, |p| p.via);
            if let Some(p) = self.peers.get_mut(&peer_id) {
                p.refused = true;
            }
            self.incompatible.insert(peer_id, now + INCOMPATIBLE_PAUSE);
            self.record_problem(
                peer_key(&peer_id),
                Some(peer_id),
                address,
                via,
                Problem::IncompatibleVersion {
                    ours: self.config.protocol_version.clone(),
                    theirs: info.protocol_version,
                },
            );
            let _ = self.swarm.disconnect_peer_id(peer_id);
            return;
        }
        let instance = instance_of(&info.agent_version);
        if let Some(instance) = &instance
            && self.duplicates.contains(&(peer_id, instance.clone()))
        {
            // A known second node behind this identity: already reported.
            let _ = self.swarm.close_connection(connection_id);
            if let Some(p) = self.peers.get_mut(&peer_id) {
                p.connections.remove(&connection_id);
                if p.connections.is_empty() {
                    self.peers.remove(&peer_id);
                }
            }
            return;
        }
        let Some(p) = self.peers.get_mut(&peer_id) else {
            return;
        };
        if let Some(c) = p.connections.get_mut(&connection_id) {
            c.instance = instance;
        }
        p.identified = true;
        if p.instances().len() > 1 && p.conflict_since.is_none() {
            p.conflict_since = Some(now);
        }
        self.request_profile(peer_id, now);
        self.maybe_join(peer_id);
    }

    fn request_profile(&mut self, peer: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.identified && !p.refused && !p.profile_requested && now >= p.profile_retry_at {
            p.profile_requested = true;
            self.swarm
                .behaviour_mut()
                .profile
                .send_request(&peer, self.local.clone());
        }
    }

    fn on_profile_event(&mut self, event: request_response::Event<NodeProfile, NodeProfile>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .profile
                        .send_response(channel, self.local.clone());
                    self.on_profile(peer, request);
                }
                request_response::Message::Response { response, .. } => {
                    self.on_profile(peer, response);
                }
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "profile request failed");
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.profile_requested = false;
                    p.profile_retry_at = Instant::now() + Duration::from_secs(2);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "profile response failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_profile(&mut self, peer: PeerId, profile: NodeProfile) {
        if profile.id != NodeId::from(peer) {
            tracing::warn!(%peer, claimed = %profile.id, "ignoring a profile that names another node");
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.refused {
            return;
        }
        let Some(old) = &p.profile else {
            p.profile = Some(profile);
            self.maybe_join(peer);
            return;
        };
        if old.instance != profile.instance {
            if p.instances().contains(old.instance.as_str()) {
                // Both instances are connected: a duplicate identity, which the conflict
                // check reports. Keep the first.
                return;
            }
            // The old instance is gone and a new one took its place: the node restarted, and
            // whatever it held (a loaded shard) is gone with it.
            if p.joined() {
                p.joined_at = None;
                p.profile = Some(profile);
                tracing::info!(%peer, "node restarted");
                self.emit(TopologyEvent::NodeLeft {
                    id: NodeId::from(peer),
                    reason: LeaveReason::Restarted,
                });
            } else {
                p.profile = Some(profile);
            }
            self.maybe_join(peer);
            return;
        }
        if *old != profile {
            let joined = p.joined();
            p.profile = Some(profile.clone());
            if joined {
                self.emit(TopologyEvent::ProfileUpdated { profile });
            }
        }
    }

    fn maybe_join(&mut self, peer: PeerId) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.joined() || p.refused || !p.identified {
            return;
        }
        let Some(profile) = p.profile.clone() else {
            return;
        };
        p.joined_at = Some(now);
        // The first probe soon, but not all at once when many nodes join together.
        p.next_probe = now + Duration::from_millis(rand::random_range(100..600));
        let address = p
            .connections
            .values()
            .next()
            .map(|c| c.remote.to_string())
            .unwrap_or_default();
        let via = p.via;
        let ips: Vec<_> = p
            .connections
            .values()
            .filter_map(|c| ip_of(&c.remote))
            .collect();
        if let Some(m) = self.mdns.get_mut(&peer) {
            m.backoff = FIRST_BACKOFF;
        }
        let mut cleared = Vec::new();
        for s in &mut self.statics {
            if s.peer == Some(peer) {
                s.backoff = FIRST_BACKOFF;
                cleared.push(static_key(&s.address));
            }
        }
        for key in cleared {
            self.diagnostics.remove(&key);
        }
        // Whatever was wrong with this peer (or its host) is over.
        self.diagnostics.retain(|_, d| {
            matches!(d.problem, Some(Problem::DuplicateIdentity { .. }))
                || (d.peer != Some(peer)
                    && !d
                        .address
                        .as_deref()
                        .and_then(|a| a.split(' ').next())
                        .and_then(|a| {
                            a.parse::<std::net::IpAddr>()
                                .ok()
                                .or_else(|| a.parse::<Multiaddr>().ok().and_then(|m| ip_of(&m)))
                        })
                        .is_some_and(|ip| ips.contains(&ip)))
        });
        tracing::info!(%peer, %address, "node joined");
        self.emit(TopologyEvent::NodeJoined {
            profile,
            address,
            via,
        });
    }

    fn on_ping(&mut self, event: ping::Event) {
        let Ok(rtt) = event.result else {
            // Failures are judged by silence (see `check_liveness`): libp2p's ping keeps quiet
            // about the first one and may wait long on the next.
            return;
        };
        let probing = self.probing_with(event.peer);
        let Some(p) = self.peers.get_mut(&event.peer) else {
            return;
        };
        if let Some(c) = p.connections.get_mut(&event.connection) {
            c.last_alive = Instant::now();
        }
        if probing {
            return;
        }
        let sample = rtt.as_secs_f64();
        let smoothed = p
            .link
            .rtt_s
            .map_or(sample, |old| old + RTT_WEIGHT * (sample - old));
        p.link.rtt_s = Some(smoothed);
        p.link.rtt_samples += 1;
        // Sub-millisecond round trips wobble by more than a fifth all the time: only a move
        // that is also larger than half a millisecond is news.
        let moved = p.last_emitted_rtt.is_none_or(|last| {
            let change = (smoothed - last).abs();
            change > 0.2 * last && change > 5e-4
        });
        if p.joined() && moved {
            p.last_emitted_rtt = Some(smoothed);
            let link = p.link;
            self.emit(TopologyEvent::LinkMeasured {
                id: NodeId::from(event.peer),
                link,
            });
        }
    }

    fn on_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(list) => {
                for (peer, address) in list {
                    // Both ends usually hear each other at once. The one with the larger id
                    // dials; the other gives it a moment, and dials only if nothing came.
                    let first = if *self.swarm.local_peer_id() > peer {
                        Instant::now()
                    } else {
                        Instant::now() + MDNS_DEFER
                    };
                    let entry = self.mdns.entry(peer).or_insert_with(|| MdnsPeer {
                        addresses: BTreeSet::new(),
                        dialing: None,
                        next_attempt: Some(first),
                        backoff: FIRST_BACKOFF,
                    });
                    if entry.addresses.insert(address.clone()) {
                        tracing::debug!(%peer, %address, "discovered by mdns");
                    }
                    // A fresh announcement is worth a prompt attempt.
                    if entry.dialing.is_none() && entry.next_attempt.is_none() {
                        entry.next_attempt = Some(first);
                    }
                }
                self.redial(Instant::now());
            }
            mdns::Event::Expired(list) => {
                for (peer, address) in list {
                    if let Some(m) = self.mdns.get_mut(&peer) {
                        m.addresses.remove(&address);
                        if m.addresses.is_empty() {
                            self.mdns.remove(&peer);
                        }
                    }
                }
            }
        }
    }

    // ----- periodic work -----

    fn on_tick(&mut self, now: Instant) {
        self.check_liveness(now);
        self.check_conflicts(now);
        self.redial(now);
        self.expire_probe(now);
        self.start_probe(now);
        let waiting: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.identified && !p.profile_requested && p.profile.is_none())
            .map(|(id, _)| *id)
            .collect();
        for peer in waiting {
            self.request_profile(peer, now);
        }
        if now.duration_since(self.last_memory_refresh) >= MEMORY_REFRESH {
            self.last_memory_refresh = now;
            self.refresh_memory();
        }
        self.incompatible.retain(|_, until| *until > now);
    }

    /// Closes connections that answered no ping for `liveness_timeout`; a node left with no
    /// connection is gone.
    fn check_liveness(&mut self, now: Instant) {
        let timeout = self.config.liveness_timeout;
        let mut stale = Vec::new();
        for (peer, p) in &self.peers {
            for (id, c) in &p.connections {
                let silent = now.duration_since(c.last_alive);
                if silent > timeout {
                    stale.push((*peer, *id, silent));
                }
            }
        }
        for (peer, connection, silent) in stale {
            tracing::debug!(%peer, ?silent, "connection silent, closing it");
            let _ = self.swarm.close_connection(connection);
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            p.connections.remove(&connection);
            if p.connections.is_empty() {
                self.peer_gone(
                    peer,
                    LeaveReason::Unresponsive {
                        silent_s: silent.as_secs_f64(),
                    },
                );
            }
        }
    }

    /// Two live connections under one identity with different instances, for longer than a
    /// dead connection could last, are two nodes sharing an identity.
    fn check_conflicts(&mut self, now: Instant) {
        let settle = self.config.liveness_timeout + Duration::from_millis(500);
        let mut found = Vec::new();
        for (peer, p) in &mut self.peers {
            let Some(since) = p.conflict_since else {
                continue;
            };
            let instances: Vec<String> = p.instances().into_iter().map(str::to_owned).collect();
            if instances.len() < 2 {
                p.conflict_since = None;
                continue;
            }
            if now.duration_since(since) < settle {
                continue;
            }
            p.conflict_since = None;
            let keep = p
                .profile
                .as_ref()
                .map(|pr| pr.instance.clone())
                .or_else(|| instances.first().cloned());
            let addresses: Vec<String> = p
                .connections
                .values()
                .map(|c| c.remote.to_string())
                .collect();
            let others: Vec<(ConnectionId, String)> = p
                .connections
                .iter()
                .filter(|(_, c)| c.instance.is_some() && c.instance != keep)
                .filter_map(|(id, c)| Some((*id, c.instance.clone()?)))
                .collect();
            found.push((*peer, addresses, others));
        }
        for (peer, addresses, others) in found {
            for (connection, instance) in &others {
                self.duplicates.insert((peer, instance.clone()));
                let _ = self.swarm.close_connection(*connection);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.connections.remove(connection);
                }
            }
            let via = self.peers.get(&peer).map_or(Discovery::Inbound, |p| p.via);
            self.record_problem(
                format!("duplicate {peer}"),
                Some(peer),
                addresses.first().cloned(),
                via,
                Problem::DuplicateIdentity {
                    detail: format!(
                        "two nodes present the identity {peer}, seen at {}",
                        addresses.join(" and ")
                    ),
                },
            );
        }
    }

    /// Dials static peers and mDNS peers that are due.
    ///
    /// Always from a new local port: libp2p's default reuses the listening port, and two nodes
    /// that dial each other at the same moment then make one TCP connection by simultaneous
    /// open, on which both ends negotiate as the dialer and fail.
    fn redial(&mut self, now: Instant) {
        let connected: HashSet<PeerId> = self.peers.keys().copied().collect();
        for i in 0..self.statics.len() {
            let s = &mut self.statics[i];
            if s.dialing.is_some() || s.next_attempt.is_none_or(|at| at > now) {
                continue;
            }
            if s.peer.is_some_and(|p| connected.contains(&p)) {
                s.next_attempt = None;
                continue;
            }
            let opts = DialOpts::unknown_peer_id()
                .address(s.address.clone())
                .allocate_new_port()
                .build();
            let connection = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    let s = &mut self.statics[i];
                    s.dialing = Some(connection);
                    s.next_attempt = None;
                }
                Err(error) => {
                    let problem = classify_dial(&error);
                    let s = &mut self.statics[i];
                    s.next_attempt = Some(now + jitter(s.backoff));
                    s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                    let (key, peer, address) =
                        (static_key(&s.address), s.peer, s.address.to_string());
                    self.record_problem(key, peer, Some(address), Discovery::Static, problem);
                }
            }
        }
        let due: Vec<PeerId> = self
            .mdns
            .iter()
            .filter(|(peer, m)| {
                m.dialing.is_none()
                    && m.next_attempt.is_some_and(|at| at <= now)
                    && !connected.contains(peer)
                    && !self.incompatible.contains_key(peer)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            let Some(m) = self.mdns.get_mut(&peer) else {
                continue;
            };
            m.next_attempt = None;
            let opts = DialOpts::peer_id(peer)
                .addresses(m.addresses.iter().cloned().collect())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .allocate_new_port()
                .build();
            let connection = opts.connection_id();
            let dialed = self.swarm.dial(opts).is_ok();
            if let Some(m) = self.mdns.get_mut(&peer) {
                if dialed {
                    m.dialing = Some(connection);
                } else {
                    // Already being dialled by someone else: look again later.
                    m.next_attempt = Some(now + jitter(m.backoff));
                }
            }
        }
    }

    fn refresh_memory(&mut self) {
        let memory = read_memory(self.config.memory_limit);
        let old = self.local.memory;
        let moved = match (old.available_bytes, memory.available_bytes) {
            (Some(a), Some(b)) => {
                let threshold = (old.total_bytes.unwrap_or(0) / 50).max(64 << 20);
                a.abs_diff(b) > threshold
            }
            (a, b) => a != b,
        };
        if moved || old.total_bytes != memory.total_bytes {
            self.local.memory = memory;
            self.push_profile();
        }
    }
}

impl Diagnostic {
    fn public(&self) -> PeerDiagnostic {
        PeerDiagnostic {
            id: self.peer.map(NodeId::from),
            address: self.address.clone(),
            via: self.via,
            problem: self.problem.clone(),
            attempts: self.attempts,
        }
    }
}

fn peer_key(peer: &PeerId) -> String {
    format!("peer {peer}")
}

fn static_key(address: &Multiaddr) -> String {
    format!("static {address}")
}

/// The peer id at the end of an address (`.../p2p/<id>`), if any.
fn peer_in(address: &Multiaddr) -> Option<PeerId> {
    address.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn ip_of(address: &Multiaddr) -> Option<std::net::IpAddr> {
    address.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// The instance tag identify's agent version carries: `exo-rs/0.1.0 (3f9a...)`.
pub(crate) fn instance_of(agent_version: &str) -> Option<String> {
    let (_, rest) = agent_version.rsplit_once('(')?;
    rest.strip_suffix(')').map(str::to_owned)
}

/// Spreads periodic work by ±10 % so that nodes started together do not act together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn the_instance_tag_is_read_from_the_agent_version() {
        assert_eq!(
            instance_of("exo-rs/0.1.0 (3f9a01)").as_deref(),
            Some("3f9a01")
        );
        assert_eq!(instance_of("rust-libp2p/0.47"), None);
    }
}
