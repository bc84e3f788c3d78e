//! CloudEvents 1.0 over HTTP as pure functions: no I/O, no panics on peer input, every refusal a
//! [`CeError`] with the HTTP status to answer and a message naming what is wrong and the fix.
//!
//! # How the ingress server calls this (one request of a `type = "cloudevents"` route)
//!
//! 0. Check `auth_token` (bearer) and, when `hmac_secret` is set, the signature with
//!    [`crate::signature::SignatureRule::verify_value`]`(parts.headers.get(rule.header())
//!    .map(|v| v.as_bytes()), &body, now_unix)` over the whole body (401 with
//!    `err.message()`).
//! 1. Read the body within `max_body_bytes` (413 before and while reading), then
//!    `let events = decode_request(content_type, &headers, body, &limits)?;` where
//!    `content_type` is the request's `Content-Type` value as bytes (`None` when absent),
//!    `headers` every request header as `(name, value)` (`&str`/`&[u8]` pairs straight from
//!    hyper: `(name.as_str(), value.as_bytes())`), and `limits` the route's [`Limits`]. On `Err(e)`
//!    answer `e.status` with `e.message` (the webhook's JSON error shape). The mode is picked
//!    from the content type as the binding says: `application/cloudevents-batch+json` → batch,
//!    `application/cloudevents+json` → structured, other `application/cloudevents*` → 415,
//!    anything else → binary (`ce-*` headers). A batch decodes whole or not at all (one bad
//!    event refuses the request, naming its index), so nothing is half accepted; an empty batch
//!    is `Ok(vec![])` (answer 202, nothing to dispatch).
//! 2. For each event: `let topic = topic_for(&event, route_by)?;` (400 when the routing
//!    attribute is missing or is not a concrete topic), then
//!    `let call = to_function_request(&event, delivery);` and submit a core
//!    [`Message`](crate::Message) with `topic`, `payload = call.body`, `headers = call.headers`,
//!    `message_id = call.message_id` (the event `id`: stable across sender retries, so it is
//!    the idempotency key; functions that dedupe across sources use `ce-source` + `ce-id`).
//!    The headers are already filtered by [`crate::headers::forwardable`]; do not add the
//!    request's own headers (the event's attributes are the event's metadata, and the sender's
//!    credentials and signature must not reach functions).
//! 3. Answer `202` (with `X-Message-Id`) as for webhooks. With `reply = true`,
//!    [`wants_reply`]`(&headers)` (the request's `Prefer: reply`, Knative's convention) and a
//!    single event, submit with `capture = true`, wait for the first function's answer (as
//!    `?wait=true` does) and call `reply_from_response(status, &response_headers, body,
//!    &limits)`: `Ok(Some(reply))` → answer `encode_response(&reply,
//!    request_mode(content_type).reply_mode())` (status, headers, body: the reply goes back in
//!    the mode the event came in); `Ok(None)` → `202`, no reply; `Err(e)` → the function
//!    answered a malformed event: answer 502 with `e.message` (the sender's event was
//!    delivered; the reply is the function's fault).
//!
//! Webhook signatures (GitHub, Stripe, GitLab) are in [`crate::signature`].

mod binary;
mod event;
mod json;
mod route;

#[cfg(test)]
mod tests;

use bytes::Bytes;
use std::fmt;

pub use binary::{decode_value as decode_header_value, encode_value as encode_header_value};
pub use event::{is_json_media_type, is_rfc3339, AttrValue, CloudEvent, SPEC_VERSION};
pub use route::{topic_for, RouteBy};

/// Media type of structured mode (JSON event format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Media type of batched mode (JSON event format).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// A request (or function response) that is not an acceptable CloudEvent: answer `status`
/// with `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CeError {
    /// 400 (malformed or invalid event), 413 (over a limit) or 415 (unsupported event format).
    pub status: u16,
    pub message: String,
}

impl CeError {
    fn bad_request(message: impl Into<String>) -> CeError {
        CeError {
            status: 400,
            message: message.into(),
        }
    }

