//! The ingress HTTP server: fastconn's public listener (`[server] listen`), served by hyper on
//! the engine's runtime, so the hot routes run without Python.
//!
//! * `/healthz` is answered here; `/readyz` from the readiness Python pushes when it changes.
//! * Webhook routes ([`webhook`]) check, build and submit their message straight into the
//!   engine and answer 202 / 503 / `?wait=true` here; Python learns of accepted messages in
//!   batches ([`IngressSink::accepted`]) and of their outcomes through the completion queue.
//! * Python routes (the metrics page, a source's own `Route`) are read here
//!   within their body limit, queued for Python ([`IngressSink::request`]), which drains them in
//!   batches and answers a batch at once ([`Ingress::respond`]).
//! * CloudEvents routes ([`cloudevents`]) decode, route and submit every event of a request
//!   here, as webhooks do.
//! * The callback route ([`crate::callbacks`]) checks each async callback's token, claims its
//!   call, answers here and hands the result to the call waiting in the core. Callbacks are
//!   served on a lean HTTP/1.1 lane ([`callback_lane`]) that hands a connection to hyper at
//!   its first request of any other kind.
//! * Anything else is a 404 here.
//!
//! Connection limits ([`conns`]): a deadline for a new connection's first request head, an
//! idle timeout for keep-alive connections, and a cap on open connections that evicts the
//! oldest connection still waiting for its first head (else the oldest idle one).
//!
//! With a certificate ([`tls`]) the listener speaks HTTPS only; the TLS handshake is part of
//! the wait for the first head (same deadline, same eviction). With `http2`, HTTP/2 is spoken
//! too: h2 over TLS when the client picks it by ALPN, prior-knowledge h2c in clear, HTTP/1.1
//! still on the same port.

mod body;
mod callback;
mod callback_lane;

pub mod cloudevents;
mod conns;
mod rewind;
mod service;
pub mod text;
pub mod tls;
pub mod webhook;

use crate::engine::Engine;
use arc_swap::ArcSwap;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

pub use crate::callbacks::{CallbackRoute, CallbackTable, Claim};
pub use cloudevents::CloudEventsRoute;
pub use conns::ConnectionCounts;
/// Header names as route tables name them.
pub use http::header as http_header;
pub use webhook::WebhookRoute;

/// Longer timeouts are taken as this one (a year: "never" for a connection).
const LONGEST_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The server's settings (`[server]`).
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// `host:port` or `[v6]:port`; port 0 picks a free port.
    pub listen: String,
    /// Time a new connection has to deliver its first request head.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection stays open.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Requests handed to Python and not answered yet; beyond it, 503.
    pub max_pending: usize,
    /// Bytes of one request head (request line and header fields together).
    pub max_head_bytes: usize,
    /// HTTPS with this configuration ([`tls::server_config`]); None: cleartext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Also serve HTTP/2 (h2 by ALPN over TLS, prior-knowledge h2c in clear).
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
}

/// A request for a Python route, read whole.
#[derive(Debug)]
pub struct PyRequest {
    pub id: u64,
    /// Index of the route in the table Python set.
    pub route: usize,
    pub method: String,
    /// The raw path (percent-encoded as sent).
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    pub remote: String,
    /// The body was over the route's limit and was not read (routes with `oversized`).
    pub too_large: bool,
}

/// A message a webhook route accepted (answered 202 or waiting), for Python's metrics and logs.
#[derive(Debug)]
pub struct Accepted {
    pub token: u64,
    pub source: Arc<str>,
    pub topic: String,
    pub message_id: String,
    /// The body, when the route asked for it (`print_request_body`).
    pub payload: Option<Bytes>,
}

/// Something Python should log (the core has no logger): a malformed request, a bad one.
#[derive(Debug)]
pub struct Notice {
    /// `"malformed"` (unparsable HTTP) or `"bad_request"` (a route refused it with a 4xx).
    pub kind: &'static str,
    /// The route's source name, if any.
    pub source: Option<Arc<str>>,
    pub remote: String,
    pub text: String,
}

/// Python's answer to a [`PyRequest`].
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Where requests for Python, accepted messages and notices go. Called on tokio threads:
/// implementations push onto a queue and wake Python at most once per drain.
pub trait IngressSink: Send + Sync + 'static {
    fn request(&self, request: PyRequest);
    fn accepted(&self, accepted: Accepted);
    fn notice(&self, notice: Notice);
}

