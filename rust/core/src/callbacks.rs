//! Async invocations, owned by the core end to end, and their callbacks (`POST /callback/<token>`).
//!
//! An async call ([`AsyncCalls`]) posts the message to the function's `/async-function/` form
//! with a call id made here and `X-Callback-Url: <public_url>/callback/<token>`, the token an
//! HMAC of the call id. On the gateway's 202 the call gives its HTTP permits back and waits for
//! its callback in the [`CallbackTable`]; the callback's status and body are then the attempt's
//! result, so retries, key ordering and the message's completion are the ones sync calls have,
//! and Python sees one completion per message. No callback within the timeout: the attempt
//! failed with a timeout (retryable).
//!
//! The ingress checks each callback's token (constant time) before any lookup, *claims* the
//! call id in the table, reads the body within its limit and hands the result to the waiting
//! call, so each call settles exactly once:
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
//! skips it): the callback settles it, or, should its client go away, the next check does.

use crate::http::Attempt;
use crate::message::ErrorKind;
use crate::retry::RetryPolicy;
use crate::stats::{StatsSnapshot, TargetStats};
use bytes::Bytes;
use ring::hmac;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, Semaphore};

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
    /// Claimed, but its body was over the limit (its call fails).
    TooLarge = 4,
    /// No callback came within the timeout (its call is retried or fails).
    Timeout = 5,
}

impl Refusal {
    pub const COUNT: usize = 6;
    pub const ALL: [Refusal; Refusal::COUNT] = [
        Refusal::BadToken,
        Refusal::BadRequest,
        Refusal::Unknown,
        Refusal::Duplicate,
        Refusal::TooLarge,
        Refusal::Timeout,
    ];

    /// The `reason` label of `fastconn_callback_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::BadRequest => "bad_request",
            Refusal::Unknown => "unknown",
            Refusal::Duplicate => "duplicate",
            Refusal::TooLarge => "too_large",
            Refusal::Timeout => "timeout",
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

/// What a claimed callback brought: the function's status and answer.
#[derive(Debug, Clone, Default)]
pub struct CallbackResult {
    pub status: i64,
    /// Kept as parsed: converted only for a call that captures its result.
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The body was over the route's limit and not read: the call fails (413) for good, with
    /// `body` saying so.
    pub too_large: bool,
}

/// Where a pending call's callback goes: the call waiting in the core, if any.
type Waiter = oneshot::Sender<CallbackResult>;

#[derive(Debug, Default)]
struct Pending {
    /// Callbacks for this call whose body is being read.
    receiving: u32,
    waiter: Option<Waiter>,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<Box<str>, Pending>,
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

/// The calls waiting for a callback, and the ids settled recently (to tell a duplicate, 409,
/// from an unknown id, 404). A call is expected before it is sent (a callback can arrive before
/// the 202 does) and taken back with [`CallbackTable::forget`] when no callback will come.
pub struct CallbackTable {
    key: hmac::Key,
    /// How many settled ids are remembered.
    memory: usize,
    state: Mutex<State>,
    /// Refusals so far, by [`Refusal`].
    refused: [AtomicU64; Refusal::COUNT],
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
            refused: Default::default(),
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

    /// Expects a callback for each of `ids`, with nobody waiting for it.
    #[cfg(test)]
    pub fn expect<I: IntoIterator<Item = String>>(&self, ids: I) {
        let mut state = self.state();
        for id in ids {
            state.pending.entry(id.into_boxed_str()).or_default();
        }
    }

    /// Expects a callback for `id`; its result arrives on the returned receiver.
    pub fn wait_for(&self, id: &str) -> oneshot::Receiver<CallbackResult> {
        let (sender, receiver) = oneshot::channel();
        self.state().pending.insert(
            id.into(),
            Pending {
                receiving: 0,
                waiter: Some(sender),
            },
        );
        receiver
    }

    /// Claims `id` and hands `result` to the call waiting for it: the first claim of a pending
    /// id wins, every later one is a duplicate.
    pub fn complete(&self, id: &str, result: CallbackResult) -> Claim {
        let mut state = self.state();
        self.complete_locked(&mut state, id, result)
    }

