//! `fastconn-sink`: the function stand-in for benchmarks. Every POST gets `200 ok` and is
//! counted, so a benchmark checks what was delivered instead of assuming it. When the body
//! starts with a decimal wall-clock timestamp in nanoseconds (the benchmark's publish time),
//! the publish-to-function latency is recorded.
//!
//! `POST /async-function/<name>` plays the OpenFaaS gateway's async path: `202` with
//! `X-Call-Id` at once, then a POST of the result (`200 ok`) to the request's `X-Callback-Url`
//! with `X-Call-Id`, `X-Function-Status`, `X-Function-Name` and `X-Duration-Seconds`.
//!
//! Control endpoints: `GET /__stats` (JSON: requests, bytes, latency percentiles),
//! `POST /__reset`, `POST /__stall?ms=N` (hold every answer for N ms from now; 0 ends it).
//!
//! Usage: `fastconn-sink [--port N] [--threads N] [--tls-cert PEM --tls-key PEM]` (prints
//! `listening on PORT` when ready; with a certificate, then `tls on PORT`: an HTTPS port with
//! the same counters, so a benchmark can compare http and https deliveries on one sink).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The queue worker's HTTP client, reduced to what the sink needs: one `POST` per callback on
/// kept-alive HTTP/1.1 connections to the caller (as Go's `http.Client` does). Each request is
/// written whole in one write and its answer read on the same task: no connection task and no
/// channel between them, so a callback costs the sink about what a served request costs. The
/// gateway runs on other machines in production; here it shares the benchmark's two cores, so
/// its overhead would be charged to fastconn's callback path.
#[derive(Default)]
struct CallbackClient {
    /// Idle connections by `host:port`.
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
}

type Client = Arc<CallbackClient>;

impl CallbackClient {
    fn take(&self, authority: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.get_mut(authority)?.pop()
    }

    fn give_back(&self, authority: &str, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match idle.get_mut(authority) {
            Some(streams) => streams.push(stream),
            None => {
                idle.insert(authority.to_owned(), vec![stream]);
            }
        }
    }

    /// POSTs `request` (a whole HTTP/1.1 request) to `authority`. A failed callback is dropped,
    /// as the queue worker drops one: the caller's call then times out, which the benchmarks
    /// count as failed. An idle connection the caller closed meanwhile fails its write or read:
    /// the request is sent once more on a new connection.
    async fn post(&self, authority: &str, request: &[u8]) {
        if let Some(stream) = self.take(authority) {
            if let Some(stream) = exchange(stream, request).await {
                self.give_back(authority, stream);
                return;
            }
        }
        let Ok(stream) = TcpStream::connect(authority).await else {
            return;
        };
        if stream.set_nodelay(true).is_err() {
            return;
        }
        if let Some(stream) = exchange(stream, request).await {
            self.give_back(authority, stream);
        }
    }
}

/// Writes `request` and reads its answer: the stream back when the answer was read whole and
/// the connection may carry the next request.
async fn exchange(mut stream: TcpStream, request: &[u8]) -> Option<TcpStream> {
    stream.write_all(request).await.ok()?;
    let mut buf = Vec::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(&buf).ok()? {
            httparse::Status::Complete(head) => head,
            httparse::Status::Partial => continue,
        };
        let mut length = None;
        let mut close = false;
        for header in response.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(header.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok();
            } else if header.name.eq_ignore_ascii_case("connection") {
                close = header.value.eq_ignore_ascii_case(b"close");
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return None; // the callback receivers this sink serves answer with a length
            }
        }
        let total = head.checked_add(length?)?;
        while buf.len() < total {
            if stream.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
        // Anything beyond the answer was never asked for: the connection is not reused.
        return (buf.len() == total && !close).then_some(stream);
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    bytes: AtomicU64,
    /// Latency samples in microseconds (bounded: the first 2M per reset).
    latencies: Mutex<Vec<u32>>,
    /// Answers are held until this instant (stall simulation).
    stall_until: Mutex<Option<Instant>>,
}

const MAX_SAMPLES: usize = 2_000_000;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn leading_timestamp(body: &[u8]) -> Option<u128> {
    let digits = body.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits < 16 {
        return None;
    }
    std::str::from_utf8(body.get(..digits)?).ok()?.parse().ok()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted.get(rank).copied().unwrap_or(0)) / 1e6
}

fn text(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    response
}

/// The gateway's queue worker: POST the function's result to the caller's callback URL.
async fn call_back(client: Client, url: String, call_id: String, function: String) {
    // Plain http:// only: the benchmarks' callback listeners are loopback.
    let Some(rest) = url.strip_prefix("http://") else {
        return;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    // The values come from header values hyper parsed, which hold no CR or LF.
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nX-Call-Id: {call_id}\r\n\
         X-Function-Status: 200\r\nX-Function-Name: {function}\r\n\
         X-Duration-Seconds: 0.000100\r\nContent-Length: 2\r\n\r\nok"
    );
    client.post(authority, request.as_bytes()).await;
}

