//! A lean HTTP/1.1 client for one job: POST a body, read the whole response, keep the
//! connection for the next call.
//!
//! Why not hyper's pooled client: each call there crosses a channel to a per-connection task
//! and goes through a general-purpose pool, which cost ~2x the CPU of the request itself on this
//! path. Here the calling task writes the request and reads the response on a connection it
//! checked out of a per-host LIFO stack, so one call is one task, one write and (usually) one
//! read. Everything HTTP/1.1 framing needs is handled: Content-Length, chunked bodies,
//! read-to-close bodies, informational 1xx answers, `Connection: close`, HTTP/1.0 servers.
//! `https://` URLs go over TLS ([`crate::stream`], configured by [`crate::tls`]); the pool keeps
//! those connections alive the same way.

use crate::message::ErrorKind;
use crate::retry::parse_retry_after;
use crate::stream::{self, Stream};
use crate::tls::ClientAuth;
use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncReadExt;
use tokio_rustls::TlsConnector;

/// How much of a failed call's body is kept for logs and dead-letter context.
pub(crate) const FAILURE_EXCERPT: usize = 1024;
/// Response bodies beyond this are read (so the connection stays usable) but not kept.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Response heads larger than this are refused.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
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

    /// A failure with an explanation in place of a response body excerpt.
    fn failure(kind: ErrorKind, detail: String) -> Self {
        Attempt {
            error: kind,
            body: Some(Bytes::from(detail)),
            ..Attempt::default()
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

struct Conn {
    stream: Stream,
    buf: BytesMut,
    idle_since: Instant,
    /// What the TLS handshake showed about client certificates (for diagnosing a server
    /// that closes without answering).
    client_auth: ClientAuth,
}

/// Idle keep-alive connections per pool key (scheme and authority), most recently used first
/// out.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
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

    /// Enables `https://` endpoints with this configuration (one per engine, so its session
    /// cache lets reconnects resume their TLS sessions).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Pool {
        self.tls = Some(TlsConnector::from(config));
        self
    }

    fn checkout(&self, key: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let stack = idle.get_mut(key)?;
        while let Some(conn) = stack.pop() {
            if conn.idle_since.elapsed() < IDLE_EXPIRY {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, key: &str, mut conn: Conn) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let stack = match idle.get_mut(key) {
            Some(stack) => stack,
            None => idle.entry(key.to_owned()).or_default(),
        };
        if stack.len() < self.max_idle_per_host {
            stack.push(conn);
        }
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Conn, Attempt> {
        let tls = match (&endpoint.tls_name, &self.tls) {
            (None, _) => None,
            (Some(name), Some(connector)) => Some((connector, name)),
            (Some(_), None) => {
                let why = "https:// is not enabled in this client (no TLS configuration)";
                return Err(Attempt::failure(ErrorKind::Tls, why.to_owned()));
            }
        };
        let (stream, client_auth) = stream::connect(&endpoint.authority, tls, self.connect_timeout)
            .await
            .map_err(|failure| match failure.detail {
                Some(detail) => Attempt::failure(failure.kind, detail),
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
        // A pooled connection the server closed while idle fails before any response byte
        // arrives; the request was not processed, so it goes again on a fresh connection
        // without counting as an attempt.
        if let Some(conn) = self.checkout(&endpoint.pool_key) {
            match exchange(conn, &request, capture).await {
                Exchange::Done(attempt, keep) => return self.finish(endpoint, attempt, keep),
                Exchange::Stale => {}
                Exchange::Failed(kind) => return Attempt::error(kind),
                Exchange::TlsFailed(e) => return tls_attempt(&e, endpoint),
            }
        }
        let conn = match self.connect(endpoint).await {
            Ok(conn) => conn,
            Err(attempt) => return attempt,
        };
        let client_auth = conn.client_auth;
        match exchange(conn, &request, capture).await {
            Exchange::Done(attempt, keep) => self.finish(endpoint, attempt, keep),
            // A fresh connection closed before any answer.
            Exchange::Stale => {
                match stream::closed_after_handshake(client_auth, &endpoint.authority) {
                    Some((kind, why)) => Attempt::failure(kind, why),
                    None => Attempt::error(ErrorKind::Io),
                }
            }
            Exchange::Failed(kind) => Attempt::error(kind),
            Exchange::TlsFailed(e) => tls_attempt(&e, endpoint),
        }
    }

    fn finish(&self, endpoint: &Endpoint, attempt: Attempt, keep: Option<Conn>) -> Attempt {
        if let Some(conn) = keep {
            self.checkin(&endpoint.pool_key, conn);
        }
        attempt
    }
}

fn tls_attempt(error: &std::io::Error, endpoint: &Endpoint) -> Attempt {
    match stream::tls_failure(error, &endpoint.authority) {
        Some(detail) => Attempt::failure(ErrorKind::Tls, detail),
        None => Attempt::error(ErrorKind::Io),
    }
}

enum Exchange {
    /// A complete response; the connection when it can be reused.
    Done(Attempt, Option<Conn>),
    /// The connection was closed before any response byte (an expired keep-alive).
    Stale,
    Failed(ErrorKind),
    /// The TLS layer failed after the handshake: in TLS 1.3 a server that refuses the client's
    /// certificate says so only here, with an alert on the first read.
    TlsFailed(std::io::Error),
}

async fn exchange(mut conn: Conn, request: &[u8], capture: bool) -> Exchange {
    if conn.stream.send(request).await.is_err() {
        return Exchange::Stale;
    }
    conn.buf.clear();
    let mut first_read = true;
    // Read until a final (non-1xx) response head parses.
    let (status, head_len, framing, keep_alive, retry_after, headers) = loop {
        match parse_head(&conn.buf, capture) {
            Ok(Some(parsed)) if (100..200).contains(&parsed.status) => {
                conn.buf.advance(parsed.head_len);
                continue;
            }
            Ok(Some(p)) => {
                break (
                    p.status,
                    p.head_len,
                    p.framing,
                    p.keep_alive,
                    p.retry_after,
                    p.headers,
                )
            }
            Ok(None) => {}
            Err(()) => return Exchange::Failed(ErrorKind::Io),
        }
        if conn.buf.len() > MAX_HEAD {
            return Exchange::Failed(ErrorKind::Io);
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Err(e) if crate::tls::failure_reason(&e).is_some() => return Exchange::TlsFailed(e),
            Ok(0) | Err(_) if first_read && conn.buf.is_empty() => return Exchange::Stale,
            Ok(0) | Err(_) => return Exchange::Failed(ErrorKind::Io),
            Ok(_) => first_read = false,
        }
    };
    conn.buf.advance(head_len);
    let keep_body = capture || !(200..300).contains(&status);
    let limit = if capture { MAX_BODY } else { FAILURE_EXCERPT };
    let (body, reusable) = match framing {
        Framing::Empty => (Bytes::new(), true),
        Framing::Length(n) => match read_length(&mut conn, n, keep_body, limit).await {
            Ok(body) => (body, true),
            Err(()) => return Exchange::Failed(ErrorKind::Io),
        },
        Framing::Chunked => match read_chunked(&mut conn, keep_body, limit).await {
            Ok(body) => (body, true),
            Err(()) => return Exchange::Failed(ErrorKind::Io),
        },
        Framing::UntilClose => match read_to_close(&mut conn, keep_body, limit).await {
            Ok(body) => (body, false),
            Err(()) => return Exchange::Failed(ErrorKind::Io),
        },
    };
    // Bytes beyond the response mean the server sent something we did not ask for: do not
    // reuse a connection whose framing we no longer trust.
    let reusable = reusable && keep_alive && conn.buf.is_empty();
    let attempt = Attempt {
        status,
        error: ErrorKind::None,
        retry_after,
        body: (keep_body && !body.is_empty()).then_some(body),
        headers,
    };
    Exchange::Done(attempt, reusable.then_some(conn))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
    retry_after: Option<Duration>,
    headers: Option<Vec<(String, String)>>,
}

fn parse_head(buf: &[u8], capture: bool) -> Result<Option<Head>, ()> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = response.code.ok_or(())?;
    let http10 = response.version == Some(0);
    let mut keep_alive = !http10;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut retry_after = None;
    for h in response.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).map_err(|_| ())?.trim();
            length = Some(text.parse().map_err(|_| ())?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .windows(7)
                .any(|w| w.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if value.contains("close") {
                keep_alive = false;
            } else if value.contains("keep-alive") {
                keep_alive = true;
            }
        } else if (status == 429 || status == 503) && name.eq_ignore_ascii_case("retry-after") {
            retry_after = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let headers = capture.then(|| {
        response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect()
    });
    Ok(Some(Head {
        status,
        head_len,
        framing,
        keep_alive,
        retry_after,
        headers,
    }))
}

/// Collects up to `limit` body bytes (when `keep`), discarding the rest.
struct BodySink {
    keep: bool,
    limit: usize,
    data: BytesMut,
}

impl BodySink {
    fn new(keep: bool, limit: usize) -> Self {
        BodySink {
            keep,
            limit,
            data: BytesMut::new(),
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.keep && self.data.len() < self.limit {
            let room = self.limit - self.data.len();
            self.data
                .extend_from_slice(chunk.get(..chunk.len().min(room)).unwrap_or_default());
        }
    }
}

async fn fill(conn: &mut Conn) -> Result<(), ()> {
    match conn.stream.read_buf(&mut conn.buf).await {
        Ok(0) | Err(_) => Err(()),
        Ok(_) => Ok(()),
    }
}

async fn read_length(
    conn: &mut Conn,
    mut remaining: usize,
    keep: bool,
    limit: usize,
) -> Result<Bytes, ()> {
    // The common case: the whole body arrived with the head.
    if !keep && conn.buf.len() >= remaining {
        conn.buf.advance(remaining);
        return Ok(Bytes::new());
    }
    let mut sink = BodySink::new(keep, limit);
    loop {
        let take = remaining.min(conn.buf.len());
        sink.push(conn.buf.get(..take).unwrap_or_default());
        conn.buf.advance(take);
        remaining -= take;
        if remaining == 0 {
            return Ok(sink.data.freeze());
        }
        fill(conn).await?;
    }
}

async fn read_to_close(conn: &mut Conn, keep: bool, limit: usize) -> Result<Bytes, ()> {
    let mut sink = BodySink::new(keep, limit);
    loop {
        sink.push(&conn.buf);
        conn.buf.clear();
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => return Ok(sink.data.freeze()),
            Ok(_) => {}
            Err(_) => return Err(()),
        }
    }
}

/// Finds a CRLF-terminated line at the start of the buffer, reading more as needed.
async fn read_line(conn: &mut Conn) -> Result<BytesMut, ()> {
    loop {
        if let Some(i) = conn.buf.windows(2).position(|w| w == b"\r\n") {
            let line = conn.buf.split_to(i);
            conn.buf.advance(2);
            return Ok(line);
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(());
        }
        fill(conn).await?;
    }
}

async fn read_chunked(conn: &mut Conn, keep: bool, limit: usize) -> Result<Bytes, ()> {
    let mut sink = BodySink::new(keep, limit);
    loop {
        let line = read_line(conn).await?;
        let size_text = std::str::from_utf8(&line).map_err(|_| ())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ())?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            while !read_line(conn).await?.is_empty() {}
            return Ok(sink.data.freeze());
        }
        let mut remaining = size;
        while remaining > 0 {
            if conn.buf.is_empty() {
                fill(conn).await?;
            }
            let take = remaining.min(conn.buf.len());
            sink.push(conn.buf.get(..take).unwrap_or_default());
            conn.buf.advance(take);
            remaining -= take;
        }
        if !read_line(conn).await?.is_empty() {
            return Err(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

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

    /// A server that answers each request on a connection with the next scripted raw reply.
    async fn scripted_server(
        replies: Vec<&'static [u8]>,
        close_after_each: bool,
    ) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let handle = tokio::spawn(async move {
            let mut connections = 0;
            let mut replies = replies.into_iter();
            // Dropping the stream closes the connection (read-to-close bodies end there).
            'accept: while let Ok((mut stream, _)) = listener.accept().await {
                connections += 1;
                let mut buf = vec![0u8; 65536];
                loop {
                    let mut got = Vec::new();
                    // Read one request: head + Content-Length body.
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => continue 'accept,
                            Ok(n) => n,
                        };
                        got.extend_from_slice(&buf[..n]);
                        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&got[..i]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if got.len() >= i + 4 + len {
                                break;
                            }
                        }
                    }
                    let Some(reply) = replies.next() else {
                        break 'accept;
                    };
                    if stream.write_all(reply).await.is_err() {
                        continue 'accept;
                    }
                    let closes = reply.windows(17).any(|w| w == b"Connection: close");
                    if replies.len() == 0 {
                        break 'accept;
                    }
                    if close_after_each || closes {
                        continue 'accept;
                    }
                }
            }
            connections
        });
        (addr, handle)
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

    #[tokio::test]
    async fn framing_variants_and_keep_alive() {
        let (addr, server) = scripted_server(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
            ],
            false,
        )
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        let a = call(&pool, &addr, true).await;
        assert_eq!((a.status, a.body.as_deref()), (200, Some(&b"ok"[..])));
        let a = call(&pool, &addr, true).await;
        assert_eq!((a.status, a.body.as_deref()), (201, Some(&b"abcde"[..])));
        assert!(a
            .headers
            .expect("captured")
            .iter()
            .any(|(k, v)| k == "X-A" && v == "b"));
        let a = call(&pool, &addr, false).await;
        assert_eq!((a.status, a.body), (204, None));
        let a = call(&pool, &addr, false).await;
        assert_eq!(a.status, 503);
        assert_eq!(a.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(
            a.body.as_deref(),
            Some(&b"busy"[..]),
            "failures keep an excerpt"
        );
        let a = call(&pool, &addr, true).await;
        assert_eq!(
            (a.status, a.body.as_deref()),
            (200, Some(&b"until close"[..]))
        );
        drop(pool);
        assert_eq!(
            server.await.expect("server"),
            1,
            "one keep-alive connection served all five"
        );
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_transparently() {
        let (addr, server) = scripted_server(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
            ],
            true,
        )
        .await;
        let pool = Pool::new(4, Duration::from_secs(1));
        assert_eq!(
            call(&pool, &addr, true).await.body.as_deref(),
            Some(&b"a"[..])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let a = call(&pool, &addr, true).await;
        assert_eq!(
            (a.status, a.error, a.body.as_deref()),
            (200, ErrorKind::None, Some(&b"b"[..]))
        );
        drop(pool);
        assert_eq!(server.await.expect("server"), 2);
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
    async fn garbage_is_an_io_error() {
        let (addr, _server) = scripted_server(vec![b"NOT HTTP AT ALL\r\n\r\n"], false).await;
        let pool = Pool::new(4, Duration::from_secs(1));
        assert_eq!(call(&pool, &addr, false).await.error, ErrorKind::Io);
    }
}
