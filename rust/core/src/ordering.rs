//! Per-key ordering: at most one message per key in flight, the rest wait in submission order
//! while other keys run in parallel. Shared by every source that offers key ordering (Kafka
//! keys, JetStream subjects or headers, RabbitMQ routing keys).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// The waiting lines of busy keys. A key is present while one of its messages is in flight.
pub struct KeyedQueue<T> {
    lines: Mutex<HashMap<Bytes, VecDeque<T>>>,
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
                line.push_back(item);
                None
            }
            None => {
                lines.insert(key.clone(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The key's in-flight message finished: returns the next one to start, if any; the key
    /// becomes idle when its line is empty.
    pub fn release(&self, key: &Bytes) -> Option<T> {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = lines.get_mut(key).and_then(VecDeque::pop_front);
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
}
