//! Owned background work: every task a node starts is tracked and stops on one cancellation,
//! so shutdown waits for them instead of aborting handles by their place in a list.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The tasks of one node (or of one part of it, via [`Tasks::child`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// Runs `work` until it ends or the tasks are cancelled.
    pub(crate) fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            cancel.run_until_cancelled(work).await;
        });
    }

    /// Runs `work`, which watches [`Tasks::cancelled`] itself and winds down on its own (a
    /// server's graceful shutdown); [`Tasks::shut_down`] waits for it, up to its timeout.
    pub(crate) fn spawn_detached<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
    }

    /// Tasks cancelled with these or on their own (for work that belongs to a plan).
    pub(crate) fn child(&self) -> Tasks {
        Tasks {
            tracker: self.tracker.clone(),
            cancel: self.cancel.child_token(),
        }
    }

    /// Cancels these tasks (and their children's).
    pub(crate) fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Resolves once these tasks are cancelled.
    pub(crate) async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Cancels everything and waits, up to `grace`, for every tracked task to end. Returns
    /// whether they all did.
    pub(crate) async fn shut_down(&self, grace: std::time::Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}
