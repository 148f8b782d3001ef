//! Where tokens for the requests that came in at this node arrive: one inbox per request,
//! fed by every stage's deliveries (a stage in this process hands them over directly; a
//! remote stage's subscription stream is read by a task).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use exo_core::{Epoch, RequestId, StageFailure, TokenOut};
use tokio::sync::mpsc;

/// The inboxes of the requests in flight at this node.
#[derive(Debug, Default)]
pub(crate) struct Inboxes {
    open: Mutex<HashMap<RequestId, (Epoch, mpsc::UnboundedSender<TokenOut>)>>,
}

impl Inboxes {
    /// Opens `request`'s inbox (running under `epoch`); it closes when the [`Inbox`] drops.
    pub(crate) fn open(self: &Arc<Self>, request: RequestId, epoch: Epoch) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut open) = self.open.lock() {
            open.insert(request, (epoch, tx));
        }
        Inbox {
            request,
            rx,
            inboxes: Arc::clone(self),
        }
    }

    /// Hands each item to its request's inbox; items for requests no longer here (a token
    /// that crossed a cancellation) are dropped.
    pub(crate) fn deliver(&self, items: impl IntoIterator<Item = TokenOut>) {
        let Ok(open) = self.open.lock() else { return };
        for item in items {
            if let Some((_, tx)) = open.get(&item.request()) {
                let _ = tx.send(item);
            }
        }
    }

    /// Fails every request running under `epoch` with `failure` (a stage of that plan was
    /// lost). Returns how many were failed.
    pub(crate) fn fail_epoch(&self, epoch: Epoch, failure: &StageFailure) -> usize {
        let Ok(open) = self.open.lock() else { return 0 };
        let mut failed = 0;
        for (request, (at, tx)) in open.iter() {
            if *at == epoch {
                failed += 1;
                let _ = tx.send(TokenOut::Failed {
                    request: *request,
                    failure: failure.clone(),
                });
            }
        }
        failed
    }

    /// Requests with an open inbox.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }

    fn close(&self, request: RequestId) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&request);
        }
    }
}

/// One request's inbox.
#[derive(Debug)]
pub(crate) struct Inbox {
    request: RequestId,
    rx: mpsc::UnboundedReceiver<TokenOut>,
    inboxes: Arc<Inboxes>,
}

impl Inbox {
    /// The next item for the request (`None` never happens while the inbox is open).
    pub(crate) async fn recv(&mut self) -> Option<TokenOut> {
        self.rx.recv().await
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.inboxes.close(self.request);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use exo_core::{FailureKind, LayerRange, NodeId};

    use super::*;

    #[tokio::test]
    async fn items_reach_their_request_and_a_lost_plan_fails_only_its_requests() {
        let inboxes = Arc::new(Inboxes::default());
        let (e1, e2) = (Epoch::from_hash(1), Epoch::from_hash(2));
        let mut a = inboxes.open(RequestId(1), e1);
        let mut b = inboxes.open(RequestId(2), e2);
        inboxes.deliver([
            TokenOut::Token {
                request: RequestId(2),
                token: 7,
                position: 3,
                logprob: None,
            },
            TokenOut::Token {
                request: RequestId(9),
                token: 1,
                position: 1,
                logprob: None,
            },
        ]);
        assert_eq!(
            b.recv().await,
            Some(TokenOut::Token {
                logprob: None,
                request: RequestId(2),
                token: 7,
                position: 3
            })
        );
        let failure = StageFailure {
            node: NodeId::from("n"),
            stage: 0,
            layers: LayerRange::new(0, 4),
            epoch: e1,
            kind: FailureKind::Lost,
            reason: "gone".into(),
        };
        assert_eq!(inboxes.fail_epoch(e1, &failure), 1);
        assert!(matches!(a.recv().await, Some(TokenOut::Failed { .. })));
        assert_eq!(inboxes.len(), 2);
        drop(a);
        drop(b);
        assert_eq!(inboxes.len(), 0);
    }
}
