//! The dispatcher: owns the tokio runtime, the HTTP pool and every in-flight bound.
//!
//! Bounds, from the outside in:
//! * `max_queued` messages accepted and not yet completed (the caller reserves this capacity
//!   before submitting; `submit` refuses a batch that would exceed it, so nothing here grows
//!   without a bound);
//! * `max_inflight_per_function` (or the target's own bound) requests per function, acquired
//!   first, so a stalled function's waiting calls hold no global permit;
//! * `max_inflight` requests overall.
//!
//! Permits are released during retry backoff so a sleeping retry blocks nobody.

use crate::http::{Attempt, Endpoint, Pool};
use crate::message::{Completion, CompletionSink, ErrorKind, Message, TargetResult, Verdict};
use crate::ordering::KeyedQueue;
use crate::retry::{Decision, RetryPolicy};
use crate::router::{RouteTable, Router};
use crate::stats::{StatsSnapshot, TargetStats};
use crate::tls::{TlsConfigError, TlsSettings};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokio worker threads.
    pub workers: usize,
    pub max_inflight: usize,
    pub max_inflight_per_function: usize,
    /// Messages accepted and not yet completed.
    pub max_queued: usize,
    pub retry: RetryPolicy,
    /// Per-attempt timeout unless the target has its own.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub content_type: Option<String>,
    pub user_agent: String,
    /// A ready `Authorization` header value (e.g. `Basic ...`) for every call.
    pub authorization: Option<String>,
    /// Trust and identity for `https://` targets.
    pub tls: TlsSettings,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 2,
            max_inflight: 1024,
            max_inflight_per_function: 256,
            max_queued: 4096,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            content_type: Some("text/plain".to_owned()),
            user_agent: concat!("fastconn/", env!("CARGO_PKG_VERSION")).to_owned(),
            authorization: None,
            tls: TlsSettings::default(),
        }
    }
}

/// Whether the engine can call `url` (the check a target's URLs go through), so that a
/// configuration check and the running engine agree on what is valid.
pub fn check_url(url: &str) -> Result<(), String> {
    Endpoint::parse(url).map(|_| ())
}

