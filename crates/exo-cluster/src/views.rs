//! The cluster as the API shows it. Membership, the plan and what each node reports about
//! itself (its shard service's status) become `exo_api`'s views. A [`Tracker`] keeps what a
//! view needs from before: the last reading of each node's counters (step times and tokens/s
//! are differences between two readings) and the nodes that left a moment ago.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use exo_api::{ClusterView, FetchView, LinkView, NodeState, NodeView, PeerProblemView, PlanView};
use exo_core::Epoch;
use exo_topology::{NodeProfile, NodeRole, TopologyEvent, TopologySnapshot};
use exo_transport::NodeStatus;

use crate::clients::ClientPool;
use crate::origin::model_id;
use crate::plan::reachable;

/// How long a node's status may take before the view goes on without it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node that left is still shown, as gone.
const GONE_FOR: Duration = Duration::from_secs(60);
/// A worker that joined this recently and is not in the plan is joining (the cluster plans
/// again once membership settles); later, it is idle.
const JOINING_FOR_S: f64 = 10.0;
/// Readings closer together than this are too noisy to divide: the last figures stand.
const MIN_INTERVAL: Duration = Duration::from_millis(800);

/// What the nodes that could be asked said about themselves, by node id.
pub(crate) type Reports = HashMap<String, NodeStatus>;

/// Asks every worker of `snapshot` that runs a shard service for its status, all at once; a
/// node that does not answer within [`STATUS_TIMEOUT`] is left out (and its connection
/// forgotten, so the next call dials again).
pub(crate) async fn reports(clients: &ClientPool, snapshot: &TopologySnapshot) -> Reports {
    let asks = snapshot
        .nodes
        .iter()
        .filter(|p| p.profile.role == NodeRole::Worker)
        .filter_map(|p| {
            let endpoint = reachable(p.profile.grpc_endpoint.as_deref()?, &p.addresses);
            Some(async move {
                let ask = async { clients.get(&endpoint).await?.status().await };
                match tokio::time::timeout(STATUS_TIMEOUT, ask).await {
                    Ok(Ok(status)) => Some((p.profile.id.as_str().to_owned(), status)),
                    _ => {
                        clients.forget(&endpoint);
                        None
                    }
                }
            })
        });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// What a view is made of, gathered by an engine.
#[derive(Debug)]
pub(crate) struct ViewInput<'a> {
    /// Membership, if it could be read.
    pub(crate) snapshot: Option<&'a TopologySnapshot>,
    /// What the nodes said about themselves.
    pub(crate) reports: &'a Reports,
    /// The plan in force, without the stages' figures (they are filled in here).
    pub(crate) plan: Option<PlanView>,
    /// The plan's epoch, when the engine knows which plan is in force.
    pub(crate) epoch: Option<Epoch>,
    /// The cluster's state for people.
    pub(crate) status: String,
    /// Whether the engine can serve now.
    pub(crate) ready: bool,
}

/// The last reading of one node's counters, and the figures derived from the one before.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    positions: u64,
    decode_steps: u64,
    decode_nanos: u64,
    step_ms: Option<f64>,
    tokens_per_s: Option<f64>,
}

/// What views remember between one another.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    readings: HashMap<String, Reading>,
    /// The nodes of the last view, by id: what a node that leaves is shown as.
    known: HashMap<String, NodeView>,
    /// Nodes that left, and when.
    gone: Vec<(NodeView, Instant)>,
}

impl Tracker {
    /// Takes note of a membership event: a node that left is shown as gone for a while.
    pub(crate) fn observe(&mut self, event: &TopologyEvent, now: Instant) {
        match event {
            TopologyEvent::NodeLeft { id, .. } => {
                if let Some(node) = self.known.remove(id.as_str()) {
                    self.mark_gone(node, now);
                }
            }
            TopologyEvent::NodeJoined { profile, .. } => {
                self.gone.retain(|(n, _)| n.id != profile.id.as_str());
            }
            _ => {}
        }
    }

    /// Shows `node` as gone from `now` on (once, however it was learned).
    fn mark_gone(&mut self, node: NodeView, now: Instant) {
        self.gone.retain(|(n, _)| n.id != node.id);
        let gone = NodeView {
            state: NodeState::Gone,
            progress: None,
            fetch: None,
            used_memory_bytes: None,
            is_self: false,
            ..node
        };
        self.gone.push((gone, now));
    }

