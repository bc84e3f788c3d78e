//! Accepting connections, serving them with hyper within the connection limits, and routing
//! each request: answered here, by a webhook route, or by Python.

use super::body::{read_limited, BodyError};
use super::callback_lane::{self, Handoff};
use super::conns::{Admitted, Conn};
use super::rewind::Rewind;
use super::{callback, webhook};
use super::{Answer, Notice, PyRequest, RouteEntry, RouteKind, Shared};
use crate::callbacks::{self as callbacks, CallbackRoute};
use crate::panics::CatchPanic;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

pub(crate) fn text_response(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn unavailable(text: &str) -> Response<Full<Bytes>> {
    let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, text);
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    response
}

/// What an event route (webhook, CloudEvents) answers before it reads anything of a request,
/// when it refuses the request outright: 503 + `Retry-After` while its source is not accepting
/// (starting, shutting down), 405 + `Allow: POST` to any method but POST.
pub(super) fn event_route_refusal(
    accepting: bool,
    method: &Method,
) -> Option<Response<Full<Bytes>>> {
    if !accepting {
        return Some(webhook::unavailable(
            "not accepting events (starting or shutting down)",
        ));
    }
    if method != Method::POST {
        return Some(webhook::with_header(
            text_response(StatusCode::METHOD_NOT_ALLOWED, "405: Method Not Allowed\n"),
            "allow",
            "POST",
        ));
    }
    None
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.stop.clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of file descriptors (or a connection reset before accept): the listener
                // stays; give the system a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Admitted here, in accept order: spawned tasks may start in any order, and the cap
        // must evict the connection that came first.
        let Some(admitted) = shared.conns.admit() else {
            continue; // every connection busy: dropping the stream closes it at once
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            // A panic in hyper or in our code costs this connection only.
            let _ = CatchPanic::new(serve(shared, admitted, stream, peer)).await;
        });
    }
}

async fn serve(shared: Arc<Shared>, admitted: Admitted, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = shared.tls.clone() else {
        return drive(shared, admitted, stream, peer).await;
    };
    // The handshake runs while the connection is still *waiting* for its first head: it spends
    // the same header_timeout, and at the cap a stalled handshake is evicted like a slowloris.
    let conn = Arc::clone(&admitted.conn);
    let config = &shared.config;
    let deadline = conn
        .deadline(config.header_timeout, config.idle_timeout)
        .map_or_else(
            || tokio::time::Instant::now() + config.header_timeout,
            tokio::time::Instant::from_std,
        );
    let stream = tokio::select! {
        result = acceptor.accept(stream) => match result {
            Ok(stream) => stream,
            Err(e) => {
                // Plain HTTP to the HTTPS port, a scanner, a client that distrusts the
                // certificate: the connection closes; one (rate-limited) line says why.
                shared.sink.notice(Notice {
                    kind: "malformed",
                    source: None,
                    remote: peer.to_string(),
                    text: format!("TLS handshake failed: {e}"),
                });
                return;
            }
        },
        () = conn.evicted.notified() => return,
        () = tokio::time::sleep_until(deadline) => {
            shared.conns.timed_out();
            return;
        }
    };
    drive(shared, admitted, stream, peer).await;
}

