//! A lean HTTP/1.1 client for one job: POST a body, read the whole response, keep the
//! connection for the next call.
//!
//! Why not hyper's pooled client: each call there crosses a channel to a per-connection task
//! and goes through a general-purpose pool, which cost ~2x the CPU of the request itself on this
//! path. Here the calling task writes the request and reads the response on a connection it
//! checked out of a per-host LIFO stack, so one call is one task, one write and (usually) one
//! read. This module only does the I/O; HTTP/1.1 framing (Content-Length, chunked and
//! read-to-close bodies, 1xx answers, `Connection: close`, HTTP/1.0 servers, and refusing
//! anything RFC 9112 calls broken) is [`crate::framing`]'s.
//!
//! A request is written at most once per attempt: a pooled connection is checked before it is
//! used, and once any byte of a request was written, whatever goes wrong is that attempt's
//! result, for the retry policy to count and decide on.
//!
//! `https://` URLs go over TLS ([`crate::stream`], configured by [`crate::tls`]); the pool keeps
//! those connections alive the same way.

use crate::framing::{Progress, Response, ResponseDecoder};
use crate::message::ErrorKind;
use crate::stream::{self, Stream};
use crate::tls::ClientAuth;
use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Idle connections older than this are closed rather than reused: servers close idle
/// keep-alive connections after their own timeout (often 60 s or more), and reusing one just
/// as it closes costs a failed attempt.
const IDLE_EXPIRY: Duration = Duration::from_secs(30);

/// What one attempt produced.
#[derive(Debug, Default)]
pub(crate) struct Attempt {
    pub status: u16,
    pub error: ErrorKind,
    pub retry_after: Option<Duration>,
    pub body: Option<Bytes>,
    pub headers: Option<Vec<(String, String)>>,
}

impl Attempt {
    fn error(kind: ErrorKind) -> Self {
        Attempt {
            error: kind,
            ..Attempt::default()
        }
    }

    /// A failed attempt whose body says why (for logs and dead-letter context).
    pub(crate) fn failed(kind: ErrorKind, why: Bytes) -> Self {
        Attempt {
            error: kind,
            body: Some(why),
            ..Attempt::default()
        }
    }

    fn from_response(response: Response) -> Self {
        Attempt {
            status: response.status,
            error: ErrorKind::None,
            retry_after: response.retry_after,
            body: (!response.body.is_empty()).then_some(response.body),
            headers: response.headers,
        }
    }
}

/// Where a target's requests go: resolved once per routing table.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `host:port` to connect to.
    pub authority: String,
    /// The pool key: scheme and authority, so a plain and a TLS connection to the same
    /// `host:port` are never mixed up.
    pub pool_key: String,
    /// For `https://`: the name the server's certificate must carry (sent as SNI when it is a
    /// DNS name; an IP address is matched against the certificate's IP addresses, no SNI).
    pub tls_name: Option<ServerName<'static>>,
    /// The request line and `Host` header, ready to write.
    pub head: Bytes,
}

impl Endpoint {
    /// Parses an `http(s)://host[:port][/path][?query]` URL.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err("only http:// and https:// URLs are supported".to_owned());
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(
                "expected http(s)://host[:port]/path (no credentials in the URL)".to_owned(),
            );
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err("the path contains spaces or control characters".to_owned());
        }
        let (host, port) = split_authority(authority)?;
        let default_port = if tls { 443 } else { 80 };
        let connect = format!(
            "{}:{}",
            authority_host(authority, host),
            port.unwrap_or(default_port)
        );
        let tls_name = if tls {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{host:?} is not a valid host name for TLS"))?;
            Some(name)
        } else {
            None
        };
        let scheme = if tls { "https" } else { "http" };
        let head = format!("POST {path} HTTP/1.1\r\nhost: {authority}\r\n");
        Ok(Endpoint {
            pool_key: format!("{scheme}://{connect}"),
            authority: connect,
            tls_name,
            head: Bytes::from(head),
        })
    }
}