    fn too_large(message: impl Into<String>) -> CeError {
        CeError {
            status: 413,
            message: message.into(),
        }
    }

    fn unsupported(message: impl Into<String>) -> CeError {
        CeError {
            status: 415,
            message: message.into(),
        }
    }
}

impl fmt::Display for CeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for CeError {}

/// A route's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted (the server enforces it while reading too).
    pub max_body_bytes: usize,
    /// Most events in one batched-mode request.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body_bytes: 1 << 20,
            max_batch: 100,
        }
    }
}

/// How an event travels in an HTTP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `ce-*` headers, the data as the body with its own `Content-Type`.
    #[default]
    Binary,
    /// One JSON object, `Content-Type: application/cloudevents+json`.
    Structured,
}

/// What the HTTP binding's content-type rule makes of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMode {
    Binary,
    Structured,
    Batch,
    /// `application/cloudevents*` in a format other than JSON.
    UnsupportedFormat,
}

/// The mode of a message with this `Content-Type` (§3: `application/cloudevents-batch` → batch,
/// `application/cloudevents` → structured, anything else → binary).
pub fn request_mode(content_type: Option<&[u8]>) -> RequestMode {
    let Some(content_type) = content_type else {
        return RequestMode::Binary;
    };
    let essence = media_type_essence(content_type);
    if starts_with_ignore_case(essence, b"application/cloudevents-batch") {
        if essence.eq_ignore_ascii_case(BATCH_CONTENT_TYPE.as_bytes()) {
            RequestMode::Batch
        } else {
            RequestMode::UnsupportedFormat
        }
    } else if starts_with_ignore_case(essence, b"application/cloudevents") {
        if essence.eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE.as_bytes()) {
            RequestMode::Structured
        } else {
            RequestMode::UnsupportedFormat
        }
    } else {
        RequestMode::Binary
    }
}

impl RequestMode {
    /// The mode to answer a request of this mode in (a reply goes back the way the event came;
    /// a batch sender gets a structured reply).
    pub fn reply_mode(self) -> Mode {
        match self {
            RequestMode::Binary => Mode::Binary,
            _ => Mode::Structured,
        }
    }
}

fn media_type_essence(content_type: &[u8]) -> &[u8] {
    let end = content_type
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(content_type.len());
    content_type[..end].trim_ascii()
}

fn starts_with_ignore_case(value: &[u8], prefix: &[u8]) -> bool {
    value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Whether the JSON format's charset parameter, if any, is UTF-8 (the only one JSON allows).
fn charset_problem(content_type: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(content_type);
    let charset = text.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"').to_owned())
    })?;
    (!charset.eq_ignore_ascii_case("utf-8")).then(|| {
        format!("charset {charset:?} is not supported: the JSON event format is UTF-8, send charset=utf-8")
    })
}

/// The events of one HTTP request, in any content mode. See the module doc for how to answer.
pub fn decode_request<K: AsRef<str>, V: AsRef<[u8]>>(
    content_type: Option<&[u8]>,
    headers: &[(K, V)],
    body: Bytes,
    limits: &Limits,
) -> Result<Vec<CloudEvent>, CeError> {
    if body.len() > limits.max_body_bytes {
        return Err(CeError::too_large(format!(
            "body of {} bytes exceeds max_body_bytes ({}): send a smaller event or batch",
            body.len(),
            limits.max_body_bytes
        )));
    }
    let mode = request_mode(content_type);
    if matches!(mode, RequestMode::Structured | RequestMode::Batch) {
        if let Some(problem) = content_type.and_then(charset_problem) {
            return Err(CeError::unsupported(problem));
        }
    }
    match mode {
        RequestMode::Batch => json::decode_batch(&body, limits.max_batch),
        RequestMode::Structured => json::decode_structured(&body).map(|event| vec![event]),
        RequestMode::UnsupportedFormat => Err(CeError::unsupported(format!(
            "event format {:?} is not supported: send {STRUCTURED_CONTENT_TYPE}, \
             {BATCH_CONTENT_TYPE}, or binary mode (ce-* headers)",
            String::from_utf8_lossy(content_type.map(media_type_essence).unwrap_or_default())
        ))),
        RequestMode::Binary => {
            if !headers
                .iter()
                .any(|(name, _)| binary::is_ce_header(name.as_ref()))
            {
                return Err(CeError::bad_request(
                    "not a CloudEvent: no ce-* headers and Content-Type is not \
                     application/cloudevents+json; send binary mode (ce-id, ce-source, \
                     ce-specversion: 1.0, ce-type headers) or a structured event",
                ));
            }
            binary::decode(content_type, headers, body).map(|event| vec![event])
        }
    }
}