    /// Claims `id` without a result (the waiting call, if any, sees its sender gone).
    #[cfg(test)]
    pub fn claim(&self, id: &str) -> Claim {
        self.complete(id, CallbackResult::default())
    }

    fn complete_locked(&self, state: &mut State, id: &str, result: CallbackResult) -> Claim {
        match state.pending.remove_entry(id) {
            Some((id, pending)) => {
                state.settle(id, self.memory);
                if let Some(waiter) = pending.waiter {
                    // The call may have gone (the runtime is closing): nobody to tell then.
                    let _ = waiter.send(result);
                }
                Claim::Claimed
            }
            None if state.settled.contains(id) => Claim::Duplicate,
            None => Claim::Unknown,
        }
    }

    /// Starts receiving a callback for `id`: while the returned receipt lives, the call is not
    /// timed out. `Err` when the id is not pending.
    pub fn receive(self: &Arc<Self>, id: &str) -> Result<Receipt, Claim> {
        if self.begin_receiving(id) {
            return Ok(Receipt {
                table: Arc::clone(self),
                id: Some(id.into()),
            });
        }
        Err(if self.state().settled.contains(id) {
            Claim::Duplicate
        } else {
            Claim::Unknown
        })
    }

    /// Counts a callback for `id` whose body is being read (a server outside the ingress);
    /// false when the id is not pending. Pair with [`CallbackTable::end_receiving`].
    pub fn begin_receiving(&self, id: &str) -> bool {
        match self.state().pending.get_mut(id) {
            Some(pending) => {
                pending.receiving += 1;
                true
            }
            None => false,
        }
    }

    /// The body of a callback counted by [`CallbackTable::begin_receiving`] is read (or its
    /// client went away).
    pub fn end_receiving(&self, id: &str) {
        if let Some(pending) = self.state().pending.get_mut(id) {
            pending.receiving = pending.receiving.saturating_sub(1);
        }
    }

    /// Takes back each of `ids` that is still pending and has no callback arriving (a call
    /// timed out, or not accepted); says for each whether it was taken. An id not taken is the
    /// callback's to settle (claimed, or being received).
    pub fn forget(&self, ids: &[&str]) -> Vec<bool> {
        let mut state = self.state();
        ids.iter()
            .map(|id| match state.pending.get(*id) {
                Some(pending) if pending.receiving == 0 => {
                    if let Some((id, _)) = state.pending.remove_entry(*id) {
                        state.settle(id, self.memory);
                    }
                    true
                }
                _ => false,
            })
            .collect()
    }