    /// The step time and tokens/s of the node whose counters `report` carries: the mean time
    /// of its decode steps (one position for every request in the frame; prompt chunks would
    /// blur it) and the positions it computed per second, both since the last reading.
    fn figures(
        &mut self,
        id: &str,
        report: &NodeStatus,
        now: Instant,
    ) -> (Option<f64>, Option<f64>) {
        let fresh = |step_ms, tokens_per_s| Reading {
            at: now,
            positions: report.positions_computed,
            decode_steps: report.decode_steps,
            decode_nanos: report.decode_nanos,
            step_ms,
            tokens_per_s,
        };
        let since_start = mean_step_ms(report.decode_steps, report.decode_nanos);
        let reading = match self.readings.get(id) {
            // The first reading, or the node restarted (its counters went back): the mean
            // step time since it started, and no rate yet.
            None => fresh(since_start, None),
            Some(last)
                if report.decode_steps < last.decode_steps
                    || report.positions_computed < last.positions =>
            {
                fresh(since_start, None)
            }
            Some(last) if now.duration_since(last.at) < MIN_INTERVAL => *last,
            Some(last) => {
                let steps = report.decode_steps - last.decode_steps;
                let positions = report.positions_computed - last.positions;
                let seconds = now.duration_since(last.at).as_secs_f64();
                let step_ms = if steps > 0 {
                    mean_step_ms(steps, report.decode_nanos.saturating_sub(last.decode_nanos))
                } else {
                    last.step_ms
                };
                fresh(step_ms, Some(positions as f64 / seconds))
            }
        };
        self.readings.insert(id.to_owned(), reading);
        (reading.step_ms, reading.tokens_per_s)
    }

    /// Builds the view from `input`, as of `now`.
    pub(crate) fn view(&mut self, input: ViewInput<'_>, now: Instant) -> ClusterView {
        let ViewInput {
            snapshot,
            reports,
            mut plan,
            epoch,
            status,
            ready,
        } = input;
        let mut in_plan = HashSet::new();
        if let Some(plan) = plan.as_mut() {
            for stage in &mut plan.stages {
                in_plan.insert(stage.node.clone());
                in_plan.extend(stage.group.iter().cloned());
                if let Some(report) = reports.get(&stage.node) {
                    let (step_ms, tokens_per_s) = self.figures(&stage.node, report, now);
                    stage.step_ms = step_ms;
                    stage.tokens_per_s = tokens_per_s;
                    stage.requests = Some(report.active_requests);
                    stage.sent_bytes = Some(report.activation_bytes_sent);
                }
            }
        }
        let place = Place {
            in_plan: &in_plan,
            planned: plan.is_some(),
            epoch,
        };
        let mut nodes = Vec::new();
        if let Some(snapshot) = snapshot {
            let local = &snapshot.local;
            nodes.push(node_view(
                local,
                true,
                None,
                None,
                reports.get(local.id.as_str()),
                &place,
            ));
            nodes.extend(snapshot.nodes.iter().map(|p| {
                node_view(
                    &p.profile,
                    false,
                    p.addresses.first().cloned(),
                    Some(p.joined_s_ago),
                    reports.get(p.profile.id.as_str()),
                    &place,
                )
            }));
        }
        let present: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        if snapshot.is_some() {
            // A node of the last view that membership no longer lists left, even when this
            // view was built (on a plan change, say) before its departure's event came.
            let departed: Vec<NodeView> = self
                .known
                .values()
                .filter(|n| !present.contains(n.id.as_str()))
                .cloned()
                .collect();
            for node in departed {
                self.mark_gone(node, now);
            }
            self.known = nodes.iter().map(|n| (n.id.clone(), n.clone())).collect();
        }
        self.gone.retain(|(node, at)| {
            now.duration_since(*at) < GONE_FOR && !present.contains(node.id.as_str())
        });
        nodes.extend(self.gone.iter().map(|(node, _)| node.clone()));
        let (links, problems) = snapshot.map(links_and_problems).unwrap_or_default();
        ClusterView {
            nodes,
            links,
            plan,
            status,
            ready,
            problems,
        }
    }
}

