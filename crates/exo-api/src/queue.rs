//! Admission control: at most `max_concurrent` generations run, at most `max_queued` wait for
//! a slot, and anything beyond is refused at once rather than left to pile up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The right to run one generation; the slot is freed when it is dropped.
pub(crate) type Slot = OwnedSemaphorePermit;

#[derive(Debug)]
pub(crate) struct Admission {
    running: Arc<Semaphore>,
    max_concurrent: usize,
    waiting: AtomicUsize,
    max_queued: usize,
}

impl Admission {
    pub(crate) fn new(max_concurrent: usize, max_queued: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Self {
            running: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            waiting: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// Waits for a slot, or fails with 429 when every slot is taken and the queue is full.
    /// Dropping the future (the client went away) leaves the queue.
    pub(crate) async fn admit(&self) -> Result<Slot, ApiError> {
        // Tokio's semaphore hands freed permits to waiters first, so this does not let a
        // newcomer overtake the queue.
        if let Ok(slot) = Arc::clone(&self.running).try_acquire_owned() {
            return Ok(slot);
        }
        let joined = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < self.max_queued).then_some(waiting + 1)
            });
        if joined.is_err() {
            return Err(ApiError::queue_full(self.max_concurrent, self.max_queued));
        }
        let _waiting = Waiting(&self.waiting);
        Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(|_| {
                // The semaphore is never closed; this is only reachable through a bug.
                tracing::error!("generation queue closed");
                ApiError::internal()
            })
    }

    /// Generations holding a slot now.
    pub(crate) fn running(&self) -> usize {
        self.max_concurrent
            .saturating_sub(self.running.available_permits())
    }

    /// Generations waiting for a slot now.
    pub(crate) fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// One place in the queue, given up when the wait ends either way.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn queue_refuses_beyond_its_size_and_frees_places_on_cancel() {
        let admission = Arc::new(Admission::new(1, 1));
        let running = admission.admit().await.unwrap();

        let waiter = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit().await.map(drop) }
        });
        while admission.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        let refused = admission.admit().await.unwrap_err();
        assert_eq!(refused.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);

        // A waiter that gives up frees its place in the queue.
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(admission.waiting.load(Ordering::Acquire), 0);

        drop(running);
        drop(admission.admit().await.unwrap());
    }
}