/// Splits `host[:port]` / `[v6]:port` into the host (without brackets) and the port, if any.
fn split_authority(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("an IPv6 address needs its closing ']'")?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or("expected ':port' after ']'")?,
                    ),
                ),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("the URL has no host".to_owned());
    }
    if !authority.starts_with('[') && host.contains(':') {
        return Err("an IPv6 address must be in brackets: http(s)://[::1]:8080/".to_owned());
    }
    let port = match port {
        // "host:" is the default port (RFC 3986 §3.2.3).
        Some("") => None,
        Some(text) => Some(
            text.parse::<u16>()
                .map_err(|_| format!("invalid port {text:?}: expected 0..65535"))?,
        ),
        None => None,
    };
    Ok((host, port))
}

/// The host part of `authority` as written (IPv6 addresses keep their brackets).
fn authority_host<'a>(authority: &'a str, host: &'a str) -> &'a str {
    if authority.starts_with('[') {
        authority.get(..host.len() + 2).unwrap_or(authority)
    } else {
        host
    }
}

/// A connection's byte stream (plain TCP, or TLS over TCP: [`Stream`]).
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// Whether an idle pooled connection can carry a new request. Must not block.
    fn is_idle_and_open(&self) -> bool;
}

impl Transport for Stream {
    fn is_idle_and_open(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_idle_and_open(),
            // The TCP socket under the session: a close_notify or anything else the server
            // sent on an idle connection shows up there as unread bytes, and such a
            // connection is not reused.
            Stream::Tls(tls) => tls.get_ref().0.is_idle_and_open(),
        }
    }
}

impl Transport for TcpStream {
    fn is_idle_and_open(&self) -> bool {
        // Ask the kernel, not tokio's readiness cache: the peer's FIN may have arrived without
        // the reactor having seen it yet. A non-blocking peek (the socket is non-blocking):
        // WouldBlock = open with nothing pending; 0 = the peer closed it; bytes = something
        // we did not ask for, so its framing is no longer trusted.
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(self).peek(&mut probe) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }
}

struct Conn<S> {
    stream: S,
    buf: BytesMut,
    idle_since: Instant,
    /// What the TLS handshake showed about client certificates (for diagnosing a server
    /// that closes without answering).
    client_auth: ClientAuth,
}

/// Idle keep-alive connections per pool key (scheme and authority), most recently used first
/// out.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<Conn<Stream>>>>,
    max_idle_per_host: usize,
    connect_timeout: Duration,
    /// For `https://` endpoints; without it they fail (final) with a TLS error.
    tls: Option<TlsConnector>,
}

