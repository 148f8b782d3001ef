//! Link measurements and liveness over real TCP on loopback, through a relay the test controls:
//! it can hold every chunk for a while (latency) or stop forwarding without closing anything
//! (a node that vanished without a goodbye).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use exo_topology::{
    ClusterKey, EventStream, LeaveReason, Multiaddr, NodeId, Problem, Topology, TopologyConfig,
    TopologyEvent, TopologySnapshot,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A TCP forwarder on 127.0.0.1 to `target` that delays every chunk by `delay` in each
/// direction and, once `frozen` is set, forwards nothing more while keeping both sockets open.
struct Relay {
    address: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    async fn start(target: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pump(ri, wo, delay, flag.clone()));
                tokio::spawn(pump(ro, wi, delay, flag.clone()));
            }
        });
        Self { address, frozen }
    }

    fn multiaddr(&self) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{}", self.address.port())
            .parse()
            .unwrap()
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk held until `delay` after it arrived. The reader never
/// waits for the writer, so the delay adds latency without cutting throughput.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    frozen: Arc<AtomicBool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            if frozen.load(Ordering::SeqCst) {
                // Swallow everything, close nothing: the far end looks alive but mute.
                continue;
            }
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let frozen = frozen.load(Ordering::SeqCst);
        (to, frozen)
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let to = writer.await;
    if frozen_now(&to) {
        // A frozen relay passes on nothing, not even a close: hold the socket open until the
        // test ends.
        let _to = to;
        std::future::pending::<()>().await;
    }
}

fn frozen_now<T>(writer: &Result<(T, bool), tokio::task::JoinError>) -> bool {
    writer.as_ref().is_ok_and(|(_, frozen)| *frozen)
}

fn tcp_config(home: &Path, key: &ClusterKey) -> TopologyConfig {
    let mut config = TopologyConfig::new(home);
    config.cluster_key = Some(key.clone());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.mdns = false;
    config.benchmark = Some(exo_topology::Benchmark {
        flops_per_s: 1e10,
        mem_bandwidth_bytes_per_s: 1e10,
    });
    config.probe_interval = Duration::from_secs(2);
    config
}

async fn listen_port(topology: &Topology) -> u16 {
    for _ in 0..100 {
        let snapshot = topology.snapshot().await.unwrap();
        if let Some(address) = snapshot.listen_addresses.first() {
            return address.rsplit('/').next().unwrap().parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the node never reported a listen address");
}

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

async fn wait_left(events: &mut EventStream, id: &NodeId, within: Duration) -> LeaveReason {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(TopologyEvent::NodeLeft { id: left, reason })) if &left == id => {
                return reason;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("{id} not declared gone within {within:?}"),
        }
    }
}

/// Two nodes, B dialling A through a relay with the given delay.
async fn pair_through_relay(
    delay: Duration,
) -> (Topology, Topology, Relay, [tempfile::TempDir; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let key = ClusterKey::generate();
    let a = Topology::start(tcp_config(dirs[0].path(), &key))
        .await
        .unwrap();
    let port = listen_port(&a).await;
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], port)), delay).await;
    let mut cb = tcp_config(dirs[1].path(), &key);
    cb.static_peers = vec![relay.multiaddr()];
    let b = Topology::start(cb).await.unwrap();
    (a, b, relay, dirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_through_a_20ms_relay_is_measured_as_at_least_40ms() {
    let delay = Duration::from_millis(20);
    let (a, b, _relay, _dirs) = pair_through_relay(delay).await;
    // Held 20 ms each way: every round trip takes at least 40 ms.
    let snapshot = wait_snapshot(&b, Duration::from_secs(15), "five ping samples", |s| {
        s.node(a.local_id())
            .is_some_and(|n| n.link.rtt_samples >= 5)
    })
    .await;
    let link = snapshot.node(a.local_id()).unwrap().link;
    let rtt = link.rtt_s.unwrap();
    eprintln!(
        "rtt through the 20 ms relay: {:.1} ms ({} samples)",
        rtt * 1e3,
        link.rtt_samples
    );
    assert!(rtt >= 2.0 * delay.as_secs_f64(), "{link:?}");
    assert!(rtt < 0.5, "{link:?}");
    // The other end measures the same link.
    let snapshot = wait_snapshot(&a, Duration::from_secs(5), "five ping samples", |s| {
        s.node(b.local_id())
            .is_some_and(|n| n.link.rtt_samples >= 5)
    })
    .await;
    assert!(snapshot.node(b.local_id()).unwrap().link.rtt_s.unwrap() >= 0.040);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_goes_silent_is_declared_gone_within_3s() {
    let (a, b, relay, _dirs) = pair_through_relay(Duration::ZERO).await;
    let mut a_events = a.events().await.unwrap();
    let mut b_events = b.events().await.unwrap();
    wait_snapshot(&a, Duration::from_secs(10), "the pair joined", |s| {
        s.nodes.len() == 1
    })
    .await;
    wait_snapshot(&b, Duration::from_secs(10), "the pair joined", |s| {
        s.nodes.len() == 1
    })
    .await;

    // Nothing gets through any more, and nothing is closed: only silence tells.
    let cut = Instant::now();
    relay.freeze();
    let reason = wait_left(&mut a_events, b.local_id(), Duration::from_secs(3)).await;
    let a_saw = cut.elapsed();
    let reason_b = wait_left(&mut b_events, a.local_id(), Duration::from_secs(3)).await;
    let b_saw = cut.elapsed();
    eprintln!("declared gone after {a_saw:?} (A) and {b_saw:?} (B)");
    assert!(
        matches!(reason, LeaveReason::Unresponsive { .. }),
        "{reason:?}"
    );
    assert!(
        matches!(reason_b, LeaveReason::Unresponsive { .. }),
        "{reason_b:?}"
    );
    assert!(a_saw <= Duration::from_secs(3) && b_saw <= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tcp_address_is_reported_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = tcp_config(dir.path(), &ClusterKey::generate());
    config.static_peers = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
    let node = Topology::start(config).await.unwrap();
    let snapshot = wait_snapshot(
        &node,
        Duration::from_secs(5),
        "an unreachable report",
        |s| {
            s.diagnostics
                .iter()
                .any(|d| matches!(d.problem, Some(Problem::Unreachable { .. })))
        },
    )
    .await;
    assert!(snapshot.to_string().contains("refused"), "{snapshot}");
}
