//! Messages in, completions out: the data exchanged with the binding crate.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// One event to deliver. `token` is the caller's handle for the message; it comes back in the
/// [`Completion`] untouched.
#[derive(Debug, Clone)]
pub struct Message {
    pub token: u64,
    pub topic: String,
    pub payload: Bytes,
    /// The message's own headers, passed through to every function.
    pub headers: Vec<(String, String)>,
    /// Sent as `X-Message-Id`; stays the same across retries and redeliveries.
    pub message_id: String,
    /// Messages with the same key are delivered one at a time, in submission order.
    pub key: Option<Bytes>,
    /// Delivery count the source has already seen (1 = first delivery). `X-Delivery-Attempt`
    /// is this plus the dispatcher's own retries.
    pub delivery_attempt: u32,
    /// Keep each function's response body and headers in the result.
    pub capture: bool,
    /// With a key: when the verdict is `Retry`, keep the key busy so later messages of the key
    /// wait until the caller resubmits this one with `resume` (or calls `release_key`).
    /// This is how a source retries a message without letting its key overtake it.
    pub hold_key_on_retry: bool,
    /// Likewise after a `Failed` verdict: for sources that keep retrying a message that failed
    /// for good (no dead-letter destination), so the key's later messages still wait.
    pub hold_key_on_failure: bool,
    /// This message's key is held for it by an earlier `Retry` (see `hold_key_on_retry`):
    /// start at once instead of queueing behind the key.
    pub resume: bool,
    /// Deliver only to this function (of those the topic routes to): a targeted re-invocation.
    pub only_function: Option<String>,
    /// Invoke through each function's asynchronous endpoint where it has one.
    pub asynchronous: bool,
    /// Headers fastconn itself sets for this message (`invoke`'s): sent as given, after the
    /// message's headers, and exempt from the reserved-name filter.
    pub own_headers: Vec<(String, String)>,
}

impl Message {
    /// A message with the given token, topic and payload and every option at its default.
    pub fn new(token: u64, topic: impl Into<String>, payload: Bytes) -> Message {
        Message {
            token,
            topic: topic.into(),
            payload,
            headers: Vec::new(),
            message_id: token.to_string(),
            key: None,
            delivery_attempt: 1,
            capture: false,
            hold_key_on_retry: false,
            hold_key_on_failure: false,
            resume: false,
            only_function: None,
            asynchronous: false,
            own_headers: Vec::new(),
        }
    }
}

/// Why a call has no HTTP status. The integer values are part of the binding's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum ErrorKind {
    #[default]
    None = 0,
    Connect = 1,
    Timeout = 2,
    Io = 3,
    InvalidRequest = 4,
    Internal = 5,
    /// The function's response broke HTTP/1.1 (malformed head, too many headers, conflicting
    /// or invalid framing). Not retried: the same function would answer the same way. The
    /// connection is closed, and the result's body says what was wrong.
    Protocol = 6,
    /// TLS failed: the server's certificate is not trusted, the server refused ours, or the
    /// peer does not speak TLS. Final: these are configuration problems that retrying within
    /// seconds will not fix, and retrying them only delays the dead-letter that shows them.
    Tls = 7,
}

impl ErrorKind {
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::None => "none",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Io => "io",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Internal => "internal",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Tls => "tls",
        }
    }
}

/// What the source should do with the message. Ordered by severity: the verdict of a message
/// fanned out to several functions is the worst of theirs. `Retry` outranks `Failed` because
/// redelivering keeps every target's chance of success; dead-lettering would drop the retryable
/// target's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Verdict {
    Ok = 0,
    Unrouted = 1,
    Failed = 2,
    Retry = 3,
}

impl Verdict {
    /// The integer the binding exposes (stable, independent of the severity order).
    pub fn code(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::Retry => 1,
            Verdict::Failed => 2,
            Verdict::Unrouted => 3,
        }
    }
}

/// The final result of one message at one function.
#[derive(Debug, Clone)]
pub struct TargetResult {
    pub function: Arc<str>,
    /// HTTP status of the last attempt; 0 when there was none (see `error`).
    pub status: u16,
    pub error: ErrorKind,
    pub attempts: u32,
    pub latency: Duration,
    /// `Retry-After` of the last answer, when it had one (already capped by `backoff_max`).
    pub retry_after: Option<Duration>,
    /// Full body when the message asked for capture; otherwise an excerpt on failure.
    pub body: Option<Bytes>,
    pub headers: Option<Vec<(String, String)>>,
    pub verdict: Verdict,
}

/// Every target of one message has a final result.
#[derive(Debug, Clone)]
pub struct Completion {
    pub token: u64,
    pub verdict: Verdict,
    pub results: Vec<TargetResult>,
    /// Whether the core still holds the message's ordering key for it after this completion
    /// (`hold_key_on_*`): the caller must resubmit it with `resume` or call
    /// `release_key`. Always false for a message without a key. Callers never infer this.
    pub key_held: bool,
}

/// Where completions go. Called from tokio worker threads; implementations must not block
/// (the binding pushes onto a queue and writes an eventfd at most once per drain).
pub trait CompletionSink: Send + Sync + 'static {
    fn complete(&self, completion: Completion);
}
