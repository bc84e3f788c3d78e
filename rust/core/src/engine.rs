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

use crate::callbacks::{not_accepted, AsyncCalls};
use crate::headers;
use crate::http::{Attempt, Endpoint, Pool};
use crate::message::{Completion, CompletionSink, ErrorKind, Message, TargetResult, Verdict};
use crate::ordering::KeyedQueue;
use crate::panics::CatchPanic;
use crate::retry::{Decision, RetryPolicy};
use crate::router::{RouteTable, Router};
use crate::stats::{StatsSnapshot, TargetStats};
use crate::tls::{TlsConfigError, TlsSettings};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
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

/// The bit set in the tokens of messages the ingress server submits ([`Engine::reserve_ingress`]):
/// they have a capacity budget of their own (the caller's budget is its own business), and
/// their completions also reach the request waiting for them (`?wait=true`).
pub const INGRESS_TOKEN: u64 = 1 << 63;

/// The largest in-flight bound: tokio's semaphores refuse (panic on) more permits than this.
pub const MAX_INFLIGHT: usize = 1 << 30;
/// The most worker threads a runtime is given.
pub const MAX_WORKERS: usize = 256;

impl EngineConfig {
    /// Every number that comes from outside, checked before anything is built from it.
    pub fn validate(&self) -> Result<(), String> {
        let within = |value: usize, low: usize, high: usize, what: &str| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "{what} must be between {low} and {high}, got {value}"
                ))
            }
        };
        within(self.workers, 1, MAX_WORKERS, "workers")?;
        within(self.max_inflight, 1, MAX_INFLIGHT, "max_inflight")?;
        within(
            self.max_inflight_per_function,
            1,
            MAX_INFLIGHT,
            "max_inflight_per_function",
        )?;
        within(self.max_queued, 1, usize::MAX >> 4, "max_queued")
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
    /// A bound or count out of range (see [`EngineConfig::validate`]).
    Invalid(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Runtime(e) => write!(f, "cannot start the dispatcher's runtime: {e}"),
            EngineError::Tls(e) => e.fmt(f),
            EngineError::Invalid(why) => f.write_str(why),
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
    /// Always invoke through `async_url`, whether or not the message asks for it.
    pub always_async: bool,
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

/// Room for one ingress message, given back when dropped unused.
pub struct IngressSlot<'a> {
    engine: &'a Engine,
    used: bool,
}

impl Drop for IngressSlot<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.engine
                .shared
                .ingress_queued
                .fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A routable function with everything a call needs, built once per table.
#[derive(Debug)]
struct Target {
    name: Arc<str>,
    endpoint: Endpoint,
    async_endpoint: Option<Endpoint>,
    always_async: bool,
    timeout: Duration,
    limit: Arc<Semaphore>,
    stats: Arc<TargetStats>,
    /// The target's own headers, serialized; their names override a message's.
    extra_head: Vec<u8>,
    extra_names: Vec<HeaderName>,
}

impl Target {
    /// The async form when the function has one and is always invoked through it, or the
    /// message asks for it.
    fn async_endpoint_for(&self, message: &Message) -> Option<&Endpoint> {
        self.async_endpoint
            .as_ref()
            .filter(|_| self.always_async || message.asynchronous)
    }
}

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
    /// Ingress messages accepted and not yet completed (a budget of `max_queued` of their own).
    ingress_queued: AtomicUsize,
    /// Requests waiting for an ingress message's completion, by token.
    waiters: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Completion>>>,
    inflight: AtomicUsize,
    closed: AtomicBool,
    /// How async calls settle: on their callback (the table they wait in), or, when unset, on
    /// the gateway's 202 with the engine's retry policy.
    async_calls: RwLock<Option<Arc<AsyncCalls>>>,
}

pub struct Engine {
    /// Taken on close; the handle below stays usable for spawning until then.
    runtime: Mutex<Option<Runtime>>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

impl Engine {
    pub fn new(config: EngineConfig, sink: Arc<dyn CompletionSink>) -> Result<Engine, EngineError> {
        config.validate().map_err(EngineError::Invalid)?;
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
            global: Arc::new(Semaphore::new(config.max_inflight)),
            router: Router::default(),
            pool,
            limits: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            sink,
            keys: KeyedQueue::default(),
            queued: AtomicUsize::new(0),
            ingress_queued: AtomicUsize::new(0),
            waiters: Mutex::new(HashMap::new()),
            inflight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            async_calls: RwLock::new(None),
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
        self.shared
            .router
            .swap(RouteTable::build_named(entries, |t| &t.name));
        Ok(())
    }