impl Pool {
    pub fn new(max_idle_per_host: usize, connect_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_host: max_idle_per_host.max(1),
            connect_timeout,
            tls: None,
        }
    }

    /// Closes every idle connection. The engine calls it when it closes: a closed dispatcher
    /// that is still referenced (embedders, tests) must not keep its sockets open.
    pub fn clear(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(idle);
    }

    /// Enables `https://` endpoints with this configuration (one per engine, so its session
    /// cache lets reconnects resume their TLS sessions).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Pool {
        self.tls = Some(TlsConnector::from(config));
        self
    }

    /// The most recently used idle connection that is still fresh and open. Stale ones are
    /// dropped here, before a request is written to them: once a request is written, it is
    /// never sent again behind the retry policy's back.
    fn checkout(&self, authority: &str) -> Option<Conn<Stream>> {
        loop {
            let conn = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                idle.get_mut(authority)?.pop()?
            };
            if conn.idle_since.elapsed() < IDLE_EXPIRY && conn.stream.is_idle_and_open() {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, authority: &str, mut conn: Conn<Stream>) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let stack = match idle.get_mut(authority) {
            Some(stack) => stack,
            None => idle.entry(authority.to_owned()).or_default(),
        };
        if stack.len() < self.max_idle_per_host {
            stack.push(conn);
        }
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Conn<Stream>, Attempt> {
        let tls = match (&endpoint.tls_name, &self.tls) {
            (None, _) => None,
            (Some(name), Some(connector)) => Some((connector, name)),
            (Some(_), None) => {
                let why = "https:// is not enabled in this client (no TLS configuration)";
                return Err(Attempt::failed(
                    ErrorKind::Tls,
                    Bytes::from_static(why.as_bytes()),
                ));
            }
        };
        let (stream, client_auth) = stream::connect(&endpoint.authority, tls, self.connect_timeout)
            .await
            .map_err(|failure| match failure.detail {
                Some(detail) => Attempt::failed(failure.kind, Bytes::from(detail)),
                None => Attempt::error(failure.kind),
            })?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            idle_since: Instant::now(),
            client_auth,
        })
    }

    /// One attempt: `head` is the full request head (request line, headers, blank line).
    pub async fn attempt(
        &self,
        endpoint: &Endpoint,
        head: &[u8],
        body: &Bytes,
        timeout: Duration,
        capture: bool,
    ) -> Attempt {
        match tokio::time::timeout(timeout, self.send(endpoint, head, body, capture)).await {
            Ok(attempt) => attempt,
            Err(_) => Attempt::error(ErrorKind::Timeout),
        }
    }

    async fn send(&self, endpoint: &Endpoint, head: &[u8], body: &Bytes, capture: bool) -> Attempt {
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head);
        request.extend_from_slice(body);
        if let Some(mut conn) = self.checkout(&endpoint.pool_key) {
            match exchange(&mut conn, &request, capture, &endpoint.authority).await {
                Exchange::Done(attempt, reusable) => {
                    return self.finish(endpoint, attempt, reusable.then_some(conn))
                }
                // Not one byte left: the server cannot have seen the request, so it may go
                // on a fresh connection within this same attempt.
                Exchange::Unsent => {}
                Exchange::Failed(attempt) => return attempt,
            }
        }
        let mut conn = match self.connect(endpoint).await {
            Ok(conn) => conn,
            Err(attempt) => return attempt,
        };
        let client_auth = conn.client_auth;
        let broke = |attempt: Attempt| {
            // A fresh TLS connection the server closed without answering: the handshake may
            // tell why (it asked for a client certificate).
            match stream::closed_after_handshake(client_auth, &endpoint.authority) {
                Some((kind, why)) => Attempt::failed(kind, Bytes::from(why)),
                None => attempt,
            }
        };
        match exchange(&mut conn, &request, capture, &endpoint.authority).await {
            Exchange::Done(attempt, reusable) => {
                self.finish(endpoint, attempt, reusable.then_some(conn))
            }
            Exchange::Unsent => broke(Attempt::failed(
                ErrorKind::Io,
                Bytes::from_static(b"the connection broke before the request could be sent"),
            )),
            Exchange::Failed(attempt) if attempt.error == ErrorKind::Io => broke(attempt),
            Exchange::Failed(attempt) => attempt,
        }
    }

    fn finish(&self, endpoint: &Endpoint, attempt: Attempt, keep: Option<Conn<Stream>>) -> Attempt {
        if let Some(conn) = keep {
            self.checkin(&endpoint.pool_key, conn);
        }
        attempt
    }
}

enum Exchange {
    /// A complete response, and whether the connection may be reused.
    Done(Attempt, bool),
    /// The connection failed before any byte of the request was written.
    Unsent,
    /// The request (or part of it) was written: this attempt counts, whatever happened.
    Failed(Attempt),
}

/// Writes the request and reads the response: I/O only, the framing is [`ResponseDecoder`]'s.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    request: &[u8],
    capture: bool,
    authority: &str,
) -> Exchange {
    match write_request(&mut conn.stream, request).await {
        Ok(()) => {}
        Err(Written::Nothing) => return Exchange::Unsent,
        Err(Written::Part) => {
            return Exchange::Failed(Attempt::failed(
                ErrorKind::Io,
                Bytes::from_static(b"the connection broke while the request was being sent"),
            ))
        }
    }
    conn.buf.clear();
    let mut decoder = ResponseDecoder::new(capture);
    let cut_short = || {
        Exchange::Failed(Attempt::failed(
            ErrorKind::Io,
            Bytes::from_static(
                b"the connection closed after the request was sent, before a complete response",
            ),
        ))
    };
    loop {
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return match decoder.eof(&mut conn.buf) {
                    Some(response) => Exchange::Done(Attempt::from_response(response), false),
                    None => cut_short(),
                }
            }
            Ok(_) => {}
            // In TLS 1.3 a server that refuses the client's certificate says so only here,
            // with an alert on the first read.
            Err(e) => {
                return match stream::tls_failure(&e, authority) {
                    Some(why) => {
                        Exchange::Failed(Attempt::failed(ErrorKind::Tls, Bytes::from(why)))
                    }
                    None => cut_short(),
                }
            }
        }
        match decoder.feed(&mut conn.buf) {
            Ok(Progress::NeedMore) => {}
            Ok(Progress::Done(response)) => {
                let reusable = response.reusable;
                return Exchange::Done(Attempt::from_response(response), reusable);
            }
            // The connection is dropped with the error: after broken framing, its next bytes
            // could belong to any response.
            Err(e) => {
                return Exchange::Failed(Attempt::failed(
                    ErrorKind::Protocol,
                    Bytes::from(e.to_string()),
                ))
            }
        }
    }
}

