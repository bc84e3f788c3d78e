//! One HTTP attempt over the shared keep-alive pool, classified into status / error kind.

use crate::message::ErrorKind;
use crate::retry::parse_retry_after;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::{Duration, SystemTime};

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How much of a failed call's body is kept for logs and dead-letter context.
pub(crate) const FAILURE_EXCERPT: usize = 1024;

pub(crate) fn build_client(max_idle_per_host: usize, connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    // Small request/response pairs: Nagle would add a delayed-ACK round trip to each call.
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(30)));
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

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
        Attempt { error: kind, ..Attempt::default() }
    }
}

pub(crate) async fn attempt(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    capture: bool,
) -> Attempt {
    match tokio::time::timeout(timeout, send(client, request, capture)).await {
        Ok(result) => result,
        Err(_) => Attempt::error(ErrorKind::Timeout),
    }
}

async fn send(client: &HttpClient, request: Request<Full<Bytes>>, capture: bool) -> Attempt {
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(err) if err.is_connect() => return Attempt::error(ErrorKind::Connect),
        Err(_) => return Attempt::error(ErrorKind::Io),
    };
    let status = response.status();
    let retry_after = if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
    } else {
        None
    };
    let headers = capture.then(|| {
        response
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect()
    });
    // The body is always read to the end: that is what lets the connection go back to the pool.
    let body = match response.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Attempt { status: status.as_u16(), error: ErrorKind::Io, retry_after, ..Attempt::default() }
        }
    };
    let body = if capture {
        Some(body)
    } else if !status.is_success() && !body.is_empty() {
        Some(body.slice(..body.len().min(FAILURE_EXCERPT)))
    } else {
        None
    };
    Attempt { status: status.as_u16(), error: ErrorKind::None, retry_after, body, headers }
}