/// Why an engine could not be built.
#[derive(Debug)]
pub enum EngineError {
    /// The tokio runtime could not start (threads, file descriptors).
    Runtime(std::io::Error),
    Tls(TlsConfigError),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Runtime(e) => write!(f, "cannot start the dispatcher's runtime: {e}"),
            EngineError::Tls(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for EngineError {}

/// A function as the caller describes it.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub name: String,
    pub url: String,
    pub topics: Vec<String>,
    pub max_inflight: Option<usize>,
    pub timeout: Option<Duration>,
    /// Extra headers on every call to this function.
    pub headers: Vec<(String, String)>,
    /// Where asynchronous invocations go (OpenFaaS `/async-function/<name>`), if the function
    /// has such a form.
    pub async_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The engine is closed or closing.
    Closed,
    /// The batch would exceed `max_queued`; the caller should wait for completions.
    Full { queued: usize, capacity: usize },
    /// A target could not be built (bad URL or header).
    InvalidTarget(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Closed => write!(f, "the dispatcher is closed"),
            SubmitError::Full { queued, capacity } => {
                write!(f, "dispatcher full: {queued} of {capacity} messages queued")
            }
            SubmitError::InvalidTarget(why) => write!(f, "invalid function target: {why}"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// A routable function with everything a call needs, built once per table.
#[derive(Debug)]
struct Target {
    name: Arc<str>,
    endpoint: Endpoint,
    async_endpoint: Option<Endpoint>,
    timeout: Duration,
    limit: Arc<Semaphore>,
    stats: Arc<TargetStats>,
    /// The target's own headers, serialized; their names override a message's.
    extra_head: Vec<u8>,
    extra_names: Vec<HeaderName>,
}

impl Target {
    /// The async form when the message asks for it and the function has one.
    fn endpoint_for(&self, message: &Message) -> &Endpoint {
        match (&self.async_endpoint, message.asynchronous) {
            (Some(endpoint), true) => endpoint,
            _ => &self.endpoint,
        }
    }
}

/// Header names fastconn sets itself: a message's headers of these names are not passed on.
const RESERVED: [&str; 10] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-topic",
    "x-connector",
    "x-message-id",
    "x-delivery-attempt",
    "user-agent",
    "expect",
];

/// A message with its targets, while its calls run.
struct InFlight {
    message: Message,
    /// The parts of the request head shared by every call of this message, or why the
    /// message's headers cannot be sent.
    headers: Result<MessageHead, String>,
    remaining: AtomicUsize,
    results: Mutex<Vec<TargetResult>>,
}

/// A message's validated pass-through headers and fastconn's own headers, serialized.
struct MessageHead {
    passed: Vec<(HeaderName, HeaderValue)>,
    own: Vec<u8>,
}

struct Shared {
    config: EngineConfig,
    router: Router<Arc<Target>>,
    pool: Pool,
    global: Arc<Semaphore>,
    limits: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    stats: Mutex<HashMap<String, Arc<TargetStats>>>,
    sink: Arc<dyn CompletionSink>,
    keys: KeyedQueue<(Message, Vec<Arc<Target>>)>,
    queued: AtomicUsize,
    inflight: AtomicUsize,
    closed: AtomicBool,
}

pub struct Engine {
    /// Taken on close; the handle below stays usable for spawning until then.
    runtime: Mutex<Option<Runtime>>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

impl Engine {
    pub fn new(config: EngineConfig, sink: Arc<dyn CompletionSink>) -> Result<Engine, EngineError> {
        // TLS first: a configuration error should not cost a runtime's threads.
        let tls = config.tls.client_config().map_err(EngineError::Tls)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("fastconn-io")
            .enable_all()
            .build()
            .map_err(EngineError::Runtime)?;
        let pool = Pool::new(config.max_inflight, config.connect_timeout).with_tls(tls);
        let shared = Arc::new(Shared {
            global: Arc::new(Semaphore::new(config.max_inflight.max(1))),
            router: Router::default(),
            pool,
            limits: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            sink,
            keys: KeyedQueue::default(),
            queued: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            config,
        });
        let handle = runtime.handle().clone();
        Ok(Engine {
            runtime: Mutex::new(Some(runtime)),
            handle,
            shared,
        })
    }

    /// Replaces the routing table. Calls already running keep the target they started with;
    /// per-function bounds carry over to the new table when the bound is unchanged.
    pub fn set_targets(&self, specs: Vec<TargetSpec>) -> Result<(), SubmitError> {
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let target = self.shared.build_target(&spec)?;
            entries.push((Arc::new(target), spec.topics));
        }
        self.shared.router.swap(RouteTable::build(entries));
        Ok(())
    }

    /// Accepts a batch without waiting. Routing and dispatch happen on the runtime; one
    /// [`Completion`] per message reaches the sink when all its targets are settled.
    pub fn submit(&self, messages: Vec<Message>) -> Result<(), SubmitError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(SubmitError::Closed);
        }
        let n = messages.len();
        let capacity = self.shared.config.max_queued;
        let before = self.shared.queued.fetch_add(n, Ordering::AcqRel);
        if before + n > capacity {
            self.shared.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(SubmitError::Full {
                queued: before,
                capacity,
            });
        }
        // Routing and key admission happen here, on the caller's thread, so a key's messages
        // queue in submission order even when two batches' tasks run on different workers.
        let table = self.shared.router.snapshot();
        let mut start = Vec::with_capacity(n);
        for message in messages {
            let mut targets: Vec<Arc<Target>> =
                table.lookup(&message.topic).into_iter().cloned().collect();
            if let Some(only) = &message.only_function {
                targets.retain(|t| *t.name == **only);
            }
            if let Some(ready) = self.shared.admit(message, targets) {
                start.push(ready);
            }
        }
        if start.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        // One task per batch, which spawns the calls from inside the runtime: one cross-thread
        // wake-up per batch instead of one per message.
        self.handle.spawn(async move {
            for (message, targets) in start {
                Arc::clone(&shared).start(message, targets);
            }
        });
        Ok(())
    }

    /// Releases a key held by a `Retry` of a `hold_key_on_retry` message that will not be
    /// resubmitted (e.g. its partition was revoked): the key's next message starts.
    pub fn release_key(&self, key: Bytes) {
        let shared = Arc::clone(&self.shared);
        self.handle.spawn(async move { shared.release_key(&key) });
    }

    /// Keys with a message in flight or held.
    pub fn busy_keys(&self) -> usize {
        self.shared.keys.busy_keys()
    }

    /// The functions each topic routes to, by name, in the current table.
    pub fn route(&self, topics: &[String]) -> Vec<Vec<Arc<str>>> {
        let table = self.shared.router.snapshot();
        topics
            .iter()
            .map(|topic| {
                table
                    .lookup(topic)
                    .into_iter()
                    .map(|t| Arc::clone(&t.name))
                    .collect()
            })
            .collect()
    }

    /// Messages accepted and not yet completed.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// HTTP requests on the wire right now.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.shared.config.max_queued
    }

