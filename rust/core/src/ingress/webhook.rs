//! `POST /webhook/<topic>`: an event in, a message to every function subscribed to the topic,
//! answered here without Python (see `sources/webhook.py` for the contract):
//!
//! * 202 + `X-Message-Id` once the engine took the message;
//! * 503 + `Retry-After` when its capacity is spent, while there is no topic map yet, and while
//!   the source is not accepting (starting, shutting down);
//! * 413 over `max_body_bytes` (from `Content-Length` before reading, else while reading);
//! * 401 on a wrong bearer token (`Authorization: Bearer` or `?key=`, as IFTTT sends it) or
//!   signature (any scheme of `crate::signature`: GitHub/Shopify HMAC, Stripe's timestamped
//!   `v1=`, GitLab's token), naming what is wrong;
//! * 400 for a topic that is not concrete (wildcards, control characters) or not UTF-8;
//! * with `?wait=true`: the first function's status and body once every function answered.
//!
//! A source whose requests need Python (a durable store, records split from one request) sets
//! `python_fallback`: its requests then go to Python like any Python route. Async invocation
//! does not: each call waits for its callback in the core ([`crate::callbacks`]).

use super::body::{read_limited, BodyError};
use super::service::{event_route_refusal, text_response};
use super::text::{constant_time_eq, json_error, percent_decode, query_value, topic_problem};
use super::{Accepted, Notice, Shared};
use crate::engine::{SubmitError, INGRESS_TOKEN};
use crate::headers;
use crate::message::{Completion, Message, TargetResult, Verdict};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The path every webhook route serves under.
pub const PREFIX: &str = "/webhook/";

/// Credentials of the sender *to fastconn*: never passed on to functions.
const CREDENTIALS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

use crate::signature::{now_unix, SignatureRule};

/// Why a request's signature is refused, as the 401 to answer (None: it verifies, or the route
/// checks none). Every route that checks signatures (webhook, CloudEvents) answers through
/// this, with the one rule of `crate::signature` for every scheme (HMAC, Stripe, token).
pub(super) fn signature_refusal(
    rule: Option<&SignatureRule>,
    headers: &HeaderMap,
    body: &[u8],
    now_unix: i64,
) -> Option<Response<Full<Bytes>>> {
    let rule = rule?;
    let given = headers.get(rule.header()).map(HeaderValue::as_bytes);
    let refused = rule.verify_value(given, body, now_unix).err()?;
    Some(error(StatusCode::UNAUTHORIZED, &refused.message()))
}

/// One webhook source's settings, as its Python source pushes them.
#[derive(Debug)]
pub struct WebhookRoute {
    /// The source's name (metrics, logs).
    pub name: Arc<str>,
    pub max_body: usize,
    /// `Bearer <token>` expected in `Authorization`, or the token in `?key=`.
    pub auth_token: Option<String>,
    /// The sender's signature check, any scheme (`crate::signature`).
    pub signature: Option<SignatureRule>,
    /// Whether the source takes events now (not while starting or shutting down).
    pub accepting: bool,
    /// Hand requests to Python (index of its Python route) instead of serving them here.
    pub python_fallback: Option<usize>,
    /// Whether accepted messages carry their body to Python (`print_request_body`).
    pub record_payload: bool,
    /// Invoke functions through `/async-function/` (each call then waits for its callback in
    /// the core; `?wait=true` answers with the callback's result).
    pub asynchronous: bool,
}

pub(super) fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(json_error(reason))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

pub(super) fn with_header(
    mut response: Response<Full<Bytes>>,
    name: &'static str,
    value: &str,
) -> Response<Full<Bytes>> {
    if let Ok(value) = HeaderValue::try_from(value) {
        response.headers_mut().insert(name, value);
    }
    response
}

/// The 401 of an event route (webhook, CloudEvents) for a missing or wrong bearer token.
pub(super) fn bearer_refusal() -> Response<Full<Bytes>> {
    with_header(
        error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"),
        "www-authenticate",
        "Bearer realm=\"fastconn\"",
    )
}

pub(super) fn unavailable(reason: &str) -> Response<Full<Bytes>> {
    with_header(
        error(StatusCode::SERVICE_UNAVAILABLE, reason),
        "retry-after",
        "1",
    )
}