    /// How async calls settle from now on (calls already waiting keep theirs): on their
    /// callback in `calls`' table, or, with `None`, on the gateway's 202.
    pub fn set_async_calls(&self, calls: Option<Arc<AsyncCalls>>) {
        *self
            .shared
            .async_calls
            .write()
            .unwrap_or_else(PoisonError::into_inner) = calls;
    }

    /// The async calls' settings and table, once set.
    pub fn async_calls(&self) -> Option<Arc<AsyncCalls>> {
        self.shared
            .async_calls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
            let targets: Vec<Arc<Target>> = if let Some(only) = &message.only_function {
                // Not every subscriber and then one: with 1,000 cron functions on
                // `cron-function`, that was 1,000 Arc clones per fire.
                table
                    .lookup_named(&message.topic, only)
                    .into_iter()
                    .cloned()
                    .collect()
            } else {
                table.lookup(&message.topic).into_iter().cloned().collect()
            };
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

    /// Takes room for one ingress message, or says why there is none. The room is used by
    /// [`Engine::submit_reserved_ingress`], which cannot fail, so a request is answered 202
    /// only for a message the engine took.
    pub fn reserve_ingress(&self) -> Result<IngressSlot<'_>, SubmitError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(SubmitError::Closed);
        }
        let capacity = self.shared.config.max_queued;
        let before = self.shared.ingress_queued.fetch_add(1, Ordering::AcqRel);
        if before >= capacity {
            self.shared.ingress_queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Full {
                queued: before,
                capacity,
            });
        }
        Ok(IngressSlot {
            engine: self,
            used: false,
        })
    }

    /// Starts an ingress message in its reserved room (its token must carry [`INGRESS_TOKEN`]);
    /// `waiter` receives its completion. Call it on the engine's runtime.
    pub fn submit_reserved_ingress(
        &self,
        mut slot: IngressSlot<'_>,
        message: Message,
        waiter: Option<tokio::sync::oneshot::Sender<Completion>>,
    ) {
        slot.used = true;
        debug_assert!(message.token & INGRESS_TOKEN != 0);
        if let Some(waiter) = waiter {
            self.shared
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(message.token, waiter);
        }
        let table = self.shared.router.snapshot();
        let targets: Vec<Arc<Target>> = table.lookup(&message.topic).into_iter().cloned().collect();
        if let Some((message, targets)) = self.shared.admit(message, targets) {
            Arc::clone(&self.shared).start(message, targets);
        }
    }

    /// The runtime the engine runs on (the ingress server runs there too).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Releases a key held by a `Retry` of a `hold_key_on_retry` message that will not be
    /// resubmitted (e.g. its partition was revoked): the key's next message starts.
    ///
    /// Returns false (and changes nothing) when the key is not held: releasing a key whose
    /// message is still in flight would let the next message of the key overtake it.
    pub fn release_key(&self, key: Bytes) -> bool {
        match self.shared.keys.release_held(&key) {
            Ok(Some((next, targets))) => {
                let shared = Arc::clone(&self.shared);
                self.handle
                    .spawn(async move { shared.start(next, targets) });
                true
            }
            Ok(None) => true,
            Err(()) => false,
        }
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
            + self.shared.ingress_queued.load(Ordering::Acquire)
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
        // Requests waiting for an ingress message that will not finish now hear so (their
        // sender dropped: 503) and get a moment to be written before the runtime stops.
        let waiters = std::mem::take(
            &mut *self
                .shared
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if !waiters.is_empty() {
            drop(waiters);
            std::thread::sleep(Duration::from_millis(100));
        }
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
        // No call can take a connection any more: close the idle ones now rather than when
        // the engine is dropped, which a still-referenced dispatcher may never be.
        self.shared.pool.clear();
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
            .unwrap_or(self.config.max_inflight_per_function);
        if !(1..=MAX_INFLIGHT).contains(&bound) {
            return Err(invalid(format!(
                "max_inflight must be between 1 and {MAX_INFLIGHT}, got {bound}"
            )));
        }
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
            always_async: spec.always_async,
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
            Some(key) if message.resume => {
                self.keys.resume(&key);
                Some((message, targets))
            }
            Some(key) if !targets.is_empty() => self.keys.admit(&key, (message, targets)),
            _ => Some((message, targets)),
        }
    }

    /// Starts an admitted message: its calls, or its completion when there is nothing to call
    /// (a topic nothing subscribes to).
    fn start(self: Arc<Self>, message: Message, targets: Vec<Arc<Target>>) {
        if targets.is_empty() {
            // The key is ours here only when the caller gave it (resume); otherwise the
            // message bypassed the key's line and holds nothing.
            let owns_key = message.resume;
            Arc::clone(&self).settle(&message, owns_key, false, Verdict::Unrouted, vec![]);
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
                // A panic in a call (a bug) still completes the message, releasing its
                // capacity and key: the permits and counters are guards, dropped on unwind.
                let result = match CatchPanic::new(shared.deliver(&state, &target)).await {
                    Ok(result) => result,
                    Err(panic) => internal_error(&target, &panic),
                };
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
            if !headers::forwardable(name.as_str())
                || (self.config.authorization.is_some() && name == http::header::AUTHORIZATION)
            {
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
        for (k, v) in &message.own_headers {
            let name = HeaderName::try_from(k.as_str())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            let value = HeaderValue::try_from(v.as_str())
                .map_err(|_| format!("invalid value for header {k}"))?;
            push_header(&mut own, name.as_str(), value.as_bytes());
        }
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
        #[cfg(test)]
        if state.message.topic == tests::PANIC_TOPIC {
            panic!("injected by a test");
        }
        let started = Instant::now();
        let async_endpoint = target.async_endpoint_for(&state.message);
        // An async call follows the async settings' retry policy, when there are some.
        let calls = async_endpoint.and_then(|_| {
            self.async_calls
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        });
        let policy = calls
            .as_ref()
            .map_or(&self.config.retry, |c| &c.settings.retry);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let outcome = match (&state.headers, async_endpoint) {
                (Err(why), _) => Attempt {
                    error: ErrorKind::InvalidRequest,
                    body: Some(Bytes::from(why.clone())),
                    ..Default::default()
                },
                (Ok(head), None) => {
                    self.call(target, &target.endpoint, head, state, attempt, None)
                        .await
                }
                (Ok(head), Some(endpoint)) => match calls.as_deref().filter(|c| c.holds()) {
                    Some(calls) => {
                        // The pending slot first: a call waiting for room holds no HTTP permit.
                        let pending = calls.begin(&target.name).await;
                        let headers = (pending.call_id.as_str(), pending.callback_url.as_str());
                        let accepted = self
                            .call(target, endpoint, head, state, attempt, Some(headers))
                            .await;
                        // The HTTP permits are back: the wait for the callback holds none.
                        pending.settle(accepted, state.message.capture).await
                    }
                    // Settled on the 202, as the OpenFaaS connectors do (and only a 202 counts).
                    None => not_accepted(
                        self.call(target, endpoint, head, state, attempt, None)
                            .await,
                    ),
                },
            };
            target.stats.record_attempt(outcome.status, outcome.error);
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

    /// One HTTP attempt, holding the function's and the global permit while it runs. `call`:
    /// an async call's id and callback URL.
    async fn call(
        &self,
        target: &Target,
        endpoint: &Endpoint,
        message_head: &MessageHead,
        state: &InFlight,
        attempt: u32,
        call: Option<(&str, &str)>,
    ) -> Attempt {
        let head = request_head(
            target,
            endpoint,
            message_head,
            state.message.delivery_attempt,
            attempt,
            call,
        );
        // Per-function bound first: a stalled function's waiting calls hold no global permit.
        // The semaphores are never closed, so acquire cannot fail.
        let _local = target.limit.acquire().await;
        let _global = self.global.acquire().await;
        let _counted = InflightGuard::new(&self.inflight);
        // An async invocation's 202 carries nothing the caller wants: its callback does.
        let capture = state.message.capture && call.is_none();
        self.pool
            .attempt(
                endpoint,
                &head,
                &state.message.payload,
                target.timeout,
                capture,
            )
            .await
    }

    fn target_done(self: &Arc<Self>, state: &Arc<InFlight>, result: TargetResult) {
        let results = {
            let mut results = state.results.lock().unwrap_or_else(PoisonError::into_inner);
            results.push(result);
            if state.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            std::mem::take(&mut *results)
        };
        let verdict = results
            .iter()
            .map(|r| r.verdict)
            .max()
            .unwrap_or(Verdict::Unrouted);
        let m = &state.message;
        let keep = (m.hold_key_on_retry && verdict == Verdict::Retry)
            || (m.hold_key_on_failure && verdict == Verdict::Failed);
        // A launched keyed message owns its key: admission took it, or the caller resumed it.
        Arc::clone(self).settle(m, true, keep, verdict, results);
    }

    /// Reports the message's completion, then lets the next message of its key start unless
    /// the key stays held (`keep`). `owns_key`: whether the key is held for this message at all.
    fn settle(
        self: Arc<Self>,
        message: &Message,
        owns_key: bool,
        keep: bool,
        verdict: Verdict,
        results: Vec<TargetResult>,
    ) {
        let key = message.key.as_ref().filter(|_| owns_key);
        let completion = Completion {
            token: message.token,
            verdict,
            results,
            key_held: key.is_some() && keep,
        };
        // A kept key is marked held before the caller can see the completion (and release
        // or resume it); the count goes out before too: the caller frees its own capacity on
        // seeing the completion and may submit again at once.
        if let (Some(key), true) = (key, keep) {
            self.keys.hold(key);
        }
        if message.token & INGRESS_TOKEN == 0 {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        } else {
            self.ingress_queued.fetch_sub(1, Ordering::AcqRel);
            let waiter = self
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&message.token);
            if let Some(waiter) = waiter {
                // The request may have gone (its sender hung up): nobody to tell then.
                let _ = waiter.send(completion.clone());
            }
        }
        self.sink.complete(completion);
        if let (Some(key), false) = (key, keep) {
            self.release_key(key);
        }
    }

    fn release_key(self: Arc<Self>, key: &Bytes) {
        if let Some((next, targets)) = self.keys.release(key) {
            // `start`, not `launch`: the next one may have lost its targets.
            self.start(next, targets);
        }
    }
}

/// Counts a request on the wire for as long as it lives (also when its task unwinds).
struct InflightGuard<'a>(&'a AtomicUsize);

