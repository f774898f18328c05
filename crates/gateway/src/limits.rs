//! Admission: at most `max_concurrent` generations run and at most `max_queue` requests wait
//! for a slot; one more is refused at once with 429.
//!
//! - [`Limits::admit`] takes a free slot, or joins the FIFO queue (tokio's semaphore is fair),
//!   or fails with [`ApiError::Overloaded`];
//! - the [`Slot`] moves into the blocking task that runs the generation and frees the slot when
//!   that task ends, so the limit bounds engine work, not HTTP handlers;
//! - a request that leaves the queue (client gone) gives its place back: `admit` is cancel-safe.

use crate::error::ApiError;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The admission state of one gateway.
pub struct Limits {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    retry_after: Duration,
    queue_depth: Gauge,
    in_flight: Gauge,
}

/// A running generation's slot; dropping it lets the next queued request in.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// Counts one queued request while it waits (dropped on admission or when the client leaves).
struct Waiting<'a>(&'a Limits);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.queue_depth.dec();
    }
}

impl Limits {
    pub fn new(
        max_concurrent: usize,
        max_queue: usize,
        retry_after: Duration,
        queue_depth: Gauge,
        in_flight: Gauge,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            waiting: AtomicUsize::new(0),
            max_queue,
            retry_after,
            queue_depth,
            in_flight,
        }
    }

    /// Waits for a generation slot. Cancel-safe: dropping the future leaves the queue.
    pub async fn admit(&self) -> Result<Slot, ApiError> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(ApiError::Overloaded {
                        retry_after: self.retry_after,
                    });
                }
                self.queue_depth.inc();
                let _waiting = Waiting(self);
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?
            }
        };
        self.in_flight.inc();
        Ok(Slot {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        })
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(concurrent: usize, queue: usize) -> Limits {
        Limits::new(
            concurrent,
            queue,
            Duration::from_secs(1),
            Gauge::default(),
            Gauge::default(),
        )
    }

    #[tokio::test]
    async fn queues_then_refuses() {
        let l = Arc::new(limits(1, 1));
        let first = l.admit().await.unwrap();
        let l2 = l.clone();
        let queued = tokio::spawn(async move { l2.admit().await.map(|_| ()) });
        while l.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(l.admit().await, Err(ApiError::Overloaded { .. })));
        drop(first);
        queued.await.unwrap().unwrap();
        assert_eq!(l.waiting(), 0);
    }

    #[tokio::test]
    async fn leaving_the_queue_frees_the_place() {
        let l = limits(1, 1);
        let _first = l.admit().await.unwrap();
        {
            let fut = l.admit();
            tokio::pin!(fut);
            assert!(futures::poll!(fut.as_mut()).is_pending());
            assert_eq!(l.waiting(), 1);
        }
        assert_eq!(l.waiting(), 0);
        assert_eq!(l.queue_depth.get(), 0);
    }
}