impl Shared {
    pub(crate) async fn webhook(
        self: &Arc<Self>,
        route: &Arc<WebhookRoute>,
        request: Request<Incoming>,
        remote: &str,
    ) -> Response<Full<Bytes>> {
        if let Some(refused) = event_route_refusal(route.accepting, request.method()) {
            return refused;
        }
        let query = request.uri().query().unwrap_or("").to_owned();
        if !self.authorized(route, request.headers(), &query) {
            return bearer_refusal();
        }
        let raw_topic = request
            .uri()
            .path()
            .get(PREFIX.len()..)
            .unwrap_or("")
            .to_owned();
        let (parts, body) = match self
            .read_body(&route.name, request, route.max_body, remote)
            .await
        {
            Ok(read) => read,
            Err(refused) => return refused,
        };
        if let Some(refused) =
            signature_refusal(route.signature.as_ref(), &parts.headers, &body, now_unix())
        {
            return refused;
        }
        let topic = match String::from_utf8(percent_decode(&raw_topic, false)) {
            Ok(topic) => topic,
            Err(_) => {
                let why = format!(
                    "topic {raw_topic:?} is not valid UTF-8 (after percent-decoding): encode it as UTF-8"
                );
                return self.bad_request(&route.name, remote, &why);
            }
        };
        if let Some(problem) = topic_problem(&topic) {
            return self.bad_request(&route.name, remote, &problem);
        }
        let slot = match self.engine.reserve_ingress() {
            Ok(slot) => slot,
            Err(SubmitError::Full { .. }) => {
                return unavailable("dispatcher at capacity, retry later");
            }
            Err(_) => return unavailable("shutting down"),
        };
        if !self.routing_ready.load(Ordering::Acquire) {
            return unavailable("topic map not loaded yet");
        }
        let wait = query_value(&query, "wait")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        let signature_header = route
            .signature
            .as_ref()
            .map(|rule| rule.header().to_ascii_lowercase());
        let token = INGRESS_TOKEN | self.next_token.fetch_add(1, Ordering::Relaxed);
        let message_id = new_message_id();
        let mut message = Message::new(token, topic.clone(), body.clone());
        message.message_id = message_id.clone();
        message.capture = wait;
        message.asynchronous = route.asynchronous;
        message.headers = passthrough(&parts.headers, signature_header.as_deref());
        // Python hears of the message before its completion can reach it.
        self.sink.accepted(Accepted {
            token,
            source: Arc::clone(&route.name),
            topic,
            message_id: message_id.clone(),
            payload: route.record_payload.then_some(body),
        });
        if !wait {
            self.engine.submit_reserved_ingress(slot, message, None);
            let response = text_response(StatusCode::ACCEPTED, "accepted\n");
            return with_header(response, "x-message-id", &message_id);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.engine.submit_reserved_ingress(slot, message, Some(tx));
        match rx.await {
            Ok(completion) => waited_response(&completion, &message_id),
            Err(_) => with_header(
                unavailable("shut down before every function answered"),
                "x-message-id",
                &message_id,
            ),
        }
    }

    /// The request's parts and its body read within `max_body` (shared by the routes that
    /// submit into the engine), or the 413 / 400 to answer.
    pub(super) async fn read_body(
        &self,
        source: &Arc<str>,
        request: Request<Incoming>,
        max_body: usize,
        remote: &str,
    ) -> Result<(http::request::Parts, Bytes), Response<Full<Bytes>>> {
        let (parts, body) = request.into_parts();
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match read_limited(body, length, max_body).await {
            Ok(body) => Ok((parts, body)),
            Err(BodyError::TooLarge(Some(n))) => Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body of {n} bytes exceeds max_body_bytes ({max_body})"),
            )),
            Err(BodyError::TooLarge(None)) => Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body exceeds max_body_bytes ({max_body})"),
            )),
            Err(BodyError::Incomplete(why)) => Err(self.bad_request(source, remote, &why)),
        }
    }

    fn authorized(&self, route: &WebhookRoute, headers: &HeaderMap, query: &str) -> bool {
        let Some(token) = &route.auth_token else {
            return true;
        };
        if let Some(bearer) = bearer_matches(headers, token) {
            return bearer;
        }
        // IFTTT's "Make a web request" and similar senders can only put the token in the URL.
        query_value(query, "key")
            .is_some_and(|key| constant_time_eq(key.as_bytes(), token.as_bytes()))
    }

    /// A 400 naming `problem`, logged by Python (rate-limited) under the source's name.
    pub(super) fn bad_request(
        &self,
        source: &Arc<str>,
        remote: &str,
        problem: &str,
    ) -> Response<Full<Bytes>> {
        self.sink.notice(Notice {
            kind: "bad_request",
            source: Some(Arc::clone(source)),
            remote: remote.to_owned(),
            text: problem.to_owned(),
        });
        error(StatusCode::BAD_REQUEST, problem)
    }
}

