//! `Runtime`: the one explicit object Python owns. It holds the tokio runtime (inside the core
//! engine), the completion queue and the PID it was created in: a forked child inherits the
//! object but not the runtime's threads, so every entry point refuses to run there.

use crate::completions::{CompletionQueue, WakeQueue};
use crate::ingress::{self, CloudEventsTuple, IngressQueue, PythonRoute, WebhookTuple};
use bytes::Bytes;
use fastconn_core::callbacks::{
    AckMode, AsyncCalls, AsyncSettings, CallbackResult, CallbackTable, Claim,
};
use fastconn_core::ingress::http_header::{HeaderName, HeaderValue};
use fastconn_core::ingress::tls::{check_server_tls, server_config};
use fastconn_core::ingress::{Ingress, IngressConfig};
use fastconn_core::tls::TlsConfigError;
use fastconn_core::{
    Engine, EngineConfig, EngineError, Message, RetryPolicy, StatsSnapshot, SubmitError,
    TargetSpec, TlsSettings,
};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// One function target as Python passes it: (name, url, topics, max_inflight, timeout_s, headers,
/// async_url, always_async).
type TargetTuple = (
    String,
    String,
    Vec<String>,
    Option<usize>,
    Option<f64>,
    Vec<(String, String)>,
    Option<String>,
    bool,
);

/// One message as Python passes it (see `submit`).
type WireMessage<'py> = (
    String,
    Bound<'py, PyBytes>,
    Vec<(String, String)>,
    String,
    Option<Bound<'py, PyBytes>>,
    u32,
    u8,
    Option<String>,
    Vec<(String, String)>,
);

/// Bits of a wire message's `flags`.
const CAPTURE: u8 = 1;
const HOLD_KEY_ON_RETRY: u8 = 1 << 1;
const RESUME: u8 = 1 << 2;
const ASYNCHRONOUS: u8 = 1 << 3;
const HOLD_KEY_ON_FAILURE: u8 = 1 << 4;

/// One function's counters: (function, [(status, count)], cumulative buckets, sum_s, count, retries).
type StatsTuple = (
    String,
    Vec<(String, u64)>,
    Vec<u64>,
    f64,
    u64,
    u64,
    Vec<(String, u64)>,
);

#[pyclass(module = "fastconn._core", frozen)]
pub struct Runtime {
    engine: Arc<Engine>,
    /// The ingress server, once started, and its queue towards Python.
    ingress: Mutex<Option<Ingress>>,
    ingress_queue: Arc<IngressQueue>,
    /// The calls expecting an async callback (`callbacks_setup`), claimed by the ingress.
    callback_table: Mutex<Option<Arc<CallbackTable>>>,
    /// Interned function names for `drain` (bounded by the number of functions ever routed).
    names: Mutex<HashMap<Arc<str>, Py<PyString>>>,
    completions: Arc<CompletionQueue>,
    pid: u32,
}

fn error_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("fastconn.errors")?.getattr(name)
}

fn raise(py: Python<'_>, class: &str, message: String) -> PyErr {
    match error_class(py, class).and_then(|cls| cls.call1((message.clone(),))) {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// Runs `f`, turning a panic (a bug in the core) into `fastconn.errors.InternalError`: PyO3's
/// own `PanicException` derives from `BaseException` and would escape every `except Exception`,
/// killing whatever task made the call.
fn guard<T>(py: Python<'_>, f: impl FnOnce() -> T) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let why = fastconn_core::panics::panic_message(payload.as_ref());
        raise(
            py,
            "InternalError",
            format!("internal error in fastconn's core (a bug, please report it): {why}"),
        )
    })
}

fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{what} must be >= 0 seconds, got {value}")))
}

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (
        *, workers, max_inflight, max_inflight_per_function, max_queued, max_attempts, retry_on,
        backoff_initial, backoff_max, timeout, connect_timeout, content_type, user_agent, authorization,
        tls_ca=None, tls_cert=None, tls_key=None, tls_insecure_skip_verify=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        workers: usize,
        max_inflight: usize,
        max_inflight_per_function: usize,
        max_queued: usize,
        max_attempts: u32,
        retry_on: Vec<u16>,
        backoff_initial: f64,
        backoff_max: f64,
        timeout: f64,
        connect_timeout: f64,
        content_type: Option<String>,
        user_agent: String,
        authorization: Option<String>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_insecure_skip_verify: bool,
    ) -> PyResult<Runtime> {
        let config = EngineConfig {
            workers,
            max_inflight,
            max_inflight_per_function,
            max_queued,
            retry: retry_policy(max_attempts, retry_on, backoff_initial, backoff_max)?,
            timeout: seconds(timeout, "timeout")?,
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
            content_type,
            user_agent,
            authorization,
            tls: TlsSettings {
                ca_file: tls_ca,
                cert_file: tls_cert,
                key_file: tls_key,
                insecure_skip_verify: tls_insecure_skip_verify,
            },
        };
        let completions = Arc::new(CompletionQueue::new()?);
        let sink: Arc<dyn fastconn_core::CompletionSink> = completions.clone();
        let engine = Engine::new(config, sink).map_err(|e| match e {
            EngineError::Tls(_) | EngineError::Invalid(_) => PyValueError::new_err(e.to_string()),
            EngineError::Runtime(io) => PyErr::from(io),
        })?;
        Ok(Runtime {
            engine: Arc::new(engine),
            ingress: Mutex::new(None),
            ingress_queue: Arc::new(IngressQueue(WakeQueue::new()?)),
            callback_table: Mutex::new(None),
            names: Mutex::new(HashMap::new()),
            completions,
            pid: std::process::id(),
        })
    }

    /// The PID this runtime was created in.
    #[getter]
    fn pid(&self) -> u32 {
        self.pid
    }

    /// The eventfd that becomes readable when completions are waiting.
    #[getter]
    fn wake_fd(&self, py: Python<'_>) -> PyResult<i32> {
        self.check_process(py, "use")?;
        Ok(self.completions.fd())
    }

    #[getter]
    fn queued(&self) -> usize {
        self.engine.queued()
    }

    #[getter]
    fn inflight(&self) -> usize {
        self.engine.inflight()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.engine.capacity()
    }

    #[getter]
    fn busy_keys(&self) -> usize {
        self.engine.busy_keys()
    }

    /// Releases a key held for its caller; false (nothing changes) when it is not held.
    fn release_key(&self, py: Python<'_>, key: &Bound<'_, PyBytes>) -> PyResult<bool> {
        self.check_process(py, "release a key of")?;
        let key = Bytes::copy_from_slice(key.as_bytes());
        guard(py, || self.engine.release_key(key))
    }

    #[getter]
    fn closed(&self) -> bool {
        self.engine.is_closed()
    }

    fn set_targets(&self, py: Python<'_>, targets: Vec<TargetTuple>) -> PyResult<()> {
        self.check_process(py, "set targets")?;
        let specs = targets
            .into_iter()
            .map(
                |(name, url, topics, max_inflight, timeout, headers, async_url, always_async)| {
                    Ok(TargetSpec {
                        timeout: timeout
                            .map(|t| seconds(t, &format!("timeout of {name}")))
                            .transpose()?,
                        name,
                        url,
                        topics,
                        max_inflight,
                        headers,
                        async_url,
                        always_async,
                    })
                },
            )
            .collect::<PyResult<Vec<_>>>()?;
        guard(py, || self.engine.set_targets(specs))?
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Accepts a batch: each item is (topic, payload, headers, message_id, key, delivery_attempt,
    /// flags, only_function, own_headers) with flags = capture | hold_key_on_retry << 1 |
    /// resume << 2 | asynchronous << 3 | hold_key_on_failure << 4;
    /// message `i` gets token `base_token + i`. Never blocks.
    fn submit(&self, py: Python<'_>, base_token: u64, batch: &Bound<'_, PyList>) -> PyResult<()> {
        self.check_process(py, "submit")?;
        let mut messages = Vec::with_capacity(batch.len());
        for (i, item) in batch.iter().enumerate() {
            let item = item
                .cast_into::<PyTuple>()
                .map_err(|_| PyValueError::new_err(format!("batch item {i} is not a tuple")))?;
            let (
                topic,
                payload,
                headers,
                message_id,
                key,
                delivery_attempt,
                flags,
                only_function,
                own_headers,
            ): WireMessage<'_> = item
                .extract()
                .map_err(|e| PyValueError::new_err(format!("batch item {i}: {e}")))?;
            messages.push(Message {
                token: base_token + i as u64,
                topic,
                payload: Bytes::copy_from_slice(payload.as_bytes()),
                headers,
                message_id,
                key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
                delivery_attempt,
                capture: flags & CAPTURE != 0,
                hold_key_on_retry: flags & HOLD_KEY_ON_RETRY != 0,
                hold_key_on_failure: flags & HOLD_KEY_ON_FAILURE != 0,
                resume: flags & RESUME != 0,
                only_function,
                asynchronous: flags & ASYNCHRONOUS != 0,
                own_headers,
            });
        }
        guard(py, || self.engine.submit(messages))?.map_err(|e| match e {
            SubmitError::Closed => raise(py, "DispatcherClosed", e.to_string()),
            SubmitError::Full { .. } => raise(py, "DispatcherFull", e.to_string()),
            SubmitError::InvalidTarget(_) => PyValueError::new_err(e.to_string()),
        })
    }

    /// Everything completed since the last drain, re-arming the wake-up. Each item:
    /// (token, verdict, [(function, status, error_kind, attempts, latency_s, retry_after_s,
    /// body, headers)], key_held), headers as one bytes object `name\0value\0...` (one
    /// object per result rather than two strings and a tuple per header: Python splits it only
    /// when it reads the results).
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let completions = self.completions.take();
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let mut items = Vec::with_capacity(completions.len());
        for c in completions {
            let mut results = Vec::with_capacity(c.results.len());
            for r in c.results {
                // Function names repeat on every completion: one Python string per name.
                let name = names
                    .entry(Arc::clone(&r.function))
                    .or_insert_with(|| PyString::new(py, &r.function).unbind())
                    .clone_ref(py);
                let body = r.body.as_ref().map(|b| PyBytes::new(py, b));
                let headers = r
                    .headers
                    .as_deref()
                    .map(|h| PyBytes::new(py, &packed_headers(h)));
                let item = (
                    name,
                    r.status,
                    r.error as u8,
                    r.attempts,
                    r.latency.as_secs_f64(),
                    r.retry_after.map(|d| d.as_secs_f64()),
                    body,
                    headers,
                );
                results.push(item.into_pyobject(py)?);
            }
            items.push(
                (
                    c.token,
                    c.verdict.code(),
                    PyTuple::new(py, results)?,
                    c.key_held,
                )
                    .into_pyobject(py)?,
            );
        }
        PyList::new(py, items)
    }

    /// The function names each topic routes to now (one call per batch, for sources that need
    /// to know before submitting, e.g. to prepare async callbacks).
    fn route(&self, topics: Vec<String>) -> Vec<Vec<String>> {
        self.engine
            .route(&topics)
            .into_iter()
            .map(|names| names.iter().map(|n| n.to_string()).collect())
            .collect()
    }

    fn stats(&self) -> Vec<StatsTuple> {
        self.engine.stats().into_iter().map(stats_tuple).collect()
    }

    /// Starts the ingress HTTP server on the engine's runtime; returns the bound (host, port).
    #[pyo3(signature = (*, listen, header_timeout, idle_timeout, max_connections, max_pending, max_head_bytes=65536, tls_cert=None, tls_key=None, http2=false, http2_max_concurrent_streams=100))]
    #[allow(clippy::too_many_arguments)]
    fn start_ingress(
        &self,
        py: Python<'_>,
        listen: String,
        header_timeout: f64,
        idle_timeout: f64,
        max_connections: usize,
        max_pending: usize,
        max_head_bytes: usize,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        http2: bool,
        http2_max_concurrent_streams: u32,
    ) -> PyResult<(String, u16)> {
        self.check_process(py, "start the ingress of")?;
        // The files were checked with the configuration; read again here, they may have
        // changed since: the error names the key as `check` would.
        let problem = |e: TlsConfigError| {
            PyValueError::new_err(format!("server.{}: {}", e.setting.name(), e.message))
        };
        let tls = match (tls_cert.as_deref(), tls_key.as_deref()) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(server_config(cert, key, http2).map_err(problem)?),
            (cert, key) => {
                return Err(check_server_tls(cert, key).map_or_else(
                    || PyValueError::new_err("server.tls_cert and server.tls_key go together"),
                    problem,
                ))
            }
        };
        let config = IngressConfig {
            listen,
            header_timeout: seconds(header_timeout, "header_timeout")?,
            idle_timeout: seconds(idle_timeout, "idle_timeout")?,
            max_connections,
            max_pending,
            max_head_bytes,
            tls,
            http2,
            http2_max_concurrent_streams,
        };
        let sink: Arc<dyn fastconn_core::ingress::IngressSink> = self.ingress_queue.clone();
        let server = guard(py, || {
            Ingress::start(Arc::clone(&self.engine), config, sink)
        })?
        // OSError(errno, text): callers tell "in use" from "not an address here" by errno.
        .map_err(|e| match e.raw_os_error() {
            Some(code) => PyOSError::new_err((code, e.to_string())),
            None => PyErr::from(e),
        })?;
        let local = server.local_addr();
        *self.ingress.lock().unwrap_or_else(PoisonError::into_inner) = Some(server);
        Ok((local.ip().to_string(), local.port()))
    }

    /// The eventfd that becomes readable when the ingress has something for Python.
    #[getter]
    fn ingress_wake_fd(&self) -> i32 {
        self.ingress_queue.0.fd()
    }

    /// Everything the ingress queued for Python: (requests, accepted, notices).
    fn ingress_drain<'py>(&self, py: Python<'py>) -> PyResult<ingress::Drained<'py>> {
        ingress::drain(py, self.ingress_queue.0.take())
    }

    /// Creates the table of calls expecting a callback (replacing any earlier one): tokens are
    /// HMACs with `secret`; `memory` settled ids are remembered (409 rather than 404).
    fn callbacks_setup(&self, secret: &[u8], memory: usize) {
        *self
            .callback_table
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some(Arc::new(CallbackTable::new(secret, memory)));
    }

    /// Async calls wait for their callback from now on (`ack` "on_callback") or settle on the
    /// 202 ("on_accept"), re-invoked per the given policy (`callbacks_setup` first).
    #[allow(clippy::too_many_arguments)]
    fn async_calls(
        &self,
        py: Python<'_>,
        callback_base: String,
        timeout: f64,
        max_pending: usize,
        ack: &str,
        max_attempts: u32,
        retry_on: Vec<u16>,
        backoff_initial: f64,
        backoff_max: f64,
    ) -> PyResult<()> {
        let table = self.callback_table(py)?;
        let ack = match ack {
            "on_callback" => AckMode::OnCallback,
            "on_accept" => AckMode::OnAccept,
            other => {
                return Err(PyValueError::new_err(format!(
                    "ack must be \"on_callback\" or \"on_accept\", got {other:?}"
                )))
            }
        };
        let settings = AsyncSettings {
            callback_base,
            timeout: seconds(timeout, "callback timeout")?,
            max_pending,
            ack,
            retry: retry_policy(max_attempts, retry_on, backoff_initial, backoff_max)?,
        };
        let calls = Arc::new(AsyncCalls::new(table, settings));
        guard(py, || self.engine.set_async_calls(Some(calls)))
    }

    /// Calls waiting for their callback.
    fn callbacks_pending(&self, py: Python<'_>) -> PyResult<usize> {
        let table = self.callback_table(py)?;
        guard(py, || table.pending())
    }

    /// The callbacks refused (or not received in time) so far: [(reason, count)].
    fn callbacks_refused(&self, py: Python<'_>) -> PyResult<Vec<(&'static str, u64)>> {
        let table = self.callback_table(py)?;
        guard(py, || table.refused())
    }

    /// The callbacks received so far, by function, as `stats` gives the invocations' (empty
    /// before `async_calls`).
    fn callbacks_stats(&self, py: Python<'_>) -> PyResult<Vec<StatsTuple>> {
        let calls = self.engine.async_calls();
        guard(py, || {
            calls
                .map(|c| c.stats().into_iter().map(stats_tuple).collect())
                .unwrap_or_default()
        })
    }

    /// A callback served outside the ingress (its token checked) is arriving (`arriving`) or
    /// done arriving: a call is not timed out while its callback's body is read.
    fn callbacks_receiving(&self, py: Python<'_>, call_id: &str, arriving: bool) -> PyResult<()> {
        let table = self.callback_table(py)?;
        guard(py, || {
            if arriving {
                table.begin_receiving(call_id);
            } else {
                table.end_receiving(call_id);
            }
        })
    }

    /// Settles one call with a callback served outside the ingress: 0 claimed, 1 duplicate,
    /// 2 unknown.
    fn callbacks_complete(
        &self,
        py: Python<'_>,
        call_id: &str,
        status: i64,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        too_large: bool,
    ) -> PyResult<u8> {
        let table = self.callback_table(py)?;
        // Headers the aiohttp server read: any it would have refused cannot be here.
        let headers = headers
            .into_iter()
            .filter_map(|(k, v)| {
                let name = HeaderName::try_from(k).ok()?;
                Some((name, HeaderValue::try_from(v).ok()?))
            })
            .collect();
        let result = CallbackResult {
            status,
            headers,
            body: Bytes::from(body),
            too_large,
        };
        Ok(match guard(py, || table.complete(call_id, result))? {
            Claim::Claimed => 0,
            Claim::Duplicate => 1,
            Claim::Unknown => 2,
        })
    }

    /// Answers a batch of Python requests: [(id, status, headers, body)]; returns how many
    /// clients were still waiting.
    fn ingress_respond(
        &self,
        py: Python<'_>,
        answers: Vec<ingress::AnswerTuple<'_>>,
    ) -> PyResult<usize> {
        let answers = ingress::answers(answers);
        self.with_ingress(py, |server| server.respond(answers))
    }

    /// Replaces the ingress route table: Python routes [(method, path, prefix, max_body)] (a
    /// request names its route by index in this list), webhook and CloudEvents sources, and
    /// the callback route's body limit when callbacks are served (`callbacks_setup` first).
    #[pyo3(signature = (python, webhooks, cloudevents, callback_max_body=None))]
    fn ingress_routes(
        &self,
        py: Python<'_>,
        python: Vec<PythonRoute>,
        webhooks: Vec<WebhookTuple>,
        cloudevents: Vec<CloudEventsTuple>,
        callback_max_body: Option<usize>,
    ) -> PyResult<()> {
        let callback = match callback_max_body {
            Some(max_body) => Some((self.callback_table(py)?, max_body)),
            None => None,
        };
        let table = ingress::route_table(python, webhooks, cloudevents, callback)?;
        self.with_ingress(py, |server| server.set_routes(table))
    }

    /// What `/readyz` answers, and whether webhooks may submit (a topic map is loaded).
    fn ingress_ready(
        &self,
        py: Python<'_>,
        ready: bool,
        text: String,
        routing: bool,
    ) -> PyResult<()> {
        self.with_ingress(py, |server| {
            server.set_ready(ready, text);
            server.set_routing_ready(routing);
        })
    }

    /// (open, evicted, refused, timed_out) connections of the ingress.
    fn ingress_connections(&self, py: Python<'_>) -> PyResult<(usize, u64, u64, u64)> {
        self.with_ingress(py, |server| {
            let c = server.connections();
            (c.open, c.evicted, c.refused, c.timed_out)
        })
    }

    /// Stops the ingress server (idempotent).
    fn stop_ingress(&self) {
        if let Some(server) = self
            .ingress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            server.stop();
        }
    }

    /// Stops intake and waits (without the GIL) up to `timeout` seconds for accepted messages;
    /// returns how many did not finish.
    fn close(&self, py: Python<'_>, timeout: f64) -> PyResult<usize> {
        self.check_process(py, "close")?;
        let timeout = seconds(timeout, "timeout")?;
        Ok(py.detach(|| self.engine.close(timeout)))
    }
}