/// How much of a request reached the connection before it failed.
enum Written {
    Nothing,
    Part,
}

async fn write_request<S: AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> Result<(), Written> {
    let mut written = 0;
    while let Some(rest) = request.get(written..).filter(|rest| !rest.is_empty()) {
        match stream.write(rest).await {
            Ok(n) if n > 0 => written += n,
            Ok(_) | Err(_) if written == 0 => return Err(Written::Nothing),
            Ok(_) | Err(_) => return Err(Written::Part),
        }
    }
    // A no-op on TCP; a TLS stream sends its buffered records here.
    stream.flush().await.map_err(|_| Written::Part)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::net::TcpListener;
    use tokio::sync::{watch, Notify};

    #[test]
    fn parses_endpoints() {
        let e = Endpoint::parse("http://gw:8080/function/echo").expect("valid");
        assert_eq!(e.authority, "gw:8080");
        assert_eq!(
            &e.head[..],
            b"POST /function/echo HTTP/1.1\r\nhost: gw:8080\r\n"
        );
        let e = Endpoint::parse("http://gw").expect("valid");
        assert_eq!(e.authority, "gw:80");
        assert_eq!(&e.head[..], b"POST / HTTP/1.1\r\nhost: gw\r\n");
        let e = Endpoint::parse("http://[::1]:9000/f?x=1").expect("valid");
        assert_eq!(e.authority, "[::1]:9000");
        assert!(Endpoint::parse("ftp://gw/f").is_err());
        assert!(Endpoint::parse("http://user:pw@gw/f").is_err());
        assert!(Endpoint::parse("http://gw/a b").is_err());
    }

    /// What the scripted server does next, in order across all its connections.
    enum Step {
        /// Read one request and write this reply (closing after a `Connection: close` one).
        Answer(Vec<u8>),
        /// Read one request and close the connection without answering.
        HangUp,
        /// Close the idle connection without reading anything.
        Close,
        /// When the test says go, write these bytes nobody asked for.
        Push(&'static [u8]),
    }

    fn answer(reply: &[u8]) -> Step {
        Step::Answer(reply.to_vec())
    }

    /// A raw HTTP/1.1 server following a script: counts the complete requests it read and
    /// the steps it completed, so tests wait for conditions instead of sleeping.
    struct Scripted {
        addr: String,
        requests: Arc<AtomicUsize>,
        steps_done: watch::Receiver<usize>,
        go: Arc<Notify>,
        /// Resolves to the number of connections accepted once the script is done.
        connections: tokio::task::JoinHandle<usize>,
    }

    impl Scripted {
        async fn wait_for_steps(&mut self, n: usize) {
            tokio::time::timeout(
                Duration::from_secs(5),
                self.steps_done.wait_for(|done| *done >= n),
            )
            .await
            .expect("the server got that far within 5 s")
            .expect("server alive");
        }
    }

    /// Reads one request (head and Content-Length body); false when the peer closed first.
    async fn read_request(stream: &mut TcpStream) -> bool {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            got.extend_from_slice(buf.get(..n).unwrap_or_default());
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head =
                    String::from_utf8_lossy(got.get(..i).unwrap_or_default()).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= i + 4 + len {
                    return true;
                }
            }
        }
    }

    async fn scripted(steps: Vec<Step>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let (done_tx, steps_done) = watch::channel(0);
        let go = Arc::new(Notify::new());
        let (count, go_rx) = (Arc::clone(&requests), Arc::clone(&go));
        let connections = tokio::spawn(async move {
            let mut connections = 0;
            let mut steps = steps.into_iter().peekable();
            // Dropping a stream closes its connection.
            'accept: while steps.peek().is_some() {
                let Ok((mut stream, _)) = listener.accept().await else {
                    break;
                };
                connections += 1;
                while let Some(step) = steps.peek() {
                    match step {
                        Step::Answer(_) | Step::HangUp => {
                            if !read_request(&mut stream).await {
                                // The client dropped this connection: same step, next one.
                                continue 'accept;
                            }
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Step::Push(_) => go_rx.notified().await,
                        Step::Close => {}
                    }
                    let keep_open = match steps.next() {
                        Some(Step::Answer(reply)) => {
                            stream.write_all(&reply).await.is_ok()
                                && !reply.windows(17).any(|w| w == b"Connection: close")
                        }
                        Some(Step::Push(bytes)) => stream.write_all(bytes).await.is_ok(),
                        _ => false,
                    };
                    done_tx.send_modify(|done| *done += 1);
                    if !keep_open {
                        continue 'accept;
                    }
                }
            }
            connections
        });
        Scripted {
            addr,
            requests,
            steps_done,
            go,
            connections,
        }
    }

    async fn call(pool: &Pool, addr: &str, capture: bool) -> Attempt {
        let endpoint = Endpoint::parse(&format!("http://{addr}/f")).expect("endpoint");
        let mut head = endpoint.head.to_vec();
        head.extend_from_slice(b"content-length: 5\r\n\r\n");
        pool.attempt(
            &endpoint,
            &head,
            &Bytes::from_static(b"hello"),
            Duration::from_secs(5),
            capture,
        )
        .await
    }

    fn body_text(a: &Attempt) -> String {
        String::from_utf8_lossy(a.body.as_deref().unwrap_or_default()).into_owned()
    }

    #[tokio::test]
    async fn framing_variants_and_keep_alive() {
        let server = scripted(vec![
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n"),
            answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
            answer(b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy"),
            answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close"),
        ])
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        let a = call(&pool, &server.addr, true).await;
        assert_eq!((a.status, a.body.as_deref()), (200, Some(&b"ok"[..])));
        let a = call(&pool, &server.addr, true).await;
        assert_eq!((a.status, a.body.as_deref()), (201, Some(&b"abcde"[..])));
        assert!(a
            .headers
            .expect("captured")
            .iter()
            .any(|(k, v)| k == "X-A" && v == "b"));
        let a = call(&pool, &server.addr, false).await;
        assert_eq!((a.status, a.body), (204, None));
        let a = call(&pool, &server.addr, false).await;
        assert_eq!(a.status, 503);
        assert_eq!(a.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            a.body.as_deref(),
            Some(&b"busy"[..]),
            "failures keep an excerpt"
        );
        let a = call(&pool, &server.addr, true).await;
        assert_eq!(
            (a.status, a.body.as_deref()),
            (200, Some(&b"until close"[..]))
        );
        drop(pool);
        assert_eq!(
            server.connections.await.expect("server"),
            1,
            "one keep-alive connection served all five"
        );
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_before_the_request_is_written() {
        let mut server = scripted(vec![
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
            Step::Close,
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
        ])
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        assert_eq!(
            call(&pool, &server.addr, true).await.body.as_deref(),
            Some(&b"a"[..])
        );
        server.wait_for_steps(2).await;
        let a = call(&pool, &server.addr, true).await;
        assert_eq!(
            (a.status, a.error, a.body.as_deref()),
            (200, ErrorKind::None, Some(&b"b"[..]))
        );
        assert_eq!(server.requests.load(Ordering::SeqCst), 2);
        drop(pool);
        assert_eq!(server.connections.await.expect("server"), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_with_unsolicited_bytes_is_not_reused() {
        let mut server = scripted(vec![
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
            Step::Push(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nX"),
            Step::Close,
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"),
        ])
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        assert_eq!(call(&pool, &server.addr, true).await.status, 200);
        server.go.notify_one();
        server.wait_for_steps(2).await;
        let a = call(&pool, &server.addr, true).await;
        assert_eq!(
            (a.status, a.body.as_deref()),
            (200, Some(&b"b"[..])),
            "the pushed bytes were not taken for this call's response"
        );
        drop(pool);
        assert_eq!(server.connections.await.expect("server"), 2);
    }

    #[tokio::test]
    async fn a_request_the_server_read_is_never_sent_again_within_an_attempt() {
        // The reused connection is open when checked out; the server reads the whole request
        // and closes without answering. That is one failed attempt, not a silent resend.
        let server = scripted(vec![
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
            Step::HangUp,
            Step::HangUp,
        ])
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        assert_eq!(call(&pool, &server.addr, false).await.status, 200);
        let a = call(&pool, &server.addr, false).await;
        assert_eq!((a.status, a.error), (0, ErrorKind::Io));
        assert!(
            body_text(&a).contains("after the request was sent"),
            "{}",
            body_text(&a)
        );
        assert_eq!(
            server.requests.load(Ordering::SeqCst),
            2,
            "one request per attempt: the first call's and this one's"
        );
        // A second attempt (the retry policy's) goes on a fresh connection, once.
        let a = call(&pool, &server.addr, false).await;
        assert_eq!(a.error, ErrorKind::Io);
        assert_eq!(server.requests.load(Ordering::SeqCst), 3);
        assert_eq!(server.connections.await.expect("server"), 2);
    }

    #[tokio::test]
    async fn too_many_headers_is_a_final_protocol_error_that_says_why() {
        let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
        for i in 1..140 {
            reply.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        reply.extend_from_slice(b"\r\nok");
        let server = scripted(vec![
            Step::Answer(reply),
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
        ])
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        let a = call(&pool, &server.addr, false).await;
        assert_eq!((a.status, a.error), (0, ErrorKind::Protocol));
        assert_eq!(body_text(&a), "response has 140 headers, the limit is 100");
        assert!(!crate::retry::RetryPolicy::default().is_retryable(a.status, a.error));
        let a = call(&pool, &server.addr, false).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            server.connections.await.expect("server"),
            2,
            "the connection of the broken response was closed, not reused"
        );
    }

    #[tokio::test]
    async fn broken_framing_closes_the_connection() {
        let replies: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n",
        ];
        let mut steps = Vec::new();
        for reply in replies {
            steps.push(answer(reply));
        }
        let server = scripted(steps).await;
        let pool = Pool::new(4, Duration::from_secs(1));
        let mut reasons = Vec::new();
        for _ in replies {
            let a = call(&pool, &server.addr, false).await;
            assert_eq!((a.status, a.error), (0, ErrorKind::Protocol));
            reasons.push(body_text(&a));
        }
        assert!(
            reasons[0].contains("conflicting Content-Length"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].contains("invalid Content-Length \"+2\""),
            "{reasons:?}"
        );
        assert!(
            reasons[2].contains("both Content-Length and Transfer-Encoding"),
            "{reasons:?}"
        );
        assert!(reasons[3].contains("not followed by CRLF"), "{reasons:?}");
        drop(pool);
        assert_eq!(
            server.connections.await.expect("server"),
            4,
            "every broken response cost its connection"
        );
    }

    #[tokio::test]
    async fn connect_refused_and_timeouts_are_classified() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let pool = Pool::new(4, Duration::from_secs(1));
        assert_eq!(call(&pool, &addr, false).await.error, ErrorKind::Connect);

        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let endpoint = Endpoint::parse(&format!("http://{addr}/f")).expect("endpoint");
        let mut head = endpoint.head.to_vec();
        head.extend_from_slice(b"content-length: 0\r\n\r\n");
        let a = pool
            .attempt(
                &endpoint,
                &head,
                &Bytes::new(),
                Duration::from_millis(100),
                false,
            )
            .await;
        assert_eq!(a.error, ErrorKind::Timeout);
        drop(silent);
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let server = scripted(vec![answer(b"NOT HTTP AT ALL\r\n\r\n")]).await;
        let pool = Pool::new(4, Duration::from_secs(1));
        let a = call(&pool, &server.addr, false).await;
        assert_eq!(a.error, ErrorKind::Protocol);
        assert!(
            body_text(&a).starts_with("malformed response head"),
            "{}",
            body_text(&a)
        );
    }
}