/// What a function receives for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRequest {
    /// Headers to send (lower-case names), already filtered by the core's header policy.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The core message's `message_id` (sent as `X-Message-Id`): the event's `id`.
    pub message_id: String,
}

/// The call a function receives for `event`: binary mode (`ce-*` headers, the data with its
/// `Content-Type`) or structured (one JSON object).
pub fn to_function_request(event: &CloudEvent, mode: Mode) -> FunctionRequest {
    let (mut headers, body) = encode(event, mode);
    headers.retain(|(name, _)| crate::headers::forwardable(name));
    FunctionRequest {
        headers,
        body,
        message_id: event.id.clone(),
    }
}

/// `event` as an HTTP message in `mode`: headers (lower-case names) and body.
fn encode(event: &CloudEvent, mode: Mode) -> (Vec<(String, String)>, Bytes) {
    match mode {
        Mode::Binary => binary::encode(event),
        Mode::Structured => {
            let mut headers = vec![(
                "content-type".to_owned(),
                format!("{STRUCTURED_CONTENT_TYPE}; charset=utf-8"),
            )];
            headers.extend(binary::trace_headers(event));
            (headers, Bytes::from(json::encode_structured(event)))
        }
    }
}

/// An HTTP answer to send back to the event's sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// The answer carrying a reply event back to the sender (`200`, as Knative subscribers answer).
pub fn encode_response(event: &CloudEvent, mode: Mode) -> HttpReply {
    let (headers, body) = encode(event, mode);
    HttpReply {
        status: 200,
        headers,
        body,
    }
}

/// Whether the request asked for a reply event: a `Prefer` header with the `reply` preference
/// (RFC 7240 list syntax, any case).
pub fn wants_reply<K: AsRef<str>, V: AsRef<[u8]>>(headers: &[(K, V)]) -> bool {
    headers
        .iter()
        .filter(|(name, _)| name.as_ref().eq_ignore_ascii_case("prefer"))
        .any(|(_, value)| {
            value.as_ref().split(|&b| b == b',').any(|preference| {
                let token = preference.split(|&b| b == b';').next().unwrap_or_default();
                token.trim_ascii().eq_ignore_ascii_case(b"reply")
            })
        })
}

/// The reply event in a function's response, if it answered one: a `200` whose body is a
/// structured event, or whose headers carry a binary-mode event (all of `ce-id`, `ce-source`,
/// `ce-specversion`, `ce-type`). `Ok(None)`: an ordinary answer (any other status, `202`, no
/// event). `Err`: the function tried to answer an event but it is not a valid one.
pub fn reply_from_response<K: AsRef<str>, V: AsRef<[u8]>>(
    status: u16,
    headers: &[(K, V)],
    body: Bytes,
    limits: &Limits,
) -> Result<Option<CloudEvent>, CeError> {
    if status != 200 {
        return Ok(None);
    }
    let content_type = headers
        .iter()
        .find(|(name, _)| name.as_ref().eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.as_ref());
    match request_mode(content_type) {
        RequestMode::Batch => Err(CeError::unsupported(
            "the function answered a batch of events: a reply is one event (binary or structured)",
        )),
        RequestMode::Binary if !binary::has_required_headers(headers) => Ok(None),
        _ => {
            let mut events = decode_request(content_type, headers, body, limits)?;
            Ok(events.pop())
        }
    }
}