/// Whether `Authorization` is `Bearer <token>` (constant time); None when the header is absent.
pub(super) fn bearer_matches(headers: &HeaderMap, token: &str) -> Option<bool> {
    let given = headers.get(http::header::AUTHORIZATION)?;
    let expected = format!("Bearer {token}");
    Some(constant_time_eq(given.as_bytes(), expected.as_bytes()))
}

/// The request's headers that go on to the functions: not reserved, not hop-by-hop, not
/// credentials, not the signature, with values HTTP can carry as text (UTF-8, no controls).
pub fn passthrough(headers: &HeaderMap, signature_header: Option<&str>) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            headers::forwardable(name)
                && !CREDENTIALS.contains(&name)
                && Some(name) != signature_header
        })
        .filter_map(|(name, value)| {
            let text = std::str::from_utf8(value.as_bytes()).ok()?;
            let clean = text.chars().all(|c| c == '\t' || !(c < ' ' || c == '\x7f'));
            clean.then(|| (name.as_str().to_owned(), text.to_owned()))
        })
        .collect()
}

/// The answer of a waiting request when no function subscribes to its topic.
pub(super) fn unrouted(message_id: &str) -> Response<Full<Bytes>> {
    let response = text_response(
        StatusCode::NOT_FOUND,
        "no function subscribes to this topic\n",
    );
    with_header(response, "x-message-id", message_id)
}

/// The first function's result of a waited message, if it was routed.
pub(super) fn first_result(completion: &Completion) -> Option<&TargetResult> {
    completion
        .results
        .first()
        .filter(|_| completion.verdict != Verdict::Unrouted)
}

/// The answer of a `?wait=true` request: the first function's status and body.
pub(super) fn waited_response(completion: &Completion, message_id: &str) -> Response<Full<Bytes>> {
    let Some(first) = first_result(completion) else {
        return unrouted(message_id);
    };
    let status_label = if first.status == 0 {
        first.error.label().to_owned()
    } else {
        first.status.to_string()
    };
    let mut response = match StatusCode::from_u16(first.status)
        .ok()
        .filter(|s| first.status >= 200 && s.as_u16() < 600)
    {
        None => text_response(
            StatusCode::BAD_GATEWAY,
            &format!("{}: {}\n", first.function, first.error.label()),
        ),
        Some(status) => {
            let mut response = Response::new(Full::new(first.body.clone().unwrap_or_default()));
            *response.status_mut() = status;
            let content_type = first
                .headers
                .iter()
                .flatten()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .and_then(|(_, v)| HeaderValue::try_from(v.as_str()).ok());
            if let Some(content_type) = content_type {
                response.headers_mut().insert(CONTENT_TYPE, content_type);
            }
            response
        }
    };
    response = with_header(response, "x-message-id", message_id);
    response = with_header(response, "x-function-name", &first.function);
    with_header(response, "x-function-status", &status_label)
}

