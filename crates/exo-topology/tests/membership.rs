//! Cluster membership between nodes in one process, over libp2p's memory transport: profiles are
//! exchanged, departures are seen at once, and a node with another cluster key, another version
//! or a copied identity is kept out and diagnosed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use exo_topology::{
    ClusterKey, EventStream, LeaveReason, ModelFile, Multiaddr, NodeId, Problem, Topology,
    TopologyConfig, TopologyEvent, TopologySnapshot,
};
use futures::StreamExt;

fn memory_port() -> u64 {
    rand::random_range(1_000_000..u64::MAX / 2)
}

fn config(home: &Path, port: u64, key: &ClusterKey) -> TopologyConfig {
    let mut config = TopologyConfig::in_memory(home, port);
    config.cluster_key = Some(key.clone());
    config
}

/// How long an event may take: generous, since a loaded 2-core machine running tests in
/// parallel has taken over 5 s to let two nodes on the memory transport join; each wait ends
/// as soon as its event comes.
const WITHIN: Duration = Duration::from_secs(20);

fn address(port: u64) -> Multiaddr {
    format!("/memory/{port}").parse().unwrap()
}

/// The first event matching `want` within `within`, or a panic naming `what`.
async fn wait_for(
    events: &mut EventStream,
    within: Duration,
    what: &str,
    mut want: impl FnMut(&TopologyEvent) -> bool,
) -> TopologyEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) if want(&event) => return event,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("no {what} within {within:?}"),
        }
    }
}

