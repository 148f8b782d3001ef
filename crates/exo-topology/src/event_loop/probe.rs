//! Bandwidth probes, driven by the event loop.
//!
//! Each node has one probe slot, used either to send a probe or to receive one, never both: a
//! probe then has both ends' links to itself, so it is not slowed by another probe, nor by the
//! acknowledgements of a transfer going the other way. A sender asks first; a receiver whose
//! slot is taken answers `Busy` at once (nobody waits on anybody, so there is no deadlock) and
//! the sender tries again a moment later.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId};

use super::{EventLoop, jitter};
use crate::event::TopologyEvent;
use crate::profile::NodeId;
use crate::protocol::{ProbeRequest, ProbeResponse};

/// The smallest probe.
const MIN_PROBE_BYTES: u64 = 256 << 10;
/// The first probe on a link, before its bandwidth is known.
pub(super) const FIRST_PROBE_BYTES: u64 = 1 << 20;
/// How long a receiver keeps its slot for a sender that was told `Go` but sent nothing, and
/// how long a sender waits for its transfer to be measured.
const PROBE_TURN: Duration = Duration::from_secs(30);
/// After `Busy`, try again after a random pause in this range (milliseconds).
const RETRY_MS: std::ops::Range<u64> = 200..1000;

/// What this node's probe slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeSlot {
    Free,
    /// Asked `peer` for its slot.
    Asking {
        peer: PeerId,
        request: OutboundRequestId,
        until: Instant,
    },
    /// Sending the payload to `peer`.
    Sending {
        peer: PeerId,
        request: OutboundRequestId,
        until: Instant,
    },
    /// Told `peer` to send; waiting for its payload.
    Receiving {
        peer: PeerId,
        until: Instant,
    },
}

impl ProbeSlot {
    fn peer(&self) -> Option<PeerId> {
        match *self {
            ProbeSlot::Free => None,
            ProbeSlot::Asking { peer, .. }
            | ProbeSlot::Sending { peer, .. }
            | ProbeSlot::Receiving { peer, .. } => Some(peer),
        }
    }

    fn until(&self) -> Option<Instant> {
        match *self {
            ProbeSlot::Free => None,
            ProbeSlot::Asking { until, .. }
            | ProbeSlot::Sending { until, .. }
            | ProbeSlot::Receiving { until, .. } => Some(until),
        }
    }
}

impl EventLoop {
    /// Whether a probe with `peer` is under way (its round trips are then left out).
    pub(super) fn probing_with(&self, peer: PeerId) -> bool {
        self.probe.peer() == Some(peer)
    }

    /// Frees a slot held past its time (a peer that went quiet mid-probe).
    pub(super) fn expire_probe(&mut self, now: Instant) {
        if self.probe.until().is_some_and(|until| until <= now) {
            tracing::debug!(slot = ?self.probe, "bandwidth probe abandoned");
            self.probe = ProbeSlot::Free;
        }
    }

    /// Asks the peer whose probe is most overdue, if the slot is free.
    pub(super) fn start_probe(&mut self, now: Instant) {
        if self.probe != ProbeSlot::Free {
            return;
        }
        let Some(peer) = self
            .peers
            .iter()
            .filter(|(_, p)| p.joined() && p.next_probe <= now)
            .min_by_key(|(_, p)| p.next_probe)
            .map(|(id, _)| *id)
        else {
            return;
        };
        let request = self
            .swarm
            .behaviour_mut()
            .probe
            .send_request(&peer, ProbeRequest::Ask);
        self.probe = ProbeSlot::Asking {
            peer,
            request,
            until: now + PROBE_TURN,
        };
    }

    pub(super) fn on_probe_event(
        &mut self,
        event: request_response::Event<ProbeRequest, ProbeResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let response = match request {
                        ProbeRequest::Ask if self.probe == ProbeSlot::Free => {
                            self.probe = ProbeSlot::Receiving {
                                peer,
                                until: Instant::now() + PROBE_TURN,
                            };
                            ProbeResponse::Go
                        }
                        ProbeRequest::Ask => ProbeResponse::Busy,
                        ProbeRequest::Data { bytes, elapsed } => {
                            if matches!(self.probe, ProbeSlot::Receiving { peer: p, .. } if p == peer)
                            {
                                self.probe = ProbeSlot::Free;
                            }
                            let micros = elapsed.map_or(0, |e| e.as_micros() as u64);
                            ProbeResponse::Measured { bytes, micros }
                        }
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .probe
                        .send_response(channel, response);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_probe_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let ours = matches!(self.probe,
                    ProbeSlot::Asking { request, .. } | ProbeSlot::Sending { request, .. }
                        if request == request_id);
                if ours {
                    tracing::debug!(%peer, %error, "bandwidth probe failed");
                    self.probe = ProbeSlot::Free;
                    let interval = self.config.probe_interval;
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.next_probe = Instant::now() + jitter(interval);
                    }
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound bandwidth probe failed");
                if matches!(self.probe, ProbeSlot::Receiving { peer: p, .. } if p == peer) {
                    self.probe = ProbeSlot::Free;
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_probe_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: ProbeResponse,
    ) {
        let now = Instant::now();
        match (self.probe, response) {
            (ProbeSlot::Asking { request, .. }, ProbeResponse::Go) if request == request_id => {
                let bytes = self
                    .peers
                    .get(&peer)
                    .map_or(FIRST_PROBE_BYTES, |p| p.probe_bytes);
                let request = self.swarm.behaviour_mut().probe.send_request(
                    &peer,
                    ProbeRequest::Data {
                        bytes,
                        elapsed: None,
                    },
                );
                self.probe = ProbeSlot::Sending {
                    peer,
                    request,
                    until: now + PROBE_TURN,
                };
            }
            (ProbeSlot::Asking { request, .. }, ProbeResponse::Busy) if request == request_id => {
                self.probe = ProbeSlot::Free;
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.next_probe = now + Duration::from_millis(rand::random_range(RETRY_MS));
                }
            }
            (ProbeSlot::Sending { request, .. }, ProbeResponse::Measured { bytes, micros })
                if request == request_id =>
            {
                self.probe = ProbeSlot::Free;
                self.record_bandwidth(peer, bytes, micros, now);
            }
            _ => {}
        }
    }

    fn record_bandwidth(&mut self, peer: PeerId, bytes: u64, micros: u64, now: Instant) {
        let (target, max, interval) = (
            self.config.probe_target,
            self.config.probe_max_bytes,
            self.config.probe_interval,
        );
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let rate = bytes as f64 / (micros.max(1) as f64 * 1e-6);
        p.link.bandwidth_bytes_per_s = Some(rate);
        p.link.bandwidth_probes += 1;
        // Size the next probe to last about `probe_target` on this link.
        let next = (rate * target.as_secs_f64()) as u64;
        p.probe_bytes = next.clamp(MIN_PROBE_BYTES, max.max(MIN_PROBE_BYTES));
        p.next_probe = now + jitter(interval);
        tracing::debug!(%peer, bytes, micros, rate, "bandwidth measured");
        let link = p.link;
        self.emit(TopologyEvent::LinkMeasured {
            id: NodeId::from(peer),
            link,
        });
    }
}