/// Headers as `name\0value\0...`. HTTP forbids NUL in names and values (the parsers refuse
/// it), so the separator cannot occur inside one; a header that had one would be dropped here.
fn packed_headers(headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (name, value) in headers {
        if name.contains('\0') || value.contains('\0') {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// A retry policy from Python's settings (seconds as floats, checked).
fn retry_policy(
    max_attempts: u32,
    retry_on: Vec<u16>,
    backoff_initial: f64,
    backoff_max: f64,
) -> PyResult<RetryPolicy> {
    Ok(RetryPolicy {
        max_attempts: max_attempts.max(1),
        retry_on,
        backoff_initial: seconds(backoff_initial, "backoff_initial")?,
        backoff_max: seconds(backoff_max, "backoff_max")?,
    })
}

fn stats_tuple(s: StatsSnapshot) -> StatsTuple {
    (
        s.function,
        s.results,
        s.cumulative_buckets,
        s.sum_seconds,
        s.count,
        s.retries,
        s.attempts,
    )
}

impl Runtime {
    fn callback_table(&self, py: Python<'_>) -> PyResult<Arc<CallbackTable>> {
        self.check_process(py, "use the callbacks of")?;
        self.callback_table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| PyRuntimeError::new_err("callbacks_setup was not called"))
    }

    fn with_ingress<T>(&self, py: Python<'_>, f: impl FnOnce(&Ingress) -> T) -> PyResult<T> {
        self.check_process(py, "use the ingress of")?;
        let server = self.ingress.lock().unwrap_or_else(PoisonError::into_inner);
        match server.as_ref() {
            Some(server) => guard(py, || f(server)),
            None => Err(PyRuntimeError::new_err("the ingress server is not running")),
        }
    }

    fn check_process(&self, py: Python<'_>, action: &str) -> PyResult<()> {
        let pid = std::process::id();
        if pid == self.pid {
            return Ok(());
        }
        Err(raise(
            py,
            "ForkError",
            format!("cannot {action} a fastconn runtime across a fork (created in pid {}, used in pid {pid}); create a new one in the child", self.pid),
        ))
    }
}