    pub fn stats(&self) -> Vec<StatsSnapshot> {
        let stats = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<StatsSnapshot> = stats.iter().map(|(name, s)| s.snapshot(name)).collect();
        out.sort_by(|a, b| a.function.cmp(&b.function));
        out
    }

    /// Stops intake and waits up to `timeout` for accepted messages to complete. Returns the
    /// number still unfinished (0 = drained). Blocks the calling thread: call it without the GIL.
    pub fn close(&self, timeout: Duration) -> usize {
        self.shared.closed.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        while self.queued() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.queued();
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
        left
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let runtime = self
            .runtime
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }
}

impl Shared {
    fn build_target(&self, spec: &TargetSpec) -> Result<Target, SubmitError> {
        let invalid = |why: String| SubmitError::InvalidTarget(format!("{}: {why}", spec.name));
        let endpoint =
            Endpoint::parse(&spec.url).map_err(|e| invalid(format!("url {:?}: {e}", spec.url)))?;
        let async_endpoint = match &spec.async_url {
            Some(url) => {
                Some(Endpoint::parse(url).map_err(|e| invalid(format!("async url {url:?}: {e}")))?)
            }
            None => None,
        };
        let mut extra_head = Vec::new();
        let mut extra_names = Vec::new();
        for (k, v) in &spec.headers {
            let name = HeaderName::try_from(k.as_str())
                .map_err(|e| invalid(format!("header {k:?}: {e}")))?;
            let value = HeaderValue::try_from(v.as_str())
                .map_err(|e| invalid(format!("header {k:?}: {e}")))?;
            push_header(&mut extra_head, name.as_str(), value.as_bytes());
            extra_names.push(name);
        }
        let bound = spec
            .max_inflight
            .unwrap_or(self.config.max_inflight_per_function)
            .max(1);
        let limit = {
            let mut limits = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
            match limits.get(&spec.name) {
                Some((existing, sem)) if *existing == bound => Arc::clone(sem),
                _ => {
                    let sem = Arc::new(Semaphore::new(bound));
                    limits.insert(spec.name.clone(), (bound, Arc::clone(&sem)));
                    sem
                }
            }
        };
        let stats = {
            let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                stats
                    .entry(spec.name.clone())
                    .or_insert_with(|| Arc::new(TargetStats::new())),
            )
        };
        Ok(Target {
            name: Arc::from(spec.name.as_str()),
            endpoint,
            async_endpoint,
            timeout: spec.timeout.unwrap_or(self.config.timeout),
            limit,
            stats,
            extra_head,
            extra_names,
        })
    }

    /// Starts a routed message now, or queues it behind its key.
    /// Decides whether a routed message starts now: `Some` when it does (including unrouted
    /// ones, which complete at once), `None` when it waits behind its key.
    fn admit(
        &self,
        message: Message,
        targets: Vec<Arc<Target>>,
    ) -> Option<(Message, Vec<Arc<Target>>)> {
        match message.key.clone() {
            Some(key) if !message.resume && !targets.is_empty() => {
                self.keys.admit(&key, (message, targets))
            }
            _ => Some((message, targets)),
        }
    }

    /// Starts an admitted message: its calls, or its completion when nothing subscribes.
    fn start(self: Arc<Self>, message: Message, targets: Vec<Arc<Target>>) {
        if targets.is_empty() {
            let token = message.token;
            // A resumed message holds its key: give it back even though nothing was called.
            let key = message.key.clone().filter(|_| message.resume);
            let completion = Completion {
                token,
                verdict: Verdict::Unrouted,
                results: vec![],
            };
            self.finish_message(key, completion);
            return;
        }
        self.launch(message, targets);
    }

    fn launch(self: Arc<Self>, message: Message, targets: Vec<Arc<Target>>) {
        let headers = self.base_headers(&message);
        let state = Arc::new(InFlight {
            message,
            headers,
            remaining: AtomicUsize::new(targets.len()),
            results: Mutex::new(Vec::with_capacity(targets.len())),
        });
        for target in targets {
            let shared = Arc::clone(&self);
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let result = shared.deliver(&state, &target).await;
                shared.target_done(&state, result);
            });
        }
    }

    fn base_headers(&self, message: &Message) -> Result<MessageHead, String> {
        let mut passed = Vec::with_capacity(message.headers.len());
        let mut has_content_type = false;
        for (k, v) in &message.headers {
            let name = HeaderName::try_from(k.as_str())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            let value = HeaderValue::try_from(v.as_str())
                .map_err(|_| format!("invalid value for header {k}"))?;
            if RESERVED.contains(&name.as_str()) {
                continue;
            }
            has_content_type |= name == http::header::CONTENT_TYPE;
            passed.push((name, value));
        }
        let check = |v: &str, what: &str| {
            HeaderValue::try_from(v)
                .map(|_| ())
                .map_err(|_| format!("invalid {what} {v:?}"))
        };
        check(&message.topic, "topic")?;
        check(&message.message_id, "message id")?;
        let mut own = Vec::with_capacity(256);
        if let (Some(ct), false) = (&self.config.content_type, has_content_type) {
            push_header(&mut own, "content-type", ct.as_bytes());
        }
        push_header(&mut own, "x-topic", message.topic.as_bytes());
        push_header(&mut own, "x-connector", b"fastconn");
        push_header(&mut own, "x-message-id", message.message_id.as_bytes());
        push_header(&mut own, "user-agent", self.config.user_agent.as_bytes());
        if let Some(auth) = &self.config.authorization {
            push_header(&mut own, "authorization", auth.as_bytes());
        }
        push_header(
            &mut own,
            "content-length",
            message.payload.len().to_string().as_bytes(),
        );
        Ok(MessageHead { passed, own })
    }

    /// Calls one function for one message until success, a final failure or spent attempts.
    async fn deliver(&self, state: &InFlight, target: &Target) -> TargetResult {
        let started = Instant::now();
        let policy = &self.config.retry;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let outcome = match &state.headers {
                Err(why) => Attempt {
                    error: ErrorKind::InvalidRequest,
                    body: Some(Bytes::from(why.clone())),
                    ..Default::default()
                },
                Ok(message_head) => {
                    let endpoint = target.endpoint_for(&state.message);
                    let head = request_head(
                        target,
                        endpoint,
                        message_head,
                        state.message.delivery_attempt,
                        attempt,
                    );
                    // Per-function bound first: a stalled function's waiting calls hold no
                    // global permit. The semaphores are never closed, so acquire cannot fail.
                    let _local = target.limit.acquire().await;
                    let _global = self.global.acquire().await;
                    self.inflight.fetch_add(1, Ordering::Relaxed);
                    let capture = state.message.capture;
                    let payload = &state.message.payload;
                    let result = self
                        .pool
                        .attempt(endpoint, &head, payload, target.timeout, capture)
                        .await;
                    self.inflight.fetch_sub(1, Ordering::Relaxed);
                    result
                }
            };
            let decision =
                policy.decide(attempt, outcome.status, outcome.error, outcome.retry_after);
            let verdict = match decision {
                Decision::RetryAfter(wait) => {
                    target.stats.record_retry();
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Decision::Success => Verdict::Ok,
                Decision::Exhausted => Verdict::Retry,
                Decision::Final => Verdict::Failed,
            };
            let latency = started.elapsed();
            target.stats.record(outcome.status, outcome.error, latency);
            return TargetResult {
                function: Arc::clone(&target.name),
                status: outcome.status,
                error: outcome.error,
                attempts: attempt,
                latency,
                retry_after: outcome.retry_after.map(|d| d.min(policy.backoff_max)),
                body: outcome.body,
                headers: outcome.headers,
                verdict,
            };
        }
    }

    fn target_done(self: &Arc<Self>, state: &Arc<InFlight>, result: TargetResult) {
        let mut results = state.results.lock().unwrap_or_else(PoisonError::into_inner);
        results.push(result);
        if state.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let results = std::mem::take(&mut *results);
        let verdict = results
            .iter()
            .map(|r| r.verdict)
            .max()
            .unwrap_or(Verdict::Unrouted);
        let completion = Completion {
            token: state.message.token,
            verdict,
            results,
        };
        let hold = (state.message.hold_key_on_retry && verdict == Verdict::Retry)
            || (state.message.hold_key_on_failure && verdict == Verdict::Failed);
        let key = state.message.key.clone().filter(|_| !hold);
        Arc::clone(self).finish_message(key, completion);
    }

    /// Reports the completion, then lets the next message of `key` (if given) start.
    fn finish_message(self: Arc<Self>, key: Option<Bytes>, completion: Completion) {
        // Count it out before the caller can see the completion: the caller frees its own
        // capacity on seeing it and may submit again at once.
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.sink.complete(completion);
        if let Some(key) = key {
            self.release_key(&key);
        }
    }

    fn release_key(self: Arc<Self>, key: &Bytes) {
        if let Some((next, targets)) = self.keys.release(key) {
            self.launch(next, targets);
        }
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The full request head of one attempt: request line and Host, the message's headers (minus
/// any the target overrides), fastconn's headers, the target's headers, the attempt number.
fn request_head(
    target: &Target,
    endpoint: &Endpoint,
    message: &MessageHead,
    delivery_attempt: u32,
    attempt: u32,
) -> Vec<u8> {
    let mut head =
        Vec::with_capacity(endpoint.head.len() + message.own.len() + target.extra_head.len() + 128);
    head.extend_from_slice(&endpoint.head);
    for (name, value) in &message.passed {
        if !target.extra_names.contains(name) {
            push_header(&mut head, name.as_str(), value.as_bytes());
        }
    }
    head.extend_from_slice(&message.own);
    head.extend_from_slice(&target.extra_head);
    let delivery = delivery_attempt.max(1).saturating_add(attempt - 1);
    push_header(
        &mut head,
        "x-delivery-attempt",
        delivery.to_string().as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// Records completions for the test.
    #[derive(Default)]
    struct Collect(Mutex<Vec<Completion>>);

    impl CompletionSink for Collect {
        fn complete(&self, completion: Completion) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(completion);
        }
    }

    /// A blocking HTTP/1.1 server (one thread per connection) that records each request's
    /// `x-message-id` in arrival order and answers 200.
    fn recording_server() -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/f", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let record = Arc::clone(&record);
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().expect("clone");
                    let mut reader = BufReader::new(stream);
                    loop {
                        let (mut id, mut length) = (String::new(), 0usize);
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end().to_ascii_lowercase();
                            if line.is_empty() {
                                break;
                            }
                            if let Some(v) = line.strip_prefix("x-message-id: ") {
                                id = v.to_owned();
                            } else if let Some(v) = line.strip_prefix("content-length: ") {
                                length = v.parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        record
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(id);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if writer.write_all(reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, seen)
    }

    fn message(token: u64, key: Option<&'static [u8]>) -> Message {
        Message {
            token,
            topic: "t".to_owned(),
            payload: Bytes::from_static(b"x"),
            headers: vec![],
            message_id: token.to_string(),
            key: key.map(Bytes::from_static),
            delivery_attempt: 1,
            capture: false,
            hold_key_on_retry: false,
            hold_key_on_failure: false,
            resume: false,
            only_function: None,
            asynchronous: false,
        }
    }

    #[test]
    fn a_keys_messages_run_in_submission_order_across_batches() {
        // Two workers and many tiny back-to-back batches: the batches' tasks may run in any
        // order, yet each key's messages must reach the function in submission order.
        let (url, seen) = recording_server();
        let sink = Arc::new(Collect::default());
        let config = EngineConfig {
            workers: 2,
            max_queued: 100_000,
            ..EngineConfig::default()
        };
        let engine = Engine::new(config, sink.clone()).expect("engine");
        let spec = TargetSpec {
            name: "f".to_owned(),
            url,
            topics: vec!["t".to_owned()],
            max_inflight: None,
            timeout: None,
            headers: vec![],
            async_url: None,
        };
        engine.set_targets(vec![spec]).expect("targets");
        let keys: [&'static [u8]; 3] = [b"a", b"b", b"c"];
        let total = 600u64;
        for token in 0..total {
            let key = keys.get(usize::try_from(token % 3).unwrap_or(0)).copied();
            engine.submit(vec![message(token, key)]).expect("submit");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while sink.0.lock().map(|c| c.len()).unwrap_or(0) < total as usize
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(seen.len(), total as usize, "every message delivered once");
        for k in 0..3u64 {
            let order: Vec<u64> = seen
                .iter()
                .filter_map(|id| id.parse().ok())
                .filter(|t: &u64| t % 3 == k)
                .collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(order, sorted, "key {k} delivered out of order");
        }
        assert!(sink
            .0
            .lock()
            .map(|c| c.iter().all(|c| c.verdict == Verdict::Ok))
            .unwrap_or(false));
        engine.close(Duration::from_secs(1));
    }
}
