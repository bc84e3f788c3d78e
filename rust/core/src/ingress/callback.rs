//! Async-invocation callbacks (`POST /callback/<token>`), answered here without Python.
//!
//! The gateway calls an async function's result back to the `X-Callback-Url` fastconn gave it
//! (`<public_url>/callback/<token>`, the token an HMAC of the call id). Here the token is checked
//! (constant time) before any lookup, the call id is *claimed* in the [`CallbackTable`] of calls
//! Python expects, the body is read within its limit, and only a claimed callback reaches Python
//! (in a batch, [`super::IngressSink::callback`]), so each call settles exactly once:
//!
//! | case | answer |
//! |---|---|
//! | wrong or missing token / call id | 401 |
//! | missing or invalid `X-Function-Status` | 400 |
//! | call id never expected (or long forgotten) | 404 |
//! | call id already claimed (duplicate, or timed out) | 409 |
//! | claimed | 200, or 413 when the body is over `max_callback_bytes` (the call fails) |
//!
//! A call whose callback body is still arriving is not timed out ([`CallbackTable::forget`]
//! skips it): the callback settles it, or, should its client go away, the next sweep does.

use ring::hmac;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use subtle::ConstantTimeEq;

/// The path prefix callbacks arrive under.
pub const PREFIX: &str = "/callback/";
/// The gateway's callback headers.
pub const CALL_ID: &str = "x-call-id";
pub const STATUS: &str = "x-function-status";
/// Hex digits of the HMAC a token keeps (160 bits).
pub const TOKEN_HEX: usize = 40;

/// Why a callback was refused (counted for Python's metrics, not queued one by one: a flood of
/// forged callbacks must not grow the queue towards Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadToken = 0,
    BadRequest = 1,
    Unknown = 2,
    Duplicate = 3,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::BadToken,
        Refusal::BadRequest,
        Refusal::Unknown,
        Refusal::Duplicate,
    ];

    /// The `reason` label of `fastconn_callback_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::BadRequest => "bad_request",
            Refusal::Unknown => "unknown",
            Refusal::Duplicate => "duplicate",
        }
    }
}

/// What claiming a call id found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// It was pending and is now the caller's to settle.
    Claimed,
    /// Settled already (claimed by an earlier callback or forgotten by the timeout sweep).
    Duplicate,
    /// Never expected, or settled too long ago to be remembered.
    Unknown,
}

#[derive(Debug, Default)]
struct State {
    /// Expected calls, with the number of callbacks for each whose body is being read.
    pending: HashMap<Box<str>, u32>,
    settled: HashSet<Box<str>>,
    /// `settled` in the order the ids settled: the oldest is forgotten first.
    order: VecDeque<Box<str>>,
}

impl State {
    fn settle(&mut self, id: Box<str>, memory: usize) {
        if memory == 0 {
            return;
        }
        if self.settled.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > memory {
            if let Some(old) = self.order.pop_front() {
                self.settled.remove(&old);
            }
        }
    }
}

/// The calls Python expects a callback for, and the ids settled recently (to tell a duplicate,
/// 409, from an unknown id, 404). Python adds calls in batches before sending them (a callback
/// can arrive before the 202 does) and takes timed-out ones back with [`CallbackTable::forget`].
pub struct CallbackTable {
    key: hmac::Key,
    /// How many settled ids are remembered.
    memory: usize,
    state: Mutex<State>,
    /// Refusals since Python last took them, by [`Refusal`].
    refused: Mutex<[u64; 4]>,
}