impl<'a> InflightGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InflightGuard(counter)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The result of a call whose task panicked: reported, final, never retried.
fn internal_error(target: &Target, panic: &str) -> TargetResult {
    target.stats.record_attempt(0, ErrorKind::Internal);
    target.stats.record(0, ErrorKind::Internal, Duration::ZERO);
    TargetResult {
        function: Arc::clone(&target.name),
        status: 0,
        error: ErrorKind::Internal,
        attempts: 1,
        latency: Duration::ZERO,
        retry_after: None,
        body: Some(Bytes::from(format!(
            "internal error (a bug in fastconn): {panic}"
        ))),
        headers: None,
        verdict: Verdict::Failed,
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
    call: Option<(&str, &str)>,
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
    if let Some((call_id, callback_url)) = call {
        push_header(&mut head, "x-call-id", call_id.as_bytes());
        push_header(&mut head, "x-callback-url", callback_url.as_bytes());
    }
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

    /// Calls for messages of this topic panic (test builds only; see `deliver`).
    pub(super) const PANIC_TOPIC: &str = "test-panic-in-call";

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
        recording_server_answering(usize::MAX)
    }

    /// Like [`recording_server`], but after `answered` requests it reads each request and
    /// closes the connection without answering: a function that dies mid-call.
    fn recording_server_answering(answered: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let url = serve("/f", move |head| {
            let id = header_of(head, "x-message-id");
            let nth = {
                let mut seen = record.lock().unwrap_or_else(PoisonError::into_inner);
                seen.push(id.to_ascii_lowercase());
                seen.len()
            };
            (nth <= answered).then_some("200 OK")
        });
        (url, seen)
    }

    /// A blocking HTTP/1.1 server on `path` (one thread per connection): `answer` sees each
    /// request's header lines once its body is read and gives the status line to answer with,
    /// or `None` to close the connection without answering.
    fn serve<F>(path: &str, answer: F) -> String
    where
        F: Fn(&[String]) -> Option<&'static str> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}{path}", listener.local_addr().expect("addr"));
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let answer = Arc::clone(&answer);
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().expect("clone");
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut head = Vec::new();
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end().to_owned();
                            if line.is_empty() {
                                break;
                            }
                            head.push(line);
                        }
                        let length = header_of(&head, "content-length").parse().unwrap_or(0);
                        let mut body = vec![0u8; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let Some(status) = answer(&head) else {
                            return;
                        };
                        let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                        if writer.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        url
    }

    /// A header's value among a request's header lines ("" when absent); `name` lower-case.
    fn header_of(head: &[String], name: &str) -> String {
        head.iter()
            .find_map(|line| {
                let (k, v) = line.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    }

    fn message(token: u64, key: Option<&'static [u8]>) -> Message {
        let mut m = Message::new(token, "t", Bytes::from_static(b"x"));
        m.key = key.map(Bytes::from_static);
        m
    }

    /// Function `f`, subscribed to topic `t`, at `url`.
    fn function_at(url: String) -> TargetSpec {
        TargetSpec {
            name: "f".to_owned(),
            url,
            topics: vec!["t".to_owned()],
            max_inflight: None,
            timeout: None,
            headers: vec![],
            async_url: None,
            always_async: false,
        }
    }

    fn engine_with(url: String, sink: Arc<Collect>) -> Engine {
        let engine = Engine::new(EngineConfig::default(), sink).expect("engine");
        let spec = TargetSpec {
            name: "f".to_owned(),
            url,
            topics: vec!["t".to_owned(), PANIC_TOPIC.to_owned()],
            max_inflight: None,
            timeout: None,
            headers: vec![],
            async_url: None,
            always_async: false,
        };
        engine.set_targets(vec![spec]).expect("targets");
        engine
    }

    fn wait_for(sink: &Collect, count: usize) -> Vec<Completion> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = sink
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if done.len() >= count || Instant::now() > deadline {
                return done;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_for_completions(sink: &Collect, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sink.0.lock().map(|c| c.len()).unwrap_or(0) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn each_counted_attempt_sent_the_request_exactly_once() {
        // The first message leaves a keep-alive connection in the pool; the second reaches the
        // function on it (and then on fresh ones), which reads it and hangs up every time.
        let (url, seen) = recording_server_answering(1);
        let sink = Arc::new(Collect::default());
        let config = EngineConfig {
            workers: 1,
            retry: RetryPolicy {
                max_attempts: 3,
                backoff_initial: Duration::from_millis(1),
                backoff_max: Duration::from_millis(5),
                ..RetryPolicy::default()
            },
            ..EngineConfig::default()
        };
        let engine = Engine::new(config, sink.clone()).expect("engine");
        let spec = function_at(url);
        engine.set_targets(vec![spec]).expect("targets");
        engine.submit(vec![message(1, None)]).expect("submit");
        wait_for_completions(&sink, 1);
        engine.submit(vec![message(2, None)]).expect("submit");
        wait_for_completions(&sink, 2);
        let completions = sink
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let outcome: Vec<(Verdict, ErrorKind, u32)> = completions
            .iter()
            .flat_map(|c| c.results.iter().map(|r| (r.verdict, r.error, r.attempts)))
            .collect();
        assert_eq!(
            outcome,
            vec![
                (Verdict::Ok, ErrorKind::None, 1),
                (Verdict::Retry, ErrorKind::Io, 3)
            ]
        );
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(
            seen.iter().filter(|id| *id == "2").count(),
            3,
            "the function saw the message once per counted attempt: {seen:?}"
        );
        engine.close(Duration::from_secs(1));
    }

    #[test]
    fn a_panicking_call_completes_as_internal_and_frees_its_key() {
        let (url, seen) = recording_server();
        let sink = Arc::new(Collect::default());
        let engine = engine_with(url, Arc::clone(&sink));
        let mut boom = message(1, Some(b"k"));
        boom.topic = PANIC_TOPIC.to_owned();
        engine
            .submit(vec![boom, message(2, Some(b"k"))])
            .expect("submit");
        let done = wait_for(&sink, 2);
        assert_eq!(done.len(), 2, "both messages complete");
        assert_eq!(done[0].verdict, Verdict::Failed);
        assert_eq!(done[0].results[0].error, ErrorKind::Internal);
        assert!(!done[0].key_held);
        assert_eq!(done[1].verdict, Verdict::Ok);
        assert_eq!(engine.queued(), 0, "capacity released");
        assert_eq!(engine.inflight(), 0);
        assert_eq!(seen.lock().map(|s| s.len()).unwrap_or(0), 1);
        engine.close(Duration::from_secs(1));
    }

    #[test]
    fn out_of_range_bounds_are_errors_not_panics() {
        let sink = Arc::new(Collect::default());
        let config = EngineConfig {
            max_inflight: 1 << 61,
            ..EngineConfig::default()
        };
        assert!(Engine::new(config, Arc::clone(&sink) as Arc<dyn CompletionSink>).is_err());
        let engine = Engine::new(EngineConfig::default(), sink).expect("engine");
        let spec = TargetSpec {
            name: "f".to_owned(),
            url: "http://127.0.0.1:9/f".to_owned(),
            topics: vec!["t".to_owned()],
            max_inflight: Some(1 << 61),
            timeout: None,
            headers: vec![],
            async_url: None,
            always_async: false,
        };
        let err = engine.set_targets(vec![spec]).expect_err("refused");
        assert!(err.to_string().contains("max_inflight"), "{err}");
    }

    #[test]
    fn reserved_headers_of_a_message_are_dropped_own_headers_kept() {
        let sink = Arc::new(Collect::default());
        let engine = Engine::new(EngineConfig::default(), sink).expect("engine");
        let mut m = message(1, None);
        m.headers = vec![
            ("X-Callback-Url".to_owned(), "http://evil/".to_owned()),
            ("x-call-id".to_owned(), "stolen".to_owned()),
            ("X-Custom".to_owned(), "kept".to_owned()),
        ];
        m.own_headers = vec![("X-Callback-Url".to_owned(), "http://fastconn/cb".to_owned())];
        let head = engine.shared.base_headers(&m).expect("valid");
        let passed: Vec<&str> = head.passed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(passed, vec!["x-custom"]);
        let own = String::from_utf8_lossy(&head.own).to_string();
        assert!(
            own.contains("x-callback-url: http://fastconn/cb\r\n"),
            "{own}"
        );
        assert!(!own.contains("evil") && !own.contains("stolen"), "{own}");
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
        let spec = function_at(url);
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

    /// The (`x-call-id`, `x-callback-url`) of each request the async gateway double saw.
    type SeenCalls = Arc<Mutex<Vec<(String, String)>>>;

    /// A gateway double for async calls: answers every request with `status`.
    fn async_gateway(status: &'static str) -> (String, SeenCalls) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let url = serve("/async-function/f", move |head| {
            let call = (
                header_of(head, "x-call-id"),
                header_of(head, "x-callback-url"),
            );
            record
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(call);
            Some(status)
        });
        (url, seen)
    }

    fn async_engine(
        status: &'static str,
        timeout: Duration,
    ) -> (Engine, Arc<Collect>, Arc<AsyncCalls>, SeenCalls) {
        let (url, seen) = async_gateway(status);
        let sink = Arc::new(Collect(Mutex::new(Vec::new())));
        let engine = Engine::new(EngineConfig::default(), Arc::clone(&sink) as _).expect("engine");
        let mut spec = function_at(url.replace("/async-function/", "/function/"));
        spec.async_url = Some(url);
        spec.always_async = true;
        engine.set_targets(vec![spec]).expect("targets");
        let table = Arc::new(crate::callbacks::CallbackTable::new(b"secret", 64));
        let calls = Arc::new(AsyncCalls::new(
            table,
            crate::callbacks::AsyncSettings {
                callback_base: "http://fastconn.test/callback/".to_owned(),
                timeout,
                max_pending: 8,
                ack: crate::callbacks::AckMode::OnCallback,
                retry: RetryPolicy {
                    max_attempts: 2,
                    backoff_initial: Duration::from_millis(1),
                    backoff_max: Duration::from_millis(5),
                    ..RetryPolicy::default()
                },
            },
        ));
        engine.set_async_calls(Some(Arc::clone(&calls)));
        (engine, sink, calls, seen)
    }

    /// The `n`th call the gateway saw (waiting for it).
    fn nth_call(seen: &Mutex<Vec<(String, String)>>, n: usize) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(call) = seen.lock().unwrap_or_else(PoisonError::into_inner).get(n) {
                return call.clone();
            }
            assert!(Instant::now() < deadline, "no call #{n}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn an_async_call_settles_on_its_callback_and_a_failed_one_is_reinvoked() {
        use crate::callbacks::{CallbackResult, Claim};
        let (engine, sink, calls, seen) = async_engine("202 Accepted", Duration::from_secs(30));
        engine.submit(vec![message(1, Some(b"k"))]).expect("submit");
        let (first, url) = nth_call(&seen, 0);
        let token = calls.table.token(first.as_bytes());
        assert_eq!(
            url,
            format!(
                "http://fastconn.test/callback/{}",
                std::str::from_utf8(&token).expect("hex")
            )
        );
        assert_eq!(calls.table.pending(), 1);
        assert!(
            sink.0.lock().expect("sink").is_empty(),
            "the 202 does not complete the message"
        );
        let failed = CallbackResult {
            status: 503,
            ..CallbackResult::default()
        };
        assert_eq!(calls.table.complete(&first, failed), Claim::Claimed);
        // A failed callback is retryable: the call is invoked again, with a new call id.
        let (second, _) = nth_call(&seen, 1);
        assert_ne!(first, second);
        let done = CallbackResult {
            status: 200,
            body: Bytes::from_static(b"done"),
            ..CallbackResult::default()
        };
        assert_eq!(calls.table.complete(&second, done.clone()), Claim::Claimed);
        assert_eq!(calls.table.complete(&second, done), Claim::Duplicate);
        let completions = wait_for(&sink, 1);
        let [completion] = completions.as_slice() else {
            panic!("one completion, got {completions:?}");
        };
        assert_eq!(completion.verdict, Verdict::Ok);
        let result = &completion.results[0];
        assert_eq!((result.status, result.attempts), (200, 2));
        assert_eq!(result.body.as_deref(), Some(&b"done"[..]));
        assert_eq!(
            engine.busy_keys(),
            0,
            "the key was held until the callback, then freed"
        );
        assert_eq!(calls.table.pending(), 0);
        engine.close(Duration::from_secs(1));
    }

    #[test]
    fn an_async_call_without_a_callback_times_out_and_one_not_accepted_fails() {
        let (engine, sink, calls, seen) = async_engine("202 Accepted", Duration::from_millis(50));
        engine.submit(vec![message(1, None)]).expect("submit");
        let completions = wait_for(&sink, 1);
        assert_eq!(completions.len(), 1);
        let result = &completions[0].results[0];
        assert_eq!(completions[0].verdict, Verdict::Retry);
        assert_eq!((result.error, result.attempts), (ErrorKind::Timeout, 2));
        assert_eq!(seen.lock().expect("seen").len(), 2);
        assert_eq!(calls.table.pending(), 0, "timed-out calls leave the table");
        assert_eq!(calls.table.refused(), vec![("timeout", 2)]);
        engine.close(Duration::from_secs(1));

        // A 200 from /async-function/ is no acceptance: 502, and no call waits.
        let (engine, sink, calls, _) = async_engine("200 OK", Duration::from_secs(30));
        engine.submit(vec![message(2, None)]).expect("submit");
        let completions = wait_for(&sink, 1);
        assert_eq!(completions.len(), 1);
        assert_eq!(completions[0].results[0].status, 502);
        assert_eq!(calls.table.pending(), 0);
        engine.close(Duration::from_secs(1));
    }
}
