//! The callback lane: async callbacks served on HTTP/1.1 without hyper.
//!
//! Every connection starts here. While its requests are callbacks (`POST /callback/<token>`,
//! HTTP/1.1, a `Content-Length` body within the route's limit, nothing that changes framing or
//! the connection: no `Transfer-Encoding`, `Expect`, `Connection` or `Upgrade`), the lane
//! reads each one with one head parse, answers it with one write and keeps the connection
//! alive; a gateway's callback connections never leave it. At the first request that is
//! anything else (a webhook, a probe, HTTP/2's preface, a malformed or oversized head), the
//! connection is handed to hyper with the bytes read so far put back ([`super::rewind`]), and
//! hyper serves it from that request on, with every rule of the hyper path.
//!
//! Why: a callback is the second HTTP exchange of every async call. Through hyper, serving it
//! cost the core more than the whole invocation exchange of its client; the lane's work per
//! callback is a head parse, the [`callback`] checks and one formatted answer.
//!
//! The connection rules are the hyper path's: the deadline for the first head, the idle
//! timeout, eviction at the connection cap, and on shutdown an idle connection closes while a
//! request being served is answered first.

use super::callback::{self, Answer};
use super::conns::Conn;
use super::service::{find, MAX_LINE_BYTES};
use super::{IngressConfig, RouteKind, Shared};
use crate::callbacks::{self as callbacks, CallbackRoute};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method};
use std::cell::RefCell;
use std::io::Write;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Header fields per request head, as hyper's limit on the hyper path.
const MAX_HEADERS: usize = 100;

/// How a connection left the lane.
pub(super) enum Handoff<I> {
    /// Closed (by the peer, a deadline, eviction or shutdown): nothing more to serve.
    Closed,
    /// Its next request is hyper's: `read_ahead` holds what the lane read of it.
    Hyper { stream: I, read_ahead: Bytes },
}

/// A callback's request head, parsed.
#[derive(Debug)]
struct Head {
    /// Bytes of the head, up to and including its blank line.
    len: usize,
    path: String,
    content_length: usize,
    headers: HeaderMap,
}

/// What the bytes at the start of the buffer are.
#[derive(Debug)]
enum Parsed {
    /// The start of a head: read more.
    NeedMore,
    /// A callback's head the lane can serve (its route still to be checked).
    Callback(Head),
    /// Anything else: hyper's.
    Hyper,
}

/// Parses the request head at the start of `buf`, without I/O (every split of the input
/// parses the same). Anything the lane does not serve is [`Parsed::Hyper`], including what
/// hyper will refuse: hyper then answers it as it answers any connection.
fn parse_head(buf: &[u8], max_head: usize) -> Parsed {
    // Uninitialised slots: zeroing a hundred of them cost more than parsing a callback's head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    // The lane serves heads within one line's bound (so no line is over it: the hyper path's
    // 400 stays hyper's). Waiting for more than that would only re-parse a growing head that
    // hyper must answer anyway.
    let longest = MAX_LINE_BYTES.min(max_head);
    let len = match request.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= longest => len,
        Ok(httparse::Status::Partial) if buf.len() < longest => return Parsed::NeedMore,
        _ => return Parsed::Hyper,
    };
    if request.method != Some(Method::POST.as_str()) || request.version != Some(1) {
        return Parsed::Hyper;
    }
    let Some(path) = request
        .path
        .filter(|p| p.starts_with(callbacks::PREFIX) && !p.contains(['?', '#']))
    else {
        return Parsed::Hyper;
    };
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    let mut content_length = None;
    for field in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Parsed::Hyper;
        };
        if name == TRANSFER_ENCODING || name == EXPECT || name == CONNECTION || name == UPGRADE {
            return Parsed::Hyper;
        }
        if name == CONTENT_LENGTH {
            match (content_length, decimal(field.value)) {
                (None, Some(n)) => content_length = Some(n),
                _ => return Parsed::Hyper, // twice, or not a length
            }
        }
        headers.append(name, value);
    }
    match content_length {
        Some(content_length) => Parsed::Callback(Head {
            len,
            path: path.to_owned(),
            content_length,
            headers,
        }),
        None => Parsed::Hyper,
    }
}