/// Serves HTTP on an established connection (cleartext or TLS) within the connection limits.
async fn drive<I>(shared: Arc<Shared>, admitted: Admitted, stream: I, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::clone(&admitted.conn);
    // Callbacks are served on the lean lane; hyper takes the connection over at the first
    // request that is anything else, and serves it from that request on.
    let (stream, read_ahead) = match callback_lane::serve(&shared, &conn, stream).await {
        Handoff::Closed => return,
        Handoff::Hyper { stream, read_ahead } => (stream, read_ahead),
    };
    let stream = Rewind::new(read_ahead, stream);
    let remote = peer.to_string();
    let service = {
        let shared = Arc::clone(&shared);
        let conn = Arc::clone(&conn);
        service_fn(move |request| {
            let shared = Arc::clone(&shared);
            let conn = Arc::clone(&conn);
            let remote = remote.clone();
            async move {
                let _serving = conn.serving();
                let response = match CatchPanic::new(shared.route(request, &remote)).await {
                    Ok(response) => response,
                    Err(_) => text_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal error in fastconn's ingress (a bug, please report it)\n",
                    ),
                };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let config = &shared.config;
    let io = TokioIo::new(stream);
    if !config.http2 {
        // HTTP/1.1 only: hyper's own builder, without the auto builder's preface sniffing.
        let mut builder = http1::Builder::new();
        builder
            .keep_alive(true)
            .header_read_timeout(None)
            .max_buf_size(config.max_head_bytes.max(8192))
            .max_headers(100);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        return watch(&shared, &conn, peer, connection, |c| c.graceful_shutdown()).await;
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(config.max_head_bytes.max(8192))
        .max_headers(100);
    builder
        .http2()
        .max_concurrent_streams(config.http2_max_concurrent_streams.max(1))
        // The same bound on a request's header block as HTTP/1.1's head.
        .max_header_list_size(u32::try_from(config.max_head_bytes).unwrap_or(u32::MAX));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    watch(&shared, &conn, peer, connection, |c| c.graceful_shutdown()).await;
}

/// Why a connection's error is the peer's malformed HTTP (worth a notice), if it is.
fn malformed(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let hyper_error = error.downcast_ref::<hyper::Error>()?;
    (hyper_error.is_parse() || hyper_error.is_parse_too_large()).then(|| hyper_error.to_string())
}

/// Drives `connection` until it ends, is evicted, expires (header or idle deadline), or the
/// server stops (then gracefully: requests in flight finish).
async fn watch<C, E>(
    shared: &Shared,
    conn: &Conn,
    peer: SocketAddr,
    mut connection: Pin<&mut C>,
    shutdown: impl Fn(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = &shared.config;
    let mut stop = shared.stop.clone();
    let mut stopping = *stop.borrow();
    loop {
        let deadline = conn
            .deadline(config.header_timeout, config.idle_timeout)
            .map(tokio::time::Instant::from_std);
        let check = deadline.unwrap_or_else(|| tokio::time::Instant::now() + config.idle_timeout);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                    if let Some(text) = malformed(e.as_ref()) {
                        shared.sink.notice(Notice {
                            kind: "malformed",
                            source: None,
                            remote: peer.to_string(),
                            text,
                        });
                    }
                }
                return;
            }
            () = conn.evicted.notified() => return,
            () = tokio::time::sleep_until(check) => {
                let expired = conn
                    .deadline(config.header_timeout, config.idle_timeout)
                    .is_some_and(|d| d <= std::time::Instant::now());
                if expired {
                    shared.conns.timed_out();
                    return;
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                shutdown(connection.as_mut());
            }
        }
    }
}

/// The longest request target or header field accepted (aiohttp's bound, kept): it bounds
/// what one line of a slow client can make the server hold. The whole head is bounded too
/// (`max_head_bytes`, hyper answers 431 beyond it).
pub(super) const MAX_LINE_BYTES: usize = 8190;

/// Why the request's head is refused (a line over [`MAX_LINE_BYTES`]), if it is.
fn oversized_line(request: &Request<Incoming>) -> Option<String> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_LINE_BYTES {
        return Some(format!(
            "the request line is over {MAX_LINE_BYTES} bytes ({target}-byte target)"
        ));
    }
    request
        .headers()
        .iter()
        .find(|(name, value)| name.as_str().len() + value.len() + 2 > MAX_LINE_BYTES)
        .map(|(name, value)| {
            format!(
                "header field {name} is over {MAX_LINE_BYTES} bytes ({} bytes)",
                name.as_str().len() + value.len() + 2
            )
        })
}

impl Shared {
    async fn route(
        self: &Arc<Self>,
        request: Request<Incoming>,
        remote: &str,
    ) -> Response<Full<Bytes>> {
        if let Some(why) = oversized_line(&request) {
            self.sink.notice(Notice {
                kind: "malformed",
                source: None,
                remote: remote.to_owned(),
                text: why.clone(),
            });
            let mut response = text_response(StatusCode::BAD_REQUEST, &format!("{why}\n"));
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        let path = request.uri().path();
        match path {
            "/healthz" => return text_response(StatusCode::OK, "ok\n"),
            "/readyz" => {
                let readiness = self.readiness.load();
                let status = if readiness.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return text_response(status, &format!("{}\n", readiness.text));
            }
            _ => {}
        }
        let routes = self.routes.load();
        let Some(entry) = find(&routes, request.method(), path) else {
            return text_response(StatusCode::NOT_FOUND, "404: Not Found\n");
        };
        match &entry.kind {
            RouteKind::Webhook(webhook) => match webhook.python_fallback {
                Some(index) if webhook.accepting && request.method() == Method::POST => {
                    self.python(index, webhook.max_body, false, request, remote)
                        .await
                }
                _ => self.webhook(webhook, request, remote).await,
            },
            RouteKind::CloudEvents(route) => self.cloudevents(route, request, remote).await,
            RouteKind::Callback(route) => self.callback(route, request).await,
            RouteKind::Python {
                method,
                max_body,
                oversized,
            } => {
                if request.method().as_str() != method && method != "*" {
                    let mut response =
                        text_response(StatusCode::METHOD_NOT_ALLOWED, &format!("use {method}\n"));
                    if let Ok(allow) = HeaderValue::try_from(method.as_str()) {
                        response.headers_mut().insert("allow", allow);
                    }
                    return response;
                }
                let index = routes
                    .iter()
                    .position(|r| std::ptr::eq(r, entry))
                    .unwrap_or(usize::MAX);
                self.python(index, *max_body, *oversized, request, remote)
                    .await
            }
        }
    }

    async fn python(
        self: &Arc<Self>,
        route: usize,
        max_body: usize,
        oversized: bool,
        request: Request<Incoming>,
        remote: &str,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let (body, too_large) = match read_limited(body, length, max_body).await {
            Ok(body) => (body, false),
            Err(BodyError::TooLarge(_)) if oversized => (Bytes::new(), true),
            Err(BodyError::TooLarge(_)) => {
                return text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is over {max_body} bytes (max_body_bytes)\n"),
                )
            }
            Err(BodyError::Incomplete(why)) => {
                self.sink.notice(Notice {
                    kind: "bad_request",
                    source: None,
                    remote: remote.to_owned(),
                    text: why.clone(),
                });
                return text_response(StatusCode::BAD_REQUEST, &format!("{why}\n"));
            }
        };
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.len() >= self.config.max_pending {
                return unavailable("too many requests waiting for their handler, retry later\n");
            }
            pending.insert(id, tx);
        }
        // Removes the entry when the client goes away before Python answers.
        let _forget = Forget { shared: self, id };
        self.sink.request(PyRequest {
            id,
            route,
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body,
            remote: remote.to_owned(),
            too_large,
        });
        match rx.await {
            Ok(answer) => to_response(answer),
            Err(_) => unavailable("shutting down\n"),
        }
    }
}

impl Shared {
    /// `POST /callback/<token>` ([`crate::callbacks`]) when hyper serves it (a chunked body, one
    /// over the limit, HTTP/2: the [`callback_lane`] serves the rest): the [`callback`] checks
    /// around a body read within the limit.
    async fn callback(
        self: &Arc<Self>,
        route: &CallbackRoute,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        if request.method() != Method::POST {
            let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            response
                .headers_mut()
                .insert("allow", HeaderValue::from_static("POST"));
            return response;
        }
        let (parts, body) = request.into_parts();
        let token = parts
            .uri
            .path()
            .strip_prefix(callbacks::PREFIX)
            .unwrap_or("");
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let admitted = callback::admit(
            route,
            token,
            parts.headers.get(callbacks::CALL_ID),
            parts.headers.get(callbacks::STATUS),
        );
        // Refusals still read what fits the limit: closing on an unread body resets the client.
        let read = read_limited(body, length, route.max_body).await;
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => return refusal.into_response(),
        };
        let (body, too_large) = match read {
            Ok(body) => (body, false),
            Err(BodyError::TooLarge(_)) => {
                (Bytes::from(callback::too_large_text(route.max_body)), true)
            }
            Err(BodyError::Incomplete(why)) => {
                // Not claimed: the gateway may send it again, or the call times out.
                return text_response(StatusCode::BAD_REQUEST, &format!("{why}\n"));
            }
        };
        callback::settle(route, admitted, parts.headers, body, too_large).into_response()
    }
}

