//! Per-key ordering: at most one message per key in flight, the rest wait in submission order
//! while other keys run in parallel. Shared by every source that offers key ordering (Kafka
//! keys, JetStream subjects or headers, RabbitMQ routing keys).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// The waiting lines of busy keys. A key is present while one of its messages is in flight or
/// holds it (a completed message whose caller will resume or release it).
pub struct KeyedQueue<T> {
    lines: Mutex<HashMap<Bytes, Line<T>>>,
}

struct Line<T> {
    waiting: VecDeque<T>,
    /// The key's message completed and the key stays held for its caller: only then may the
    /// caller release it. Releasing a key whose message is still in flight would let the next
    /// message overtake it.
    held: bool,
}

impl<T> Default for KeyedQueue<T> {
    fn default() -> Self {
        KeyedQueue {
            lines: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> KeyedQueue<T> {
    /// Returns the item back when its key is idle (the caller starts it now), or `None` when it
    /// was queued behind the key's in-flight message.
    pub fn admit(&self, key: &Bytes, item: T) -> Option<T> {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match lines.get_mut(key) {
            Some(line) => {
                line.waiting.push_back(item);
                None
            }
            None => {
                let line = Line {
                    waiting: VecDeque::new(),
                    held: false,
                };
                lines.insert(key.clone(), line);
                Some(item)
            }
        }
    }

    /// The key's message completed and its caller keeps the key (it will resume or release).
    pub fn hold(&self, key: &Bytes) {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let line = lines.entry(key.clone()).or_insert_with(|| Line {
            waiting: VecDeque::new(),
            held: false,
        });
        line.held = true;
    }

    /// A message resumes the key held for it: the key is in flight again.
    pub fn resume(&self, key: &Bytes) {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(line) = lines.get_mut(key) {
            line.held = false;
        }
    }

    /// Releases a held key: `Err(())` when the key is not held (idle, or its message is still
    /// in flight), which changes nothing; otherwise like [`KeyedQueue::release`].
    #[allow(clippy::result_unit_err)]
    pub fn release_held(&self, key: &Bytes) -> Result<Option<T>, ()> {
        {
            let mut lines = self
                .lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match lines.get_mut(key) {
                Some(line) if line.held => line.held = false,
                _ => return Err(()),
            }
        }
        Ok(self.release(key))
    }

    /// The key's in-flight message finished: returns the next one to start, if any; the key
    /// becomes idle when its line is empty.
    pub fn release(&self, key: &Bytes) -> Option<T> {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = lines.get_mut(key).and_then(|line| line.waiting.pop_front());
        if next.is_none() {
            lines.remove(key);
        }
        next
    }

    /// Number of keys with a message in flight.
    pub fn busy_keys(&self) -> usize {
        self.lines.lock().map(|l| l.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_flight_per_key_in_order() {
        let q = KeyedQueue::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        assert_eq!(q.admit(&a, 1), Some(1));
        assert_eq!(q.admit(&a, 2), None);
        assert_eq!(q.admit(&b, 10), Some(10), "other keys are not blocked");
        assert_eq!(q.admit(&a, 3), None);
        assert_eq!(q.busy_keys(), 2);
        assert_eq!(q.release(&a), Some(2));
        assert_eq!(q.release(&a), Some(3));
        assert_eq!(q.release(&a), None);
        assert_eq!(q.release(&b), None);
        assert_eq!(q.busy_keys(), 0);
        assert_eq!(q.admit(&a, 4), Some(4), "an idle key starts at once");
    }

    #[test]
    fn only_a_held_key_can_be_released_by_its_caller() {
        let q = KeyedQueue::default();
        let a = Bytes::from_static(b"a");
        assert_eq!(q.admit(&a, 1), Some(1));
        assert_eq!(q.admit(&a, 2), None);
        assert_eq!(q.release_held(&a), Err(()), "1 is still in flight");
        q.hold(&a);
        q.resume(&a);
        assert_eq!(q.release_held(&a), Err(()), "resumed: in flight again");
        q.hold(&a);
        assert_eq!(q.release_held(&a), Ok(Some(2)));
        assert_eq!(q.release_held(&a), Err(()), "2 is in flight");
        assert_eq!(q.release_held(&Bytes::from_static(b"idle")), Err(()));
    }
}
