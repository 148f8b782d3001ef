//! The live view behind `GET /v1/cluster/events`: one task per engine rebuilds the cluster view
//! whenever something it shows changes (membership, the plan, readiness, a load starting or
//! ending), and once a second while someone watches (the stages' figures, loading progress,
//! memory), and publishes it only when it differs from the last one.

use std::sync::Arc;
use std::time::Duration;

use exo_api::ClusterView;
use exo_topology::{EventStream, TopologyEvent};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How often a watched view is rebuilt when nothing else asks for it.
const REFRESH: Duration = Duration::from_secs(1);

/// Why the view may have changed.
#[derive(Debug)]
pub(crate) enum Wake {
    /// Membership changed.
    Membership(Box<TopologyEvent>),
    /// Something else the view shows changed (the plan, readiness, a load).
    Changed,
}

/// What the live task asks of an engine.
pub(crate) trait ViewSource: Send + Sync + 'static {
    /// The view now.
    fn view(&self) -> BoxFuture<'_, ClusterView>;

    /// Takes note of a membership event before the view is rebuilt.
    fn observe(&self, _event: &TopologyEvent) {}
}

/// What wakes the task; it ends when every source has ended.
pub(crate) type Wakes = BoxStream<'static, Wake>;

/// Wakes once each time `rx` changes; ends when its sender is gone.
pub(crate) fn changes<T: Send + Sync + 'static>(rx: watch::Receiver<T>) -> Wakes {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some((Wake::Changed, rx))
    })
    .boxed()
}

/// Wakes with each membership event.
pub(crate) fn membership(events: EventStream) -> Wakes {
    events
        .map(|event| Wake::Membership(Box::new(event)))
        .boxed()
}

/// A running live view; dropping it stops its task.
#[derive(Debug)]
pub(crate) struct LiveView {
    rx: watch::Receiver<ClusterView>,
    _stop: DropGuard,
}

impl LiveView {
    /// The view, and its changes from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<ClusterView> {
        self.rx.clone()
    }
}

/// Starts the live view of `source` on the current tokio runtime (`None` outside one): the
/// task first awaits `wakes` (subscribing to membership is asynchronous), then builds a view
/// at once and again on every wake.
pub(crate) fn start(
    source: Arc<dyn ViewSource>,
    wakes: BoxFuture<'static, Wakes>,
) -> Option<LiveView> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let first = ClusterView {
        status: "reading the cluster's state".to_owned(),
        ..ClusterView::default()
    };
    let (tx, rx) = watch::channel(first);
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    runtime.spawn(async move {
        cancelled.run_until_cancelled(run(source, wakes, tx)).await;
    });
    Some(LiveView {
        rx,
        _stop: stop.drop_guard(),
    })
}

async fn run(
    source: Arc<dyn ViewSource>,
    wakes: BoxFuture<'static, Wakes>,
    tx: watch::Sender<ClusterView>,
) {
    let mut wakes = wakes.await;
    let mut ticks = tokio::time::interval(REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let view = source.view().await;
        tx.send_if_modified(|shown| {
            let changed = *shown != view;
            if changed {
                *shown = view;
            }
            changed
        });
        // Wait for a reason to look again.
        loop {
            tokio::select! {
                wake = wakes.next() => match wake {
                    Some(Wake::Membership(event)) => {
                        source.observe(&event);
                        break;
                    }
                    Some(Wake::Changed) => break,
                    None => return,
                },
                // The engine's own receiver is always there: more means someone watches.
                _ = ticks.tick() => if tx.receiver_count() > 1 {
                    break;
                },
            }
        }
    }
}
