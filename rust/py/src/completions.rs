//! The completion queue (and the ingress's request queue) with its coalesced wake-up.
//!
//! Tokio threads push items and write the eventfd only when the Python side is *armed*
//! (it has drained since the last wake-up), so a burst of thousands of completions costs one
//! wake-up. The drain re-arms *before* taking the queue: a completion pushed after the take
//! sees the flag and writes again, so no completion is ever left without a wake-up.
//!
//! On a tokio thread the wake-up itself is deferred until that thread has run the tasks that
//! are ready now and polled its sockets once more: completions produced in the same turn
//! (callbacks read together, responses read together) then reach Python in one batch. Each
//! wake-up costs Python a loop iteration, an eventfd read and a drain; undeferred, async
//! callbacks (which settle one by one as they arrive) woke Python once per ~3 completions,
//! which cost it twice the CPU per message of a sync call.

use fastconn_core::{Completion, CompletionSink};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

pub struct WakeQueue<T> {
    queue: Mutex<Vec<T>>,
    armed: AtomicBool,
    fd: Arc<EventFd>,
}

/// The eventfd Python watches, closed when its last holder lets go: a deferred wake-up may
/// outlive the queue.
struct EventFd(RawFd);

impl EventFd {
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd, open while `self` lives.
        // EAGAIN (counter full) means a wake-up is already pending, which is all we need.
        unsafe {
            libc::write(self.0, std::ptr::from_ref(&one).cast(), 8);
        }
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed exactly once.
        unsafe {
            libc::close(self.0);
        }
    }
}

/// Signals its eventfd when dropped: after the deferring task ran, or unrun (the runtime is
/// shutting down), so a wake-up is never lost.
struct SignalOnDrop(Arc<EventFd>);

impl Drop for SignalOnDrop {
    fn drop(&mut self) {
        self.0.signal();
    }
}

/// The completion queue the engine reports to.
pub type CompletionQueue = WakeQueue<Completion>;

impl<T> WakeQueue<T> {
    pub fn new() -> std::io::Result<WakeQueue<T>> {
        // CLOEXEC: a subprocess must not inherit the wake fd; NONBLOCK: the loop's reader and
        // the writers never block on it.
        // SAFETY: plain syscall with constant flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(WakeQueue {
            queue: Mutex::new(Vec::with_capacity(1024)),
            armed: AtomicBool::new(true),
            fd: Arc::new(EventFd(fd)),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.0
    }

    /// Takes everything queued and re-arms the wake-up (see the module comment for the order).
    pub fn take(&self) -> Vec<T> {
        self.armed.store(true, Ordering::SeqCst);
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *queue)
    }

    /// Wakes Python: at once off tokio threads, else once this thread's ready work is done
    /// (`yield_now` reschedules after the runtime's next poll of its sockets).
    fn wake(&self) {
        let signal = SignalOnDrop(Arc::clone(&self.fd));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::task::yield_now().await;
                drop(signal);
            });
        }
    }
}

impl<T> WakeQueue<T> {
    /// Queues `item` and wakes the loop unless a wake-up is pending already.
    pub fn push(&self, item: T) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(item);
        if self.armed.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }
}

impl CompletionSink for CompletionQueue {
    fn complete(&self, completion: Completion) {
        self.push(completion);
    }
}