fn mean_step_ms(steps: u64, nanos: u64) -> Option<f64> {
    (steps > 0).then(|| nanos as f64 / steps as f64 / 1e6)
}

/// Where the plan in force puts nodes.
struct Place<'a> {
    in_plan: &'a HashSet<String>,
    planned: bool,
    epoch: Option<Epoch>,
}

fn node_view(
    profile: &NodeProfile,
    is_self: bool,
    address: Option<String>,
    joined_s_ago: Option<f64>,
    report: Option<&NodeStatus>,
    place: &Place<'_>,
) -> NodeView {
    let id = profile.id.as_str();
    let (state, progress) = state_of(
        profile.role,
        report,
        place.in_plan.contains(id),
        place.planned,
        place.epoch,
        joined_s_ago,
    );
    NodeView {
        id: id.to_owned(),
        name: profile.name.clone(),
        role: match profile.role {
            NodeRole::Worker => "worker",
            NodeRole::Observer => "observer",
        }
        .to_owned(),
        address: profile.grpc_endpoint.clone().or(address),
        memory_bytes: profile.memory.total_bytes.unwrap_or(0),
        offered_memory_bytes: profile
            .memory
            .available_bytes
            .or(profile.memory.total_bytes)
            .unwrap_or(0),
        flops: profile.flops_per_s,
        models: profile.models.iter().map(|m| model_id(&m.name)).collect(),
        is_self,
        state,
        progress,
        os: profile.os.clone(),
        device: profile.device.clone(),
        cores: profile.cores,
        backend: profile.backend.clone(),
        // Whole MiB: resident memory moves by pages all the time, and a view that changes
        // every second for nothing would be sent every second.
        used_memory_bytes: report
            .map(|r| r.resident_bytes >> 20 << 20)
            .filter(|&b| b > 0),
        weight_bytes: report.map(|r| r.weight_bytes).filter(|&b| b > 0),
        fetch: report.and_then(|r| r.fetch).map(|f| FetchView {
            received_bytes: f.done_bytes,
            total_bytes: f.total_bytes,
            bytes_per_s: f.bytes_per_s,
            eta_s: (f.bytes_per_s > 0.0)
                .then(|| f.total_bytes.saturating_sub(f.done_bytes) as f64 / f.bytes_per_s),
        }),
    }
}

/// Where a node stands, and how far its load got when it loads.
fn state_of(
    role: NodeRole,
    report: Option<&NodeStatus>,
    in_plan: bool,
    planned: bool,
    epoch: Option<Epoch>,
    joined_s_ago: Option<f64>,
) -> (NodeState, Option<f64>) {
    if role == NodeRole::Observer {
        return (NodeState::Observer, None);
    }
    if let Some(fetch) = report.and_then(|r| r.fetch) {
        let fraction = fetch.done_bytes as f64 / fetch.total_bytes.max(1) as f64;
        return (NodeState::Fetching, Some(fraction.clamp(0.0, 1.0)));
    }
    if let Some(report) = report
        && report.loading.is_some()
    {
        return (NodeState::Loading, Some(report.loading_fraction));
    }
    if in_plan {
        let holds = report.is_some_and(|r| r.ready && (epoch.is_none() || r.epoch == epoch));
        return if holds {
            (NodeState::Ready, None)
        } else {
            (NodeState::Loading, None)
        };
    }
    match joined_s_ago {
        Some(s) if s < JOINING_FOR_S => (NodeState::Joining, None),
        _ if planned => (NodeState::Idle, None),
        _ => (NodeState::Waiting, None),
    }
}

/// The measured links of a membership snapshot, and the peers seen but not in the cluster.
fn links_and_problems(snapshot: &TopologySnapshot) -> (Vec<LinkView>, Vec<PeerProblemView>) {
    let links = snapshot
        .nodes
        .iter()
        .map(|p| LinkView {
            from: snapshot.local.id.as_str().to_owned(),
            to: p.profile.id.as_str().to_owned(),
            latency_ms: p.link.latency_s().map(|s| s * 1e3),
            bandwidth_bytes_per_s: p.link.bandwidth_bytes_per_s,
        })
        .collect();
    let problems = snapshot
        .diagnostics
        .iter()
        .map(|d| PeerProblemView {
            peer: d.id.as_ref().map(|id| id.as_str().to_owned()),
            address: d.address.clone(),
            problem: d.problem.as_ref().map_or_else(
                || "connecting (a first attempt is under way)".to_owned(),
                ToString::to_string,
            ),
        })
        .collect();
    (links, problems)
}