impl std::fmt::Debug for CallbackTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackTable")
            .field("memory", &self.memory)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl CallbackTable {
    pub fn new(secret: &[u8], memory: usize) -> CallbackTable {
        CallbackTable {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            memory,
            state: Mutex::new(State::default()),
            refused: Mutex::new([0; 4]),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token of a call id: the first [`TOKEN_HEX`] hex digits of HMAC-SHA256(secret, id).
    pub fn token(&self, call_id: &[u8]) -> [u8; TOKEN_HEX] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = hmac::sign(&self.key, call_id);
        let mut out = [0u8; TOKEN_HEX];
        for (i, byte) in tag.as_ref().iter().take(TOKEN_HEX / 2).enumerate() {
            out[2 * i] = HEX[usize::from(byte >> 4)];
            out[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        out
    }

    /// Whether `token` is the call id's token (constant time in the token's content).
    pub fn token_matches(&self, call_id: &[u8], token: &[u8]) -> bool {
        !call_id.is_empty() && bool::from(self.token(call_id).as_slice().ct_eq(token))
    }

    /// Expects a callback for each of `ids`.
    pub fn expect<I: IntoIterator<Item = String>>(&self, ids: I) {
        let mut state = self.state();
        for id in ids {
            state.pending.entry(id.into_boxed_str()).or_insert(0);
        }
    }

    /// Claims `id`: the first claim of a pending id wins, every later one is a duplicate.
    pub fn claim(&self, id: &str) -> Claim {
        let mut state = self.state();
        self.claim_locked(&mut state, id)
    }

    fn claim_locked(&self, state: &mut State, id: &str) -> Claim {
        match state.pending.remove_entry(id) {
            Some((id, _)) => {
                state.settle(id, self.memory);
                Claim::Claimed
            }
            None if state.settled.contains(id) => Claim::Duplicate,
            None => Claim::Unknown,
        }
    }

    /// Starts receiving a callback for `id`: while the returned receipt lives, the sweep does
    /// not forget the call. `Err` when the id is not pending.
    pub fn receive(self: &Arc<Self>, id: &str) -> Result<Receipt, Claim> {
        let mut state = self.state();
        if let Some(receiving) = state.pending.get_mut(id) {
            *receiving += 1;
            return Ok(Receipt {
                table: Arc::clone(self),
                id: Some(id.into()),
            });
        }
        Err(if state.settled.contains(id) {
            Claim::Duplicate
        } else {
            Claim::Unknown
        })
    }

    /// Takes back each of `ids` that is still pending and has no callback arriving (the timeout
    /// sweep, a call that was never sent); says for each whether it was taken. An id not taken
    /// is the callback's to settle (claimed, or being received).
    pub fn forget(&self, ids: &[String]) -> Vec<bool> {
        let mut state = self.state();
        ids.iter()
            .map(|id| match state.pending.get(id.as_str()) {
                Some(0) => self.claim_locked(&mut state, id) == Claim::Claimed,
                _ => false,
            })
            .collect()
    }

    /// Counts a refusal; true when it is the first since [`CallbackTable::take_refused`] (the
    /// caller then tells Python there are refusals to take, once).
    pub fn refuse(&self, why: Refusal) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let first = refused.iter().all(|n| *n == 0);
        refused[why as usize] += 1;
        first
    }

    /// The refusals counted since the last call, by reason label (zeros left out).
    pub fn take_refused(&self) -> Vec<(&'static str, u64)> {
        let counts =
            std::mem::take(&mut *self.refused.lock().unwrap_or_else(PoisonError::into_inner));
        Refusal::ALL
            .iter()
            .filter(|r| counts[**r as usize] > 0)
            .map(|r| (r.label(), counts[*r as usize]))
            .collect()
    }

    /// Calls waiting for their callback.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }
}

/// A callback being received for a pending call ([`CallbackTable::receive`]).
#[derive(Debug)]
pub struct Receipt {
    table: Arc<CallbackTable>,
    id: Option<Box<str>>,
}

impl Receipt {
    /// Claims the call now that its body is read: `Duplicate` when a concurrent callback got
    /// there first.
    pub fn claim(mut self) -> Claim {
        let Some(id) = self.id.take() else {
            return Claim::Unknown;
        };
        let mut state = self.table.state();
        if let Some(receiving) = state.pending.get_mut(&*id) {
            *receiving = receiving.saturating_sub(1);
        }
        self.table.claim_locked(&mut state, &id)
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        // Not claimed (the client went away mid-body): the sweep may time the call out again.
        if let Some(id) = self.id.take() {
            if let Some(receiving) = self.table.state().pending.get_mut(&*id) {
                *receiving = receiving.saturating_sub(1);
            }
        }
    }
}

/// A `/callback/` route: the table its calls are claimed in and the body limit.
#[derive(Debug)]
pub struct CallbackRoute {
    pub table: Arc<CallbackTable>,
    pub max_body: usize,
}

/// A claimed callback for Python to settle, or word that refusals were counted.
#[derive(Debug)]
pub struct CallbackRecord {
    pub call_id: String,
    /// `"settled"`, `"too_large"` (claimed; the body was not read), or `"refused"`: take the
    /// counts with [`CallbackTable::take_refused`] (one such record per take, however many).
    pub outcome: &'static str,
    pub status: i64,
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
}

impl CallbackRecord {
    pub fn refused() -> CallbackRecord {
        CallbackRecord {
            call_id: String::new(),
            outcome: "refused",
            status: 0,
            headers: Vec::new(),
            body: bytes::Bytes::new(),
        }
    }
}

/// `X-Function-Status` as a number (surrounding spaces and a sign allowed, as Python's `int()`).
pub fn parse_status(value: Option<&[u8]>) -> Option<i64> {
    std::str::from_utf8(value?).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(memory: usize) -> Arc<CallbackTable> {
        Arc::new(CallbackTable::new(b"secret", memory))
    }

    #[test]
    fn the_token_is_the_hmac_python_computes() {
        // hmac.new(b"secret", b"abc", hashlib.sha256).hexdigest()[:40]
        let t = table(4);
        assert_eq!(
            &t.token(b"abc"),
            b"9946dad4e00e913fc8be8e5d3f7e110a4a9e832f"
        );
        assert!(t.token_matches(b"abc", b"9946dad4e00e913fc8be8e5d3f7e110a4a9e832f"));
        assert!(!t.token_matches(b"abc", b"9946dad4e00e913fc8be8e5d3f7e110a4a9e832e"));
        assert!(!t.token_matches(b"abc", b"9946dad4"));
        assert!(!t.token_matches(b"", &t.token(b"")));
    }

    #[test]
    fn a_call_is_claimed_once() {
        let t = table(16);
        t.expect(["a".to_owned(), "b".to_owned()]);
        assert_eq!(t.pending(), 2);
        assert_eq!(t.claim("a"), Claim::Claimed);
        assert_eq!(t.claim("a"), Claim::Duplicate);
        assert_eq!(t.claim("zzz"), Claim::Unknown);
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn concurrent_claims_settle_once() {
        let t = table(16);
        t.expect(["c".to_owned()]);
        let receipts: Vec<Receipt> = (0..50).map(|_| t.receive("c").expect("pending")).collect();
        let claims: Vec<Claim> = std::thread::scope(|s| {
            let handles: Vec<_> = receipts
                .into_iter()
                .map(|r| s.spawn(move || r.claim()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("claim thread"))
                .collect()
        });
        assert_eq!(claims.iter().filter(|c| **c == Claim::Claimed).count(), 1);
        assert_eq!(
            claims.iter().filter(|c| **c == Claim::Duplicate).count(),
            49
        );
        assert_eq!(t.receive("c").expect_err("not pending"), Claim::Duplicate);
    }

    #[test]
    fn the_memory_of_settled_ids_is_bounded() {
        let t = table(3);
        let ids: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        t.expect(ids.clone());
        for id in &ids {
            assert_eq!(t.claim(id), Claim::Claimed);
        }
        let state = t.state();
        assert_eq!(state.settled.len(), 3);
        assert_eq!(state.order.len(), 3);
        drop(state);
        assert_eq!(t.claim("9"), Claim::Duplicate);
        assert_eq!(
            t.claim("0"),
            Claim::Unknown,
            "the oldest settled id is forgotten"
        );
    }

    #[test]
    fn forget_takes_only_idle_pending_calls() {
        let t = table(16);
        t.expect(["idle".to_owned(), "arriving".to_owned(), "done".to_owned()]);
        let receipt = t.receive("arriving").expect("pending");
        assert_eq!(t.claim("done"), Claim::Claimed);
        let ids = ["idle", "arriving", "done", "never"].map(str::to_owned);
        assert_eq!(t.forget(&ids), vec![true, false, false, false]);
        assert_eq!(
            t.claim("idle"),
            Claim::Duplicate,
            "a timed-out call refuses its callback"
        );
        // The arriving callback wins over the sweep...
        assert_eq!(receipt.claim(), Claim::Claimed);
        // ...and one whose client went away leaves its call to the next sweep.
        t.expect(["gone".to_owned()]);
        drop(t.receive("gone").expect("pending"));
        assert_eq!(t.forget(&["gone".to_owned()]), vec![true]);
    }

    #[test]
    fn refusals_are_counted_and_announced_once_per_take() {
        let t = table(4);
        assert!(t.refuse(Refusal::BadToken));
        assert!(!t.refuse(Refusal::BadToken));
        assert!(!t.refuse(Refusal::Duplicate));
        assert_eq!(t.take_refused(), vec![("bad_token", 2), ("duplicate", 1)]);
        assert_eq!(t.take_refused(), vec![]);
        assert!(
            t.refuse(Refusal::Unknown),
            "the first after a take is announced again"
        );
    }

    #[test]
    fn status_is_read_as_python_reads_it() {
        assert_eq!(parse_status(Some(b" 200 ")), Some(200));
        assert_eq!(parse_status(Some(b"+503")), Some(503));
        assert_eq!(parse_status(Some(b"-1")), Some(-1));
        assert_eq!(parse_status(Some(b"2x0")), None);
        assert_eq!(parse_status(Some(b"")), None);
        assert_eq!(parse_status(None), None);
    }
}