/// Polls snapshots until `want` holds, or panics naming `what` with the last snapshot.
async fn wait_snapshot(
    topology: &Topology,
    within: Duration,
    what: &str,
    mut want: impl FnMut(&TopologySnapshot) -> bool,
) -> TopologySnapshot {
    let deadline = Instant::now() + within;
    loop {
        let snapshot = topology.snapshot().await.unwrap();
        if want(&snapshot) {
            return snapshot;
        }
        if Instant::now() > deadline {
            panic!("no {what} within {within:?}; last snapshot:\n{snapshot}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn joined(id: &NodeId) -> impl FnMut(&TopologyEvent) -> bool + '_ {
    move |e| matches!(e, TopologyEvent::NodeJoined { profile, .. } if &profile.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_profiles_and_measure_their_link() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let key = ClusterKey::generate();
    let (pa, pb) = (memory_port(), memory_port());
    let mut ca = config(dirs[0].path(), pa, &key);
    ca.grpc_endpoint = Some("http://10.0.0.1:52417".to_owned());
    ca.backend = "wgpu".to_owned();
    ca.device = "test gpu".to_owned();
    ca.memory_limit = Some(3 << 30);
    ca.models = vec![ModelFile {
        name: "smollm2.gguf".to_owned(),
        bytes: 94_000_000,
        sha256: None,
        ..ModelFile::default()
    }];
    let a = Topology::start(ca).await.unwrap();
    let mut a_events = a.events().await.unwrap();
    let mut cb = config(dirs[1].path(), pb, &key);
    cb.static_peers = vec![address(pa)];
    let b = Topology::start(cb).await.unwrap();
    let mut b_events = b.events().await.unwrap();

    let seen_by_b = wait_for(&mut b_events, WITHIN, "A joining B", joined(a.local_id())).await;
    let TopologyEvent::NodeJoined { profile, .. } = seen_by_b else {
        unreachable!()
    };
    assert_eq!(
        profile.grpc_endpoint.as_deref(),
        Some("http://10.0.0.1:52417")
    );
    assert_eq!(
        (profile.backend.as_str(), profile.device.as_str()),
        ("wgpu", "test gpu")
    );
    assert_eq!(profile.models[0].name, "smollm2.gguf");
    assert_eq!(profile.memory.total_bytes.unwrap(), 3 << 30);
    assert_eq!(profile.flops_per_s, 1e10);
    assert_eq!(profile.protocol_version, exo_topology::PROTOCOL_VERSION);
    wait_for(&mut a_events, WITHIN, "B joining A", joined(b.local_id())).await;

    // Both ends measure the link: round trips from pings, bandwidth from a timed transfer.
    for (node, other) in [(&a, b.local_id()), (&b, a.local_id())] {
        let snapshot = wait_snapshot(node, Duration::from_secs(10), "a measured link", |s| {
            s.node(other)
                .is_some_and(|n| n.link.rtt_s.is_some() && n.link.bandwidth_bytes_per_s.is_some())
        })
        .await;
        let link = snapshot.node(other).unwrap().link;
        assert!(
            link.rtt_s.unwrap() > 0.0 && link.rtt_s.unwrap() < 1.0,
            "{link:?}"
        );
        assert!(link.bandwidth_bytes_per_s.unwrap() > 1e6, "{link:?}");
        assert!(snapshot.diagnostics.is_empty(), "{snapshot}");
        assert_eq!(snapshot.nodes.len(), 1);
    }

    // A changed profile reaches the other node at once.
    let updated = a
        .update_profile(|p| {
            p.models.push(ModelFile {
                name: "llama-3.2-1b.gguf".to_owned(),
                bytes: 1 << 30,
                sha256: Some("ab".repeat(32)),
                tool_syntax: Some("hermes".to_owned()),
                ..ModelFile::default()
            });
            p.id = NodeId("forged".to_owned());
        })
        .await
        .unwrap();
    assert_eq!(&updated.id, a.local_id(), "the id cannot be changed");
    let event = wait_for(&mut b_events, WITHIN, "a profile update", |e| {
        matches!(e, TopologyEvent::ProfileUpdated { .. })
    })
    .await;
    let TopologyEvent::ProfileUpdated { profile } = event else {
        unreachable!()
    };
    assert_eq!(profile.models.len(), 2);

    // Events and snapshots are plain JSON for the runtime and `exo-node peers --json`.
    let json = serde_json::to_string(&profile).unwrap();
    assert_eq!(
        serde_json::from_str::<exo_topology::NodeProfile>(&json).unwrap(),
        profile
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_shuts_down_or_is_dropped_is_seen_leaving_at_once() {
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let key = ClusterKey::generate();
    let pa = memory_port();
    let a = Topology::start(config(dirs[0].path(), pa, &key))
        .await
        .unwrap();
    let mut events = a.events().await.unwrap();
    let mut others = Vec::new();
    for dir in &dirs[1..] {
        let mut c = config(dir.path(), memory_port(), &key);
        c.static_peers = vec![address(pa)];
        let node = Topology::start(c).await.unwrap();
        wait_for(
            &mut events,
            WITHIN,
            "a node joining",
            joined(node.local_id()),
        )
        .await;
        others.push(node);
    }
    let dropped = others.pop().unwrap();
    let stopped = others.pop().unwrap();

    let left = |id: NodeId| move |e: &TopologyEvent| matches!(e, TopologyEvent::NodeLeft { id: left, .. } if *left == id);
    // A clean shutdown.
    let id = stopped.local_id().clone();
    let start = Instant::now();
    stopped.shutdown().await.unwrap();
    let event = wait_for(
        &mut events,
        Duration::from_secs(1),
        "a clean departure",
        left(id),
    )
    .await;
    assert!(
        matches!(
            event,
            TopologyEvent::NodeLeft {
                reason: LeaveReason::Closed,
                ..
            }
        ),
        "{event:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    // Every client dropped: the service ends by itself, just as cleanly.
    let id = dropped.local_id().clone();
    let clone = dropped.clone();
    let start = Instant::now();
    drop(dropped);
    drop(clone);
    let event = wait_for(
        &mut events,
        Duration::from_secs(1),
        "a dropped node leaving",
        left(id),
    )
    .await;
    assert!(
        matches!(
            event,
            TopologyEvent::NodeLeft {
                reason: LeaveReason::Closed,
                ..
            }
        ),
        "{event:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let snapshot = a.snapshot().await.unwrap();
    assert!(snapshot.nodes.is_empty(), "{snapshot}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cluster_key_cannot_connect_and_is_diagnosed() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let pa = memory_port();
    let a = Topology::start(config(dirs[0].path(), pa, &ClusterKey::generate()))
        .await
        .unwrap();
    let mut a_events = a.events().await.unwrap();
    let mut cc = config(dirs[1].path(), memory_port(), &ClusterKey::generate());
    cc.static_peers = vec![address(pa)];
    let c = Topology::start(cc).await.unwrap();

    let snapshot = wait_snapshot(&c, WITHIN, "a key diagnosis", |s| {
        s.diagnostics
            .iter()
            .any(|d| matches!(d.problem, Some(Problem::ClusterKeyMismatch { .. })))
    })
    .await;
    let text = snapshot.to_string();
    assert!(text.contains("the cluster key differs"), "{text}");
    assert!(text.contains(&format!("/memory/{pa}")), "{text}");
    assert!(snapshot.nodes.is_empty());

    // The listening side saw the failed handshake too, and nobody joined anywhere.
    let event = wait_for(&mut a_events, WITHIN, "a problem report", |e| {
        matches!(e, TopologyEvent::PeerProblem { .. })
    })
    .await;
    assert!(
        matches!(&event, TopologyEvent::PeerProblem { diagnostic }
            if matches!(diagnostic.problem, Some(Problem::ClusterKeyMismatch { .. }))),
        "{event:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.snapshot().await.unwrap().nodes.is_empty());
    assert!(c.snapshot().await.unwrap().nodes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_major_version_is_refused_and_diagnosed() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let key = ClusterKey::generate();
    let pa = memory_port();
    let a = Topology::start(config(dirs[0].path(), pa, &key))
        .await
        .unwrap();
    let mut cc = config(dirs[1].path(), memory_port(), &key);
    cc.static_peers = vec![address(pa)];
    cc.protocol_version = "/exo/3.0.0".to_owned();
    let c = Topology::start(cc).await.unwrap();

    for node in [&a, &c] {
        let snapshot = wait_snapshot(node, WITHIN, "a version diagnosis", |s| {
            s.diagnostics
                .iter()
                .any(|d| matches!(d.problem, Some(Problem::IncompatibleVersion { .. })))
        })
        .await;
        let text = snapshot.to_string();
        assert!(text.contains("incompatible version"), "{text}");
        assert!(
            text.contains("/exo/3.0.0") && text.contains("/exo/2.0.0"),
            "{text}"
        );
        assert!(snapshot.nodes.is_empty(), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_an_identity_are_reported() {
    let shared_home = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let key = ClusterKey::generate();
    let pc = memory_port();
    let c = Topology::start(config(other.path(), pc, &key))
        .await
        .unwrap();
    let (p1, p2) = (memory_port(), memory_port());
    let mut c1 = config(shared_home.path(), p1, &key);
    c1.static_peers = vec![address(pc)];
    let x1 = Topology::start(c1).await.unwrap();
    let mut c2 = config(shared_home.path(), p2, &key);
    c2.static_peers = vec![address(pc)];
    let x2 = Topology::start(c2).await.unwrap();
    assert_eq!(
        x1.local_id(),
        x2.local_id(),
        "a copied home folder copies the identity"
    );

    // A third node sees one identity answer from two places.
    let snapshot = wait_snapshot(&c, Duration::from_secs(8), "a duplicate report", |s| {
        s.diagnostics
            .iter()
            .any(|d| matches!(d.problem, Some(Problem::DuplicateIdentity { .. })))
    })
    .await;
    let text = snapshot.to_string();
    assert!(text.contains("delete node.key"), "{text}");
    assert_eq!(snapshot.nodes.len(), 1, "{text}");

    // And a twin that dials the other learns it at once.
    x2.add_peer(address(p1)).await.unwrap();
    for twin in [&x1, &x2] {
        wait_snapshot(twin, WITHIN, "a duplicate report", |s| {
            s.diagnostics.iter().any(|d| {
                matches!(&d.problem, Some(Problem::DuplicateIdentity { detail }) if detail.contains("own identity"))
            })
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_peer_that_starts_later_is_reached_by_redialling() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let key = ClusterKey::generate();
    let pa = memory_port();
    let mut cb = config(dirs[1].path(), memory_port(), &key);
    cb.static_peers = vec![address(pa)];
    let b = Topology::start(cb).await.unwrap();
    let mut events = b.events().await.unwrap();

    let snapshot = wait_snapshot(&b, Duration::from_secs(3), "an unreachable report", |s| {
        s.diagnostics
            .iter()
            .any(|d| matches!(d.problem, Some(Problem::Unreachable { .. })))
    })
    .await;
    assert!(snapshot.to_string().contains("unreachable"), "{snapshot}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a = Topology::start(config(dirs[0].path(), pa, &key))
        .await
        .unwrap();
    wait_for(
        &mut events,
        Duration::from_secs(8),
        "the late peer joining",
        joined(a.local_id()),
    )
    .await;
    let snapshot = b.snapshot().await.unwrap();
    assert!(snapshot.diagnostics.is_empty(), "{snapshot}");

    // When it goes away and comes back, it is redialled again.
    let a_id = a.local_id().clone();
    a.shutdown().await.unwrap();
    wait_for(
        &mut events,
        Duration::from_secs(2),
        "the peer leaving",
        |e| matches!(e, TopologyEvent::NodeLeft { id, .. } if *id == a_id),
    )
    .await;
    let a = Topology::start(config(dirs[0].path(), pa, &key))
        .await
        .unwrap();
    wait_for(
        &mut events,
        Duration::from_secs(8),
        "the peer rejoining",
        joined(a.local_id()),
    )
    .await;
}

/// The rotation `topology` was handed, once it is announced (within [`WITHIN`]).
async fn rotation_of(topology: &Topology) -> exo_topology::Rotation {
    tokio::time::timeout(WITHIN, topology.rotated())
        .await
        .expect("no rotation announced")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_reaches_every_node_but_the_revoked_one() {
    // A hub `a` with `b` and `c` around it, and `x`, which reaches only `b`, rotating the key
    // and revoking `c`: the key travels x -> b -> a, never to c.
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let key = ClusterKey::generate();
    let pa = memory_port();
    let a = Topology::start(config(dirs[0].path(), pa, &key))
        .await
        .unwrap();
    let pb = memory_port();
    let mut cb = config(dirs[1].path(), pb, &key);
    cb.static_peers = vec![address(pa)];
    let b = Topology::start(cb).await.unwrap();
    let mut cc = config(dirs[2].path(), memory_port(), &key);
    cc.static_peers = vec![address(pa)];
    let c = Topology::start(cc).await.unwrap();
    let mut cx = config(dirs[3].path(), memory_port(), &key);
    cx.static_peers = vec![address(pb)];
    let x = Topology::start(cx).await.unwrap();
    wait_snapshot(&a, WITHIN, "b and c joined a", |s| s.nodes.len() == 2).await;
    wait_snapshot(&x, WITHIN, "x joined b", |s| s.nodes.len() == 1).await;

    let new = ClusterKey::generate();
    let acks = x
        .rotate_key(new.clone(), vec![c.local_id().clone()])
        .await
        .unwrap();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(&acks[0].node, b.local_id());
    assert_eq!(acks[0].outcome, Ok(()));
    let at_b = rotation_of(&b).await;
    assert_eq!(at_b.key, new);
    assert_eq!(&at_b.by, x.local_id());
    assert_eq!(at_b.revoked, vec![c.local_id().clone()]);
    let at_a = rotation_of(&a).await;
    assert_eq!(at_a.key, new);
    assert_eq!(&at_a.by, b.local_id(), "handed on by b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        c.rotations().borrow().is_none(),
        "the revoked node got the key"
    );
    assert!(
        x.rotations().borrow().is_none(),
        "the rotation came back to x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_sharing_a_nodes_home_joins_under_its_own_identity() {
    let home = tempfile::tempdir().unwrap();
    let key = ClusterKey::generate();
    let pa = memory_port();
    let node = Topology::start(config(home.path(), pa, &key))
        .await
        .unwrap();
    let mut observing = config(home.path(), memory_port(), &key);
    observing.static_peers = vec![address(pa)];
    observing.ephemeral_identity = true;
    let observer = Topology::start(observing).await.unwrap();
    assert_ne!(observer.local_id(), node.local_id());
    let snapshot =
        wait_snapshot(&observer, WITHIN, "the node joined", |s| s.nodes.len() == 1).await;
    assert!(snapshot.diagnostics.is_empty(), "{snapshot}");
    assert!(node.snapshot().await.unwrap().diagnostics.is_empty());
}