/// A random 128-bit id in hex, like Python's `uuid4().hex` (unique, not a secret).
pub(super) fn new_message_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hmac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let mut context = ring::hmac::Context::with_key(&key);
        for part in parts {
            context.update(part);
        }
        hex(context.sign().as_ref())
    }

    fn rule(header: &str, scheme: &str, secret: &str, prefix: &str) -> SignatureRule {
        SignatureRule::configured(
            header,
            scheme,
            secret.as_bytes(),
            prefix,
            "sha256",
            "hex",
            300,
        )
        .expect("a valid rule")
    }

    /// The status and body of the refusal for a request with `headers`, None when accepted.
    fn refusal(
        rule: &SignatureRule,
        headers: &[(&str, &str)],
        body: &[u8],
        now: i64,
    ) -> Option<String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::header::HeaderName::try_from(*name).expect("name"),
                HeaderValue::try_from(*value).expect("value"),
            );
        }
        let response = signature_refusal(Some(rule), &map, body, now)?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        Some(body_text(response))
    }

    fn body_text(response: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let collected = runtime.block_on(response.into_body().collect());
        let bytes = collected.map(|c| c.to_bytes()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn github_signatures_are_checked_from_the_request_headers() {
        let github = rule("X-Hub-Signature-256", "hmac", "shh", "sha256=");
        let body = b"{\"action\": \"opened\"}";
        let good = format!("sha256={}", hmac_hex(b"shh", &[body]));
        assert_eq!(
            refusal(&github, &[("x-hub-signature-256", &good)], body, 0),
            None
        );
        let wrong = refusal(&github, &[("X-Hub-Signature-256", &good)], b"tampered", 0);
        assert!(wrong.is_some_and(|m| m.contains("wrong X-Hub-Signature-256")));
        let missing = refusal(&github, &[], body, 0);
        assert!(missing.is_some_and(|m| m.contains("missing X-Hub-Signature-256")));
        let bare = refusal(&github, &[("X-Hub-Signature-256", &good[7..])], body, 0);
        assert!(bare.is_some_and(|m| m.contains("does not start with")));
        assert!(signature_refusal(None, &HeaderMap::new(), body, 0).is_none());
    }

    #[test]
    fn stripe_signatures_are_checked_with_the_clock_given() {
        let stripe = rule("Stripe-Signature", "stripe", "whsec_x", "v1=");
        let body = b"{\"id\": \"evt_1\"}";
        let t = 1_700_000_000_i64;
        let v1 = hmac_hex(b"whsec_x", &[t.to_string().as_bytes(), b".", body]);
        let header = format!("t={t},v1={v1}");
        assert_eq!(
            refusal(&stripe, &[("stripe-signature", &header)], body, t + 5),
            None
        );
        // Several v1 entries (a secret rotation): any one may match, in any position.
        let rotated = format!("t={t},v1={},v1={v1},v0=ignored", "ab".repeat(32));
        assert_eq!(
            refusal(&stripe, &[("Stripe-Signature", &rotated)], body, t),
            None
        );
        let stale = refusal(&stripe, &[("Stripe-Signature", &header)], body, t + 301);
        assert!(
            stale.is_some_and(|m| m.contains("tolerance of 300 s")),
            "expired"
        );
        let other = format!(
            "t={t},v1={}",
            hmac_hex(b"whsec_other", &[t.to_string().as_bytes(), b".", body])
        );
        let wrong = refusal(&stripe, &[("Stripe-Signature", &other)], body, t);
        assert!(
            wrong.is_some_and(|m| m.contains("wrong Stripe-Signature")),
            "wrong secret"
        );
    }

    #[test]
    fn gitlab_tokens_are_compared_whole() {
        let gitlab = rule("X-Gitlab-Token", "token", "tok", "");
        assert_eq!(
            refusal(&gitlab, &[("X-Gitlab-Token", "tok")], b"{}", 0),
            None
        );
        for wrong in ["to", "tokk", "TOK"] {
            assert!(
                refusal(&gitlab, &[("X-Gitlab-Token", wrong)], b"{}", 0).is_some(),
                "{wrong}"
            );
        }
    }

    #[test]
    fn configured_rules_name_the_wrong_key() {
        let bad = |scheme: &str, algorithm: &str, encoding: &str, header: &str| {
            SignatureRule::configured(header, scheme, b"k", "", algorithm, encoding, 300)
                .expect_err("refused")
        };
        assert!(bad("rsa", "sha256", "hex", "X-Sig").contains("signature_scheme \"rsa\""));
        assert!(bad("hmac", "md5", "hex", "X-Sig").contains("signature_algorithm \"md5\""));
        assert!(bad("hmac", "sha256", "b32", "X-Sig").contains("signature_encoding \"b32\""));
        assert!(bad("hmac", "sha256", "hex", "X Sig").contains("signature_header"));
        assert!(bad("hmac", "sha256", "hex", "").contains("signature_header"));
    }

    #[test]
    fn passthrough_drops_credentials_reserved_framing_signature_and_bad_values() {
        let mut headers = HeaderMap::new();
        let mut add = |name: &'static str, value: &[u8]| {
            headers.append(name, HeaderValue::from_bytes(value).expect("value"));
        };
        add("authorization", b"Bearer x");
        add("cookie", b"a=b");
        add("x-callback-url", b"http://evil/");
        add("x-call-id", b"stolen");
        add("content-length", b"3");
        add("x-hub-signature-256", b"sha256=00");
        add("x-bad", b"\xff\xfe");
        add("x-good", b"yes");
        add("x-utf8", "caf\u{e9}".as_bytes());
        let kept = passthrough(&headers, Some("x-hub-signature-256"));
        assert_eq!(
            kept,
            vec![
                ("x-good".to_owned(), "yes".to_owned()),
                ("x-utf8".to_owned(), "caf\u{e9}".to_owned())
            ]
        );
    }

    #[test]
    fn message_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_message_id(), new_message_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
