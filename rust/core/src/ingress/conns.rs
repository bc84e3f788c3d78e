//! Open connections and the cap on them.
//!
//! A connection is *waiting* until its first request head arrives (over TLS, the handshake is
//! part of that wait), *busy* while a request is served (with HTTP/2, while any of its streams
//! is), *idle* between requests. At the cap a new connection evicts the oldest waiting one
//! (the kind a slowloris opens by the thousand), else the oldest idle one, so probes and real
//! senders keep getting in; when every connection is busy, the new one is closed at once.
//! Closing rather than not accepting keeps the kernel's accept queue from filling with sockets
//! nobody will serve.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const WAITING: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// One connection's state, shared by its task, its requests and the tracker.
pub(crate) struct Conn {
    id: u64,
    phase: AtomicU8,
    /// Requests being served now (several at once on an HTTP/2 connection).
    active: AtomicUsize,
    /// Milliseconds since `origin` when the phase last changed.
    since_ms: AtomicU64,
    origin: Instant,
    /// Notified when the connection is evicted: its task closes it.
    pub(crate) evicted: Notify,
}

impl Conn {
    /// A request is being served until the guard drops (also when its future is dropped: an
    /// HTTP/2 client may reset a stream at any time); the connection is idle once none is left.
    pub(crate) fn serving(self: &Arc<Self>) -> Serving {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.set(BUSY);
        Serving(Arc::clone(self))
    }

    fn set(&self, phase: u8) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(now, Ordering::Release);
        self.phase.store(phase, Ordering::Release);
    }

    /// When the connection expires in its current phase (None while busy).
    pub(crate) fn deadline(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<Instant> {
        let since = self.origin + Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        match self.phase.load(Ordering::Acquire) {
            WAITING => Some(since + header_timeout),
            IDLE => Some(since + idle_timeout),
            _ => None,
        }
    }

    pub(crate) fn waiting(&self) -> bool {
        self.phase.load(Ordering::Acquire) == WAITING
    }
}

/// See [`Conn::serving`].
pub(crate) struct Serving(Arc<Conn>);

impl Drop for Serving {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.set(IDLE);
        }
    }
}

/// Counters of what the tracker did, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    pub open: usize,
    pub evicted: u64,
    pub refused: u64,
    pub timed_out: u64,
}

pub(crate) struct Tracker {
    max: usize,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

/// Removes its connection from the tracker when the connection's task ends.
pub(crate) struct Admitted {
    tracker: Arc<Tracker>,
    pub(crate) conn: Arc<Conn>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.tracker
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.conn.id);
    }
}

impl Tracker {
    pub(crate) fn new(max: usize) -> Tracker {
        Tracker {
            max,
            open: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }

    /// Admits a new connection, evicting one at the cap; None when every connection is busy.
    /// Called by the accept loop, in accept order, so "oldest" means first accepted.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= self.max {
            // Ids grow with time, so the map's order is oldest first.
            let victim = open
                .values()
                .find(|c| c.waiting())
                .or_else(|| {
                    open.values()
                        .find(|c| c.phase.load(Ordering::Acquire) == IDLE)
                })
                .map(|c| c.id);
            let Some(victim) = victim else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if let Some(conn) = open.remove(&victim) {
                // notify_one keeps a permit: the task sees it even if it is not waiting yet.
                conn.evicted.notify_one();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            phase: AtomicU8::new(WAITING),
            active: AtomicUsize::new(0),
            since_ms: AtomicU64::new(0),
            origin: Instant::now(),
            evicted: Notify::new(),
        });
        open.insert(conn.id, Arc::clone(&conn));
        Some(Admitted {
            tracker: Arc::clone(self),
            conn,
        })
    }

    pub(crate) fn timed_out(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn counts(&self) -> ConnectionCounts {
        ConnectionCounts {
            open: self.open.lock().map(|o| o.len()).unwrap_or(0),
            evicted: self.evicted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_with_concurrent_requests_is_idle_only_when_the_last_one_ends() {
        let tracker = Arc::new(Tracker::new(2));
        let a = tracker.admit().expect("a");
        let first = a.conn.serving();
        let second = a.conn.serving();
        drop(first);
        assert_eq!(a.conn.phase.load(Ordering::Acquire), BUSY);
        drop(second);
        assert_eq!(a.conn.phase.load(Ordering::Acquire), IDLE);
    }

    #[test]
    fn at_the_cap_the_oldest_waiting_connection_goes_first_then_the_oldest_idle() {
        let tracker = Arc::new(Tracker::new(3));
        let a = tracker.admit().expect("a");
        let b = tracker.admit().expect("b");
        let c = tracker.admit().expect("c");
        let _a_busy = a.conn.serving();
        drop(b.conn.serving()); // served one request, now idle
                                // c is the only one still waiting for its first head: it goes.
        let d = tracker.admit().expect("d");
        assert_eq!(tracker.counts().evicted, 1);
        assert!(!tracker.open.lock().expect("lock").contains_key(&c.conn.id));
        let _d_busy = d.conn.serving();
        // Nobody waits now; b is idle: it goes.
        let e = tracker.admit().expect("e");
        assert!(!tracker.open.lock().expect("lock").contains_key(&b.conn.id));
        let _e_busy = e.conn.serving();
        // Everyone busy: refused.
        assert!(tracker.admit().is_none());
        assert_eq!(tracker.counts().refused, 1);
        drop(a);
        assert_eq!(tracker.counts().open, 2);
    }
}