/// A `Content-Length` value: ASCII digits only (RFC 9110 §8.6), within `usize`.
fn decimal(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Writes `answer` as an HTTP/1.1 response into `out` (cleared first).
fn encode(answer: &Answer, out: &mut Vec<u8>) {
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\ndate: ",
        answer.status.as_str(),
        answer.status.canonical_reason().unwrap_or(""),
        answer.body.len(),
    );
    http_date(out);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&answer.body);
}

thread_local! {
    /// The `Date` of this second (formatted once a second per thread, as hyper does).
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn http_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            *cached = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// When the connection's current deadline should be checked (its phase's deadline; a busy
/// connection has none, and is looked at again after an idle timeout).
fn next_check(conn: &Conn, config: &IngressConfig) -> Instant {
    conn.deadline(config.header_timeout, config.idle_timeout)
        .map_or_else(|| Instant::now() + config.idle_timeout, Instant::from_std)
}

fn expired(conn: &Conn, config: &IngressConfig) -> bool {
    conn.deadline(config.header_timeout, config.idle_timeout)
        .is_some_and(|d| d <= std::time::Instant::now())
}

/// The route serving `path`, when it is a callback route whose limit admits `content_length`.
fn callback_route(
    shared: &Shared,
    path: &str,
    content_length: usize,
) -> Option<Arc<CallbackRoute>> {
    let routes = shared.routes.load();
    match find(&routes, &Method::POST, path).map(|entry| &entry.kind) {
        Some(RouteKind::Callback(route)) if content_length <= route.max_body => {
            Some(Arc::clone(route))
        }
        _ => None,
    }
}

/// Serves callbacks on `stream` until it closes or a request is hyper's.
pub(super) async fn serve<I>(shared: &Shared, conn: &Arc<Conn>, mut stream: I) -> Handoff<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config;
    let max_head = config.max_head_bytes.max(8192);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // Made once per connection, not per request: each would register and deregister a waiter
    // or a timer per callback.
    let evicted = conn.evicted.notified();
    tokio::pin!(evicted);
    let mut stop = shared.stop.clone();
    let stopping = async move {
        // Ends once the server stops (or is gone).
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::pin!(stopping);
    let check = tokio::time::sleep_until(next_check(conn, config));
    tokio::pin!(check);
    loop {
        let head = match parse_head(&buf, max_head) {
            Parsed::Callback(head) => head,
            Parsed::Hyper => {
                return Handoff::Hyper {
                    stream,
                    read_ahead: buf.freeze(),
                }
            }
            Parsed::NeedMore => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                tokio::select! {
                    biased;
                    read = stream.read_buf(&mut buf) => match read {
                        Ok(0) | Err(_) => return Handoff::Closed,
                        Ok(_) => continue,
                    },
                    () = &mut evicted => return Handoff::Closed,
                    () = &mut stopping => return Handoff::Closed,
                    () = &mut check => {
                        if expired(conn, config) {
                            shared.conns.timed_out();
                            return Handoff::Closed;
                        }
                        check.as_mut().reset(next_check(conn, config));
                        continue;
                    }
                }
            }
        };
        let Some(route) = callback_route(shared, &head.path, head.content_length) else {
            return Handoff::Hyper {
                stream,
                read_ahead: buf.freeze(),
            };
        };
        let serving = conn.serving();
        buf.advance(head.len);
        let token = head.path.strip_prefix(callbacks::PREFIX).unwrap_or("");
        let admitted = callback::admit(
            &route,
            token,
            head.headers.get(callbacks::CALL_ID),
            head.headers.get(callbacks::STATUS),
        );
        // The body is read for refusals too: the connection carries the next request after it.
        while buf.len() < head.content_length {
            buf.reserve(head.content_length - buf.len());
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Handoff::Closed,
                Ok(_) => {}
            }
        }
        let body = Bytes::copy_from_slice(buf.get(..head.content_length).unwrap_or_default());
        buf.advance(head.content_length);
        let answer = match admitted {
            Ok(admitted) => callback::settle(&route, admitted, head.headers, body, false),
            Err(refusal) => refusal,
        };
        encode(&answer, &mut out);
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            return Handoff::Closed;
        }
        drop(serving);
        if *shared.stop.borrow() {
            return Handoff::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLBACK: &[u8] = b"POST /callback/abc HTTP/1.1\r\nHost: fastconn\r\n\
        X-Call-Id: id-1\r\nX-Function-Status: 200\r\nContent-Length: 2\r\n\r\nok";

    fn head(parsed: Parsed) -> Option<Head> {
        match parsed {
            Parsed::Callback(head) => Some(head),
            _ => None,
        }
    }

    #[test]
    fn a_callback_head_parses_alike_at_every_split() {
        let head_len = CALLBACK.len() - 2;
        for split in 0..head_len {
            assert!(
                matches!(parse_head(&CALLBACK[..split], 8192), Parsed::NeedMore),
                "split {split}"
            );
        }
        for end in head_len..=CALLBACK.len() {
            let parsed = head(parse_head(&CALLBACK[..end], 8192));
            let Some(head) = parsed else {
                panic!("not a callback head at {end}");
            };
            assert_eq!(
                (head.len, head.path.as_str(), head.content_length),
                (head_len, "/callback/abc", 2)
            );
            assert_eq!(
                head.headers.get("x-call-id").map(HeaderValue::as_bytes),
                Some(&b"id-1"[..])
            );
            assert_eq!(head.headers.len(), 4);
        }
    }

    #[test]
    fn anything_but_a_plain_callback_is_hypers() {
        let with = |from: &str, to: &str| {
            let text = String::from_utf8_lossy(CALLBACK).replacen(from, to, 1);
            parse_head(text.as_bytes(), 8192)
        };
        let hypers = [
            with("POST", "GET"),
            with("HTTP/1.1", "HTTP/1.0"),
            with("/callback/abc", "/webhook/abc"),
            with("/callback/abc", "/callback/abc?x=1"),
            with("/callback/abc", "http://fastconn/callback/abc"),
            with("Content-Length: 2", "Transfer-Encoding: chunked"),
            with("Content-Length: 2", "Content-Length: +2"),
            with(
                "Content-Length: 2",
                "Content-Length: 2\r\nContent-Length: 2",
            ),
            with(
                "Content-Length: 2",
                "Content-Length: 99999999999999999999999",
            ),
            with("Host: fastconn", "Expect: 100-continue"),
            with("Host: fastconn", "Connection: close"),
            with("Host: fastconn", "Upgrade: h2c"),
            with("Host: fastconn", "Bad Name: x"),
            with("Host: fastconn", "X-Bad: a\u{1}b"),
            with("Content-Length: 2\r\n", ""),
            parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 8192),
        ];
        for (i, parsed) in hypers.into_iter().enumerate() {
            assert!(matches!(parsed, Parsed::Hyper), "case {i}: {parsed:?}");
        }
    }

    #[test]
    fn a_head_over_the_limits_is_hypers_to_refuse() {
        let long = format!(
            "POST /callback/abc HTTP/1.1\r\nX-Long: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(MAX_LINE_BYTES)
        );
        assert!(matches!(
            parse_head(long.as_bytes(), 64 * 1024),
            Parsed::Hyper
        ));
        // Never complete within the head limit: hyper answers it (431), the lane does not wait.
        let endless = format!("POST /callback/abc HTTP/1.1\r\nX-A: {}", "a".repeat(9000));
        assert!(matches!(
            parse_head(endless.as_bytes(), 8192),
            Parsed::Hyper
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("POST /callback/abc HTTP/1.1\r\n{many}Content-Length: 0\r\n\r\n");
        assert!(matches!(
            parse_head(many.as_bytes(), 64 * 1024),
            Parsed::Hyper
        ));
    }

    #[test]
    fn answers_are_framed_with_their_length() {
        let answer = Answer {
            status: http::StatusCode::CONFLICT,
            body: Bytes::from_static(b"{\"error\":\"x\"}"),
        };
        let mut out = Vec::new();
        encode(&answer, &mut out);
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut slots);
        let Ok(httparse::Status::Complete(len)) = response.parse(&out) else {
            panic!("unparsable answer: {}", String::from_utf8_lossy(&out));
        };
        assert_eq!(response.code, Some(409));
        assert_eq!(response.reason, Some("Conflict"));
        let length = response
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .and_then(|h| decimal(h.value));
        assert_eq!(length, Some(out.len() - len));
        assert!(response.headers.iter().any(|h| h.name == "date"));
        assert_eq!(&out[len..], b"{\"error\":\"x\"}");
    }
}