    /// Counts a refusal (or a timeout).
    pub fn refuse(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The refusals so far, by reason label (zeros left out).
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (r.label(), self.refused[*r as usize].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
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
    /// Claims the call now that its body is read and hands it the result: `Duplicate` when a
    /// concurrent callback got there first.
    pub fn complete(mut self, result: CallbackResult) -> Claim {
        let Some(id) = self.id.take() else {
            return Claim::Unknown;
        };
        let mut state = self.table.state();
        if let Some(pending) = state.pending.get_mut(&*id) {
            pending.receiving = pending.receiving.saturating_sub(1);
        }
        self.table.complete_locked(&mut state, &id, result)
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        // Not claimed (the client went away mid-body): the call may time out again.
        if let Some(id) = self.id.take() {
            self.table.end_receiving(&id);
        }
    }
}

/// A `/callback/` route: the table its calls are claimed in and the body limit.
#[derive(Debug)]
pub struct CallbackRoute {
    pub table: Arc<CallbackTable>,
    pub max_body: usize,
}

/// `X-Function-Status` as a number (surrounding spaces and a sign allowed, as Python's `int()`).
pub fn parse_status(value: Option<&[u8]>) -> Option<i64> {
    std::str::from_utf8(value?).ok()?.trim().parse().ok()
}

/// How async calls settle: on their callback (the default), or on the gateway's 202 as the
/// OpenFaaS connectors do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    OnCallback,
    OnAccept,
}

/// The settings of async calls, as Python configures them.
#[derive(Debug, Clone)]
pub struct AsyncSettings {
    /// `<public_url>/callback/`: a call's token completes its callback URL.
    pub callback_base: String,
    pub timeout: Duration,
    /// Calls waiting for their callback at most; when full, async calls wait before being sent.
    pub max_pending: usize,
    pub ack: AckMode,
    /// Re-invocations of an async call (a failed callback, a timeout, a refused invocation).
    pub retry: RetryPolicy,
}

/// Async calls in the core: call ids, the pending bound and the wait for each callback.
#[derive(Debug)]
pub struct AsyncCalls {
    pub table: Arc<CallbackTable>,
    pub settings: AsyncSettings,
    pending: Semaphore,
    /// Call ids: a random prefix drawn once, then a counter. Nothing trusts an id to be
    /// unguessable: a callback's token is an HMAC of it.
    id_prefix: String,
    next_id: AtomicU64,
    /// Callbacks received, by function: their status and the time from invocation.
    stats: Mutex<HashMap<Arc<str>, Arc<TargetStats>>>,
}

/// A call sent and expecting its callback; dropped unsettled, it takes itself back.
pub(crate) struct PendingCall<'a> {
    calls: &'a AsyncCalls,
    pub call_id: String,
    /// `X-Callback-Url`.
    pub callback_url: String,
    waiter: oneshot::Receiver<CallbackResult>,
    stats: Arc<TargetStats>,
    invoked: Instant,
    /// The pending slot, given back when the call is settled (`None` only if the semaphore
    /// were closed, which it never is).
    _slot: Option<tokio::sync::SemaphorePermit<'a>>,
    done: bool,
}

impl AsyncCalls {
    pub fn new(table: Arc<CallbackTable>, settings: AsyncSettings) -> AsyncCalls {
        AsyncCalls {
            table,
            pending: Semaphore::new(settings.max_pending.clamp(1, Semaphore::MAX_PERMITS)),
            settings,
            id_prefix: format!("{:016x}", fastrand::u64(..)),
            next_id: AtomicU64::new(0),
            stats: Mutex::new(HashMap::new()),
        }
    }

    fn stats_of(&self, function: &Arc<str>) -> Arc<TargetStats> {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            stats
                .entry(Arc::clone(function))
                .or_insert_with(|| Arc::new(TargetStats::new())),
        )
    }

    /// The callbacks received so far, by function (read at scrape time).
    pub fn stats(&self) -> Vec<StatsSnapshot> {
        let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.iter().map(|(f, s)| s.snapshot(f)).collect()
    }

    /// Whether calls wait for their callback (else the 202 settles them).
    pub fn holds(&self) -> bool {
        self.settings.ack == AckMode::OnCallback
    }

    /// Takes a pending slot (waiting while `max_pending` calls wait for callbacks) and expects
    /// the new call's callback before it is sent: a callback can beat the 202.
    pub(crate) async fn begin(&self, function: &Arc<str>) -> PendingCall<'_> {
        let slot = self.pending.acquire().await.ok();
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let call_id = format!("{}{n:016x}", self.id_prefix);
        let token = self.table.token(call_id.as_bytes());
        let mut callback_url = String::with_capacity(self.settings.callback_base.len() + TOKEN_HEX);
        callback_url.push_str(&self.settings.callback_base);
        callback_url.push_str(std::str::from_utf8(&token).unwrap_or_default());
        let waiter = self.table.wait_for(&call_id);
        PendingCall {
            stats: self.stats_of(function),
            invoked: Instant::now(),
            calls: self,
            call_id,
            callback_url,
            waiter,
            _slot: slot,
            done: false,
        }
    }
}