struct Forget<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

pub(super) fn find<'a>(
    routes: &'a [RouteEntry],
    method: &Method,
    path: &str,
) -> Option<&'a RouteEntry> {
    let mut matching = routes.iter().filter(|r| r.matches(path)).peekable();
    let first = matching.peek().copied();
    // Several routes on one path (one per method): the one for this method, else the first
    // (which answers 405).
    matching
        .find(|r| match &r.kind {
            RouteKind::Python { method: m, .. } => m == method.as_str() || m == "*",
            RouteKind::Webhook(_) | RouteKind::CloudEvents(_) | RouteKind::Callback(_) => true,
        })
        .or(first)
}

/// Python's answer as a response. A header Python got wrong (a name that is not a token, a
/// value with CR/LF) is left out rather than sent: it could split the response.
fn to_response(answer: Answer) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Full::new(answer.body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            if name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING {
                headers.append(name, value);
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_answers_with_header_injection_lose_the_bad_headers_only() {
        let response = to_response(Answer {
            status: 200,
            headers: vec![
                ("X-Ok".to_owned(), "yes".to_owned()),
                ("X-Bad".to_owned(), "a\r\nSet-Cookie: stolen".to_owned()),
                ("Bad Name".to_owned(), "v".to_owned()),
                ("Content-Length".to_owned(), "999".to_owned()),
            ],
            body: Bytes::from_static(b"body"),
        });
        let names: Vec<&str> = response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-ok"]);
        assert_eq!(response.status(), StatusCode::OK);
        let odd = to_response(Answer {
            status: 1000,
            headers: vec![],
            body: Bytes::new(),
        });
        assert_eq!(odd.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
