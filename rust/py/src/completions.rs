//! The completion queue (and the ingress's request queue) with its coalesced wake-up.
//!
//! Tokio threads push items and write the eventfd only when the Python side is *armed*
//! (it has drained since the last wake-up), so a burst of thousands of completions costs one
//! wake-up. The drain re-arms *before* taking the queue: a completion pushed after the take
//! sees the flag and writes again, so no completion is ever left without a wake-up.

use fastconn_core::{Completion, CompletionSink};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

pub struct WakeQueue<T> {
    queue: Mutex<Vec<T>>,
    armed: AtomicBool,
    fd: RawFd,
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
            fd,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Takes everything queued and re-arms the wake-up (see the module comment for the order).
    pub fn take(&self) -> Vec<T> {
        self.armed.store(true, Ordering::SeqCst);
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *queue)
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. EAGAIN (counter full)
        // means a wake-up is already pending, which is all we need.
        unsafe {
            libc::write(self.fd, std::ptr::from_ref(&one).cast(), 8);
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

impl<T> Drop for WakeQueue<T> {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed exactly once.
        unsafe {
            libc::close(self.fd);
        }
    }
}