async fn handle(
    stats: Arc<Stats>,
    client: Client,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path().to_owned();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let callback = header("x-callback-url");
    let call_id =
        header("x-call-id").unwrap_or_else(|| stats.requests.load(Ordering::Relaxed).to_string());
    let query = request.uri().query().unwrap_or("").to_owned();
    let method = request.method().clone();
    let body = request.into_body().collect().await?.to_bytes();
    match (method, path.as_str()) {
        (Method::GET, "/__stats") => {
            let mut samples = stats
                .latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            samples.sort_unstable();
            let json = format!(
                "{{\"requests\":{},\"bytes\":{},\"latency_samples\":{},\"p50\":{:.6},\"p99\":{:.6}}}",
                stats.requests.load(Ordering::Relaxed),
                stats.bytes.load(Ordering::Relaxed),
                samples.len(),
                percentile(&samples, 50.0),
                percentile(&samples, 99.0),
            );
            Ok(text(200, json))
        }
        (Method::POST, "/__reset") => {
            stats.requests.store(0, Ordering::Relaxed);
            stats.bytes.store(0, Ordering::Relaxed);
            stats
                .latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            Ok(text(200, "reset\n"))
        }
        (Method::POST, "/__stall") => {
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            *stats
                .stall_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                (ms > 0).then(|| Instant::now() + Duration::from_millis(ms));
            Ok(text(200, "stall set\n"))
        }
        _ => {
            let stall = *stats
                .stall_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(until) = stall {
                tokio::time::sleep_until(until.into()).await;
            }
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            if let Some(sent) = leading_timestamp(&body) {
                let micros = now_ns().saturating_sub(sent) / 1000;
                let mut samples = stats
                    .latencies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if samples.len() < MAX_SAMPLES {
                    samples.push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
            }
            if let Some(function) = path.strip_prefix("/async-function/") {
                if let Some(url) = callback {
                    tokio::spawn(call_back(client, url, call_id.clone(), function.to_owned()));
                }
                let mut response = text(202, Bytes::new());
                if let Ok(value) = hyper::header::HeaderValue::from_str(&call_id) {
                    response.headers_mut().insert("x-call-id", value);
                }
                return Ok(response);
            }
            Ok(text(200, Bytes::from_static(b"ok")))
        }
    }
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn text_arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

/// The HTTPS side's configuration: HTTP/1.1 only, like the plain side.
fn tls_acceptor(cert: &str, key: &str) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("--tls-cert {cert}: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(format!("--tls-key {key}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| invalid(format!("TLS configuration: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A listener on 127.0.0.1 with a deep accept queue: benchmarks open hundreds of connections
/// at once, and the default backlog (128) drops SYNs that come back only after a 1 s retransmit.
fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(4096)
}

/// Serves one accepted connection (after the TLS handshake when `tls` is given).
fn serve(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
    client: Client,
) {
    tokio::spawn(async move {
        let service = service_fn(move |req| handle(Arc::clone(&stats), client.clone(), req));
        let http = http1::Builder::new();
        let _ = match tls {
            None => http.serve_connection(TokioIo::new(stream), service).await,
            Some(acceptor) => match acceptor.accept(stream).await {
                Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                Err(_) => return,
            },
        };
    });
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port = u16::try_from(arg(&args, "--port", 0)).unwrap_or(0);
    let threads = usize::try_from(arg(&args, "--threads", 1))
        .unwrap_or(1)
        .max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let tls = match (text_arg(&args, "--tls-cert"), text_arg(&args, "--tls-key")) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => return Err(invalid("--tls-cert and --tls-key go together".to_owned())),
    };
    runtime.block_on(async move {
        let listener = listen(port)?;
        let tls_listener = match &tls {
            Some(_) => Some(listen(0)?),
            None => None,
        };
        // The benchmark reads these lines to learn the ports.
        let mut ready = format!("listening on {}\n", listener.local_addr()?.port());
        if let Some(l) = &tls_listener {
            ready += &format!("tls on {}\n", l.local_addr()?.port());
        }
        let mut out = std::io::stdout().lock();
        std::io::Write::write_all(&mut out, ready.as_bytes())?;
        std::io::Write::flush(&mut out)?;
        drop(out);
        let stats = Arc::new(Stats::default());
        let client = Client::default();
        if let (Some(listener), Some(acceptor)) = (tls_listener, tls) {
            let stats = Arc::clone(&stats);
            let client = client.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    if stream.set_nodelay(true).is_ok() {
                        serve(
                            stream,
                            Some(acceptor.clone()),
                            Arc::clone(&stats),
                            client.clone(),
                        );
                    }
                }
            });
        }
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            serve(stream, None, Arc::clone(&stats), client.clone());
        }
    })
}