#[cfg(test)]
mod tests {
    use exo_core::LayerRange;

    use super::*;

    /// A status whose counters say `steps` decode steps took `nanos` in all, and `positions`
    /// positions were computed (prompt chunks included).
    fn counters(steps: u64, positions: u64, nanos: u64) -> NodeStatus {
        NodeStatus {
            steps_computed: steps + 1,
            positions_computed: positions,
            compute_nanos: nanos + 400_000_000,
            decode_steps: steps,
            decode_nanos: nanos,
            ..NodeStatus::default()
        }
    }

    #[test]
    fn step_times_and_rates_come_from_differences_between_readings() {
        let mut tracker = Tracker::default();
        let start = Instant::now();
        // Since it started: 10 decode steps in 50 ms (and a long prompt chunk, left out of
        // the step time); no rate yet.
        let (step, rate) = tracker.figures("a", &counters(10, 40, 50_000_000), start);
        assert_eq!((step, rate), (Some(5.0), None));
        // Two seconds later: 20 more decode steps in 200 ms, 20 positions.
        let later = start + Duration::from_secs(2);
        let (step, rate) = tracker.figures("a", &counters(30, 60, 250_000_000), later);
        assert_eq!(step, Some(10.0));
        assert_eq!(rate, Some(10.0));
        // Too soon to divide: the same figures.
        let soon = later + Duration::from_millis(100);
        let again = tracker.figures("a", &counters(31, 61, 260_000_000), soon);
        assert_eq!(again, (Some(10.0), Some(10.0)));
        // Idle: the last step time stands, no positions per second.
        let idle = later + Duration::from_secs(2);
        let (step, rate) = tracker.figures("a", &counters(30, 60, 250_000_000), idle);
        assert_eq!((step, rate), (Some(10.0), Some(0.0)));
        // A restart: counters went back.
        let restarted = idle + Duration::from_secs(2);
        let (step, rate) = tracker.figures("a", &counters(0, 0, 0), restarted);
        assert_eq!((step, rate), (None, None));
    }

    #[test]
    fn states_follow_the_report_and_the_plan() {
        let epoch = Epoch::from_hash(3);
        let held = NodeStatus {
            ready: true,
            epoch: Some(epoch),
            ..NodeStatus::default()
        };
        let loading = NodeStatus {
            loading: Some(LayerRange::new(0, 8)),
            loading_fraction: 0.5,
            ..NodeStatus::default()
        };
        let worker = NodeRole::Worker;
        assert_eq!(
            state_of(worker, Some(&held), true, true, Some(epoch), Some(60.0)),
            (NodeState::Ready, None)
        );
        // Holding an older plan's layers is not ready for this one.
        let older = NodeStatus {
            epoch: Some(Epoch::from_hash(4)),
            ..held.clone()
        };
        assert_eq!(
            state_of(worker, Some(&older), true, true, Some(epoch), None).0,
            NodeState::Loading
        );
        assert_eq!(
            state_of(worker, Some(&loading), true, true, Some(epoch), None),
            (NodeState::Loading, Some(0.5))
        );
        // Fetching its layers from peers comes before loading them, with its own progress.
        let fetching = NodeStatus {
            fetch: Some(exo_transport::FetchStatus {
                done_bytes: 1 << 20,
                total_bytes: 4 << 20,
                bytes_per_s: 1e6,
            }),
            ..NodeStatus::default()
        };
        assert_eq!(
            state_of(worker, Some(&fetching), true, true, Some(epoch), None),
            (NodeState::Fetching, Some(0.25))
        );
        assert_eq!(
            state_of(worker, None, false, true, None, Some(1.0)).0,
            NodeState::Joining
        );
        assert_eq!(
            state_of(worker, None, false, true, None, Some(600.0)).0,
            NodeState::Idle
        );
        assert_eq!(
            state_of(worker, None, false, false, None, None).0,
            NodeState::Waiting
        );
        assert_eq!(
            state_of(NodeRole::Observer, Some(&held), true, true, None, None).0,
            NodeState::Observer
        );
    }