/// What serves a path.
#[derive(Debug, Clone)]
pub enum RouteKind {
    /// Handed to Python; the body is read first, up to `max_body` bytes. A larger body is a
    /// 413 here, or with `oversized` reaches Python unread (the handler must act on it).
    Python {
        method: String,
        max_body: usize,
        oversized: bool,
    },
    Webhook(Arc<WebhookRoute>),
    /// A `type = "cloudevents"` source ([`cloudevents`]).
    CloudEvents(Arc<CloudEventsRoute>),
    /// Async-invocation callbacks ([`callback`]): token check, claim and body limit here.
    Callback(Arc<CallbackRoute>),
}

#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub path: String,
    /// Whether `path` is a prefix (`/callback/` serves `/callback/<token>`).
    pub prefix: bool,
    pub kind: RouteKind,
}

impl RouteEntry {
    fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.len() > self.path.len() && path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

#[derive(Debug)]
struct Readiness {
    ready: bool,
    text: String,
}

pub(crate) struct Shared {
    engine: Arc<Engine>,
    config: IngressConfig,
    sink: Arc<dyn IngressSink>,
    routes: ArcSwap<Vec<RouteEntry>>,
    readiness: ArcSwap<Readiness>,
    /// Whether the engine has a topic map yet (webhooks answer 503 at once until it does).
    routing_ready: AtomicBool,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_request: AtomicU64,
    next_token: AtomicU64,
    conns: Arc<conns::Tracker>,
    /// The TLS handshake of each connection, when the listener has a certificate.
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
}

/// The running server. Dropping it does not stop it; [`Ingress::stop`] does.
pub struct Ingress {
    shared: Arc<Shared>,
    local: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Ingress {
    /// Binds `config.listen` and serves on the engine's runtime.
    pub fn start(
        engine: Arc<Engine>,
        mut config: IngressConfig,
        sink: Arc<dyn IngressSink>,
    ) -> std::io::Result<Ingress> {
        // Deadlines are instants: a timeout of centuries would overflow them.
        config.header_timeout = config.header_timeout.min(LONGEST_TIMEOUT);
        config.idle_timeout = config.idle_timeout.min(LONGEST_TIMEOUT);
        let listener = bind(&config.listen)?;
        let local = listener.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            conns: Arc::new(conns::Tracker::new(config.max_connections.max(1))),
            tls: config.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            engine: Arc::clone(&engine),
            config,
            sink,
            routes: ArcSwap::from_pointee(Vec::new()),
            readiness: ArcSwap::from_pointee(Readiness {
                ready: false,
                text: "starting".to_owned(),
            }),
            routing_ready: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            next_token: AtomicU64::new(1),
            stop: stop_rx,
        });
        let handle = engine.handle().clone();
        let listener = {
            let _entered = handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        handle.spawn(service::accept_loop(Arc::clone(&shared), listener));
        Ok(Ingress {
            shared,
            local,
            stop: stop_tx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Replaces the route table (Python sets it at start and when a route's settings change).
    pub fn set_routes(&self, routes: Vec<RouteEntry>) {
        self.shared.routes.store(Arc::new(routes));
    }

    /// What `/readyz` answers from now on.
    pub fn set_ready(&self, ready: bool, text: String) {
        self.shared
            .readiness
            .store(Arc::new(Readiness { ready, text }));
    }

    /// Whether the engine has a topic map (webhooks answer 503 at once until it does).
    pub fn set_routing_ready(&self, ready: bool) {
        self.shared.routing_ready.store(ready, Ordering::Release);
    }

    /// Answers the Python requests of a batch; returns how many were still waiting (a request
    /// whose client went away is not).
    pub fn respond(&self, answers: Vec<(u64, Answer)>) -> usize {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut delivered = 0;
        for (id, answer) in answers {
            if let Some(waiter) = pending.remove(&id) {
                delivered += usize::from(waiter.send(answer).is_ok());
            }
        }
        delivered
    }

    pub fn connections(&self) -> ConnectionCounts {
        self.shared.conns.counts()
    }

    /// Stops accepting connections; open ones finish their request and close. Requests still
    /// waiting for Python get 503.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening socket on `listen` (`host:port`), with SO_REUSEADDR (a restart does not wait for
/// TIME_WAIT) and IPv6-only for v6 addresses, non-blocking for tokio.
fn bind(listen: &str) -> std::io::Result<std::net::TcpListener> {
    let address = listen.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{listen} resolves to no address"),
        )
    })?;
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