impl PendingCall<'_> {
    /// The attempt's result once the invocation was answered with `accepted`: the callback's,
    /// or a timeout. An invocation not accepted gets no callback (unless one came already).
    pub(crate) async fn settle(mut self, accepted: Attempt, capture: bool) -> Attempt {
        // Not accepted: no callback will come, unless one claimed the call before the
        // invocation's answer arrived (then it counts).
        let accepted_ok = accepted.error == ErrorKind::None && accepted.status == 202;
        if !accepted_ok && self.take_back() {
            return not_accepted(accepted);
        }
        let timeout = self.calls.settings.timeout;
        let mut waited = tokio::time::timeout(timeout, &mut self.waiter).await;
        loop {
            match waited {
                Ok(Ok(result)) => {
                    self.done = true;
                    let attempt = callback_attempt(result, capture);
                    self.stats
                        .record(attempt.status, attempt.error, self.invoked.elapsed());
                    return attempt;
                }
                Ok(Err(_)) => {
                    // The table let the call go without a result: it was replaced (a new
                    // callback secret) or claimed by a test. Retryable, like a lost callback.
                    self.done = true;
                    return Attempt::failed(
                        ErrorKind::Timeout,
                        Bytes::from_static(b"the call left the table of pending callbacks"),
                    );
                }
                Err(_) if self.take_back() => {
                    self.calls.table.refuse(Refusal::Timeout);
                    return Attempt::failed(
                        ErrorKind::Timeout,
                        Bytes::from(format!("no callback within {:.1}s", timeout.as_secs_f64())),
                    );
                }
                // A callback's body is arriving: it settles the call, or its client leaves and
                // the next look takes the call back.
                Err(_) => {
                    waited =
                        tokio::time::timeout(Duration::from_millis(200), &mut self.waiter).await;
                }
            }
        }
    }

    /// Takes the call out of the table; false when a callback claimed it (or is arriving).
    fn take_back(&mut self) -> bool {
        let taken = self.calls.table.forget(&[&self.call_id]) == [true];
        self.done = taken;
        taken
    }
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled (the runtime is closing): a later callback finds the call settled.
            self.calls.table.forget(&[&self.call_id]);
        }
    }
}

/// An answer from `/async-function/` other than 202: the invocation failed. A 2xx that is not
/// 202 is no acceptance either (502: the gateway is not answering as OpenFaaS does).
pub(crate) fn not_accepted(mut attempt: Attempt) -> Attempt {
    if attempt.error == ErrorKind::None
        && (200..300).contains(&attempt.status)
        && attempt.status != 202
    {
        attempt.status = 502;
    }
    attempt
}

fn callback_attempt(result: CallbackResult, capture: bool) -> Attempt {
    if result.too_large {
        return Attempt {
            status: 413,
            body: Some(result.body),
            ..Attempt::default()
        };
    }
    // A status no HTTP answer has (negative, or past 65535) is an invalid answer: 0, final.
    let status = u16::try_from(result.status).unwrap_or(0);
    // The function's result is what an async caller waits for: its body is kept with or
    // without capture (it is in memory already); its headers, as a sync call's, with capture.
    let headers = capture.then(|| {
        result
            .headers
            .iter()
            .map(|(k, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), value)
            })
            .collect()
    });
    Attempt {
        status,
        error: ErrorKind::None,
        retry_after: None,
        body: Some(result.body),
        headers,
    }
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
                .map(|r| s.spawn(move || r.complete(CallbackResult::default())))
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
        assert_eq!(
            t.forget(&["idle", "arriving", "done", "never"]),
            vec![true, false, false, false]
        );
        assert_eq!(
            t.claim("idle"),
            Claim::Duplicate,
            "a timed-out call refuses its callback"
        );
        // The arriving callback wins over the sweep...
        assert_eq!(receipt.complete(CallbackResult::default()), Claim::Claimed);
        // ...and one whose client went away leaves its call to the next sweep.
        t.expect(["gone".to_owned()]);
        drop(t.receive("gone").expect("pending"));
        assert_eq!(t.forget(&["gone"]), vec![true]);
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let t = table(4);
        assert_eq!(t.refused(), vec![]);
        t.refuse(Refusal::BadToken);
        t.refuse(Refusal::BadToken);
        t.refuse(Refusal::Timeout);
        assert_eq!(t.refused(), vec![("bad_token", 2), ("timeout", 1)]);
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