    #[test]
    fn a_node_that_leaves_is_shown_as_gone_for_a_while() {
        let mut tracker = Tracker::default();
        let start = Instant::now();
        tracker.known.insert(
            "b".into(),
            NodeView {
                id: "b".into(),
                name: "laptop".into(),
                state: NodeState::Ready,
                used_memory_bytes: Some(1 << 20),
                ..NodeView::default()
            },
        );
        let left = TopologyEvent::NodeLeft {
            id: exo_topology::NodeId("b".into()),
            reason: exo_topology::LeaveReason::Closed,
        };
        tracker.observe(&left, start);
        let input = |reports| ViewInput {
            snapshot: None,
            reports,
            plan: None,
            epoch: None,
            status: "waiting".into(),
            ready: false,
        };
        let reports = Reports::new();
        let view = tracker.view(input(&reports), start + Duration::from_secs(1));
        assert_eq!(view.nodes.len(), 1);
        assert_eq!(view.nodes[0].name, "laptop");
        assert_eq!(view.nodes[0].state, NodeState::Gone);
        assert_eq!(view.nodes[0].used_memory_bytes, None);
        let view = tracker.view(input(&reports), start + GONE_FOR);
        assert!(view.nodes.is_empty(), "{view:?}");
    }

    fn profile(id: &str) -> NodeProfile {
        NodeProfile {
            id: exo_topology::NodeId(id.into()),
            instance: "1".into(),
            name: format!("host-{id}"),
            os: "Linux".into(),
            role: NodeRole::Worker,
            grpc_endpoint: None,
            memory: exo_topology::MemoryInfo::default(),
            backend: "flex".into(),
            device: "cpu".into(),
            cores: 2,
            flops_per_s: 1e9,
            mem_bandwidth_bytes_per_s: 1e9,
            software_version: "0".into(),
            protocol_version: "/exo/2.0.0".into(),
            models: Vec::new(),
        }
    }

    #[test]
    fn a_node_missing_from_membership_is_gone_even_before_its_event() {
        let mut tracker = Tracker::default();
        let start = Instant::now();
        let snapshot = |peers: &[&str]| TopologySnapshot {
            local: profile("a"),
            listen_addresses: Vec::new(),
            cluster_key: exo_topology::ClusterKeyInfo {
                origin: exo_topology::KeyOrigin::Given,
                fingerprint: "f".into(),
            },
            nodes: peers
                .iter()
                .map(|id| exo_topology::PeerInfo {
                    profile: profile(id),
                    addresses: Vec::new(),
                    via: exo_topology::Discovery::Mdns,
                    link: Default::default(),
                    joined_s_ago: 1.0,
                })
                .collect(),
            diagnostics: Vec::new(),
        };
        let reports = Reports::new();
        let input = |snapshot| ViewInput {
            snapshot,
            reports: &reports,
            plan: None,
            epoch: None,
            status: "waiting".into(),
            ready: false,
        };
        let both = snapshot(&["b"]);
        let view = tracker.view(input(Some(&both)), start);
        assert_eq!(view.nodes.len(), 2);
        // A plan change wakes the view first: membership already lacks b.
        let alone = snapshot(&[]);
        let view = tracker.view(input(Some(&alone)), start);
        let b = view.nodes.iter().find(|n| n.id == "b");
        assert_eq!(b.map(|b| b.state), Some(NodeState::Gone), "{view:?}");
        // Its event, coming later, changes nothing; nor does a view without membership.
        tracker.observe(
            &TopologyEvent::NodeLeft {
                id: exo_topology::NodeId("b".into()),
                reason: exo_topology::LeaveReason::Closed,
            },
            start,
        );
        let view = tracker.view(input(None), start);
        assert_eq!(view.nodes.len(), 1, "{view:?}");
        assert_eq!(view.nodes[0].state, NodeState::Gone);
        // b comes back: shown once, as itself.
        let view = tracker.view(input(Some(&both)), start);
        assert_eq!(view.nodes.len(), 2, "{view:?}");
        assert!(view.nodes.iter().all(|n| n.state != NodeState::Gone));
    }
}
