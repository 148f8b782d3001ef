//! Human-readable text for snapshots, events and diagnostics (what `exo-node peers` prints).

use std::fmt;

use crate::event::{
    Discovery, LeaveReason, PeerDiagnostic, PeerInfo, Problem, TopologyEvent, TopologySnapshot,
};
use crate::identity::KeyOrigin;
use crate::profile::{LinkMeasurement, NodeProfile, NodeRole};

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Discovery::Mdns => "mdns",
            Discovery::Static => "static peer",
            Discovery::Inbound => "inbound",
            Discovery::Dialed => "dialed",
        })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The detail only repeats it; it stays in the data.
            Problem::ClusterKeyMismatch { .. } => f.write_str(
                "the connection failed: the cluster key differs (give both devices the same $EXO_HOME/cluster.key or --cluster-key; `exo-node peers` prints the key's fingerprint)",
            ),
            Problem::HandshakeFailed { detail } => write!(
                f,
                "the connection failed during the handshake (an incompatible version?): {detail}"
            ),
            Problem::IncompatibleVersion { ours, theirs } => write!(
                f,
                "incompatible version: it speaks {theirs}, this node {ours}; run the same release on both"
            ),
            Problem::DuplicateIdentity { detail } => write!(
                f,
                "two nodes share one identity ({detail}); the home folder was probably copied: delete node.key in $EXO_HOME on one of them and restart it"
            ),
            Problem::WrongPeer { obtained } => {
                write!(f, "a different node ({obtained}) answers at this address")
            }
            Problem::Unreachable { detail } => write!(f, "unreachable: {detail}"),
            Problem::Other { detail } => f.write_str(detail),
        }
    }
}

impl fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaveReason::Closed => f.write_str("it closed its connections"),
            LeaveReason::Unresponsive { silent_s } => {
                write!(f, "no answer for {silent_s:.1} s")
            }
            LeaveReason::Restarted => f.write_str("it restarted"),
            LeaveReason::Disconnected => f.write_str("this node disconnected it"),
            LeaveReason::Error { detail } => write!(f, "connection error: {detail}"),
        }
    }
}

impl fmt::Display for PeerDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.id.as_ref().map_or("unknown peer", |id| id.as_str());
        write!(f, "{id}")?;
        if let Some(address) = &self.address {
            write!(f, " seen via {} at {address}", self.via)?;
        } else {
            write!(f, " seen via {}", self.via)?;
        }
        match &self.problem {
            Some(problem) => write!(f, ": {problem}")?,
            None => write!(f, ": connecting")?,
        }
        if self.attempts > 1 {
            write!(f, " [{} attempts]", self.attempts)?;
        }
        Ok(())
    }
}

pub(crate) fn bytes(n: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if n >= GIB {
        format!("{:.1} GiB", n / GIB)
    } else {
        format!("{:.0} MiB", n / MIB)
    }
}

fn rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e9 {
        format!("{:.2} GB/s", bytes_per_s / 1e9)
    } else {
        format!(
            "{:.1} MB/s ({:.0} Mbit/s)",
            bytes_per_s / 1e6,
            bytes_per_s * 8e-6
        )
    }
}

impl fmt::Display for LinkMeasurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rtt_s {
            Some(rtt) => write!(f, "rtt {:.2} ms", rtt * 1e3)?,
            None => f.write_str("rtt -")?,
        }
        match self.bandwidth_bytes_per_s {
            Some(bw) => write!(f, ", bandwidth {}", rate(bw)),
            None => f.write_str(", bandwidth not measured yet"),
        }
    }
}

impl fmt::Display for NodeProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            NodeRole::Worker => "worker",
            NodeRole::Observer => "observer",
        };
        write!(
            f,
            "{} ({}, {role}, v{})",
            self.id, self.name, self.software_version
        )?;
        write!(
            f,
            "\n    {} on {}, {} cores",
            self.backend, self.device, self.cores
        )?;
        write!(
            f,
            ", {:.1} GFLOP/s, memory bandwidth {:.1} GB/s",
            self.flops_per_s / 1e9,
            self.mem_bandwidth_bytes_per_s / 1e9
        )?;
        match (self.memory.available_bytes, self.memory.total_bytes) {
            (Some(a), Some(t)) => write!(
                f,
                "\n    memory {} available of {}",
                bytes(a as f64),
                bytes(t as f64)
            )?,
            _ => write!(f, "\n    memory unknown")?,
        }
        if let Some(endpoint) = &self.grpc_endpoint {
            write!(f, ", shard service {endpoint}")?;
        }
        if !self.models.is_empty() {
            let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            write!(f, "\n    models: {}", names.join(", "))?;
        }
        Ok(())
    }
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.profile)?;
        write!(
            f,
            "\n    link: {}; via {} at {}",
            self.link,
            self.via,
            self.addresses.join(", ")
        )
    }
}

impl fmt::Display for TopologySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "this node: {}", self.local)?;
        writeln!(f, "    listening on {}", self.listen_addresses.join(", "))?;
        let origin = match &self.cluster_key.origin {
            KeyOrigin::Given => "given".to_owned(),
            KeyOrigin::File { path } => format!("from {}", path.display()),
            KeyOrigin::Generated { path } => format!("generated into {}", path.display()),
        };
        writeln!(
            f,
            "    cluster key fingerprint {} ({origin})",
            self.cluster_key.fingerprint
        )?;
        writeln!(f)?;
        match self.nodes.len() {
            0 => writeln!(f, "no other nodes")?,
            1 => writeln!(f, "1 other node:")?,
            n => writeln!(f, "{n} other nodes:")?,
        }
        for node in &self.nodes {
            writeln!(f, "  {node}")?;
        }
        if !self.diagnostics.is_empty() {
            writeln!(f)?;
            writeln!(f, "seen but not in the cluster:")?;
            for d in &self.diagnostics {
                writeln!(f, "  {d}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for TopologyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyEvent::NodeJoined {
                profile,
                address,
                via,
            } => write!(f, "joined: {profile}\n    via {via} at {address}"),
            TopologyEvent::NodeLeft { id, reason } => write!(f, "left: {id}: {reason}"),
            TopologyEvent::ProfileUpdated { profile } => write!(f, "updated: {profile}"),
            TopologyEvent::LinkMeasured { id, link } => write!(f, "link to {id}: {link}"),
            TopologyEvent::PeerProblem { diagnostic } => write!(f, "problem: {diagnostic}"),
        }
    }
}
