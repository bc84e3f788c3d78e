//! Test hooks over the core's CloudEvents and signature functions, so Python tests can check
//! them against an independent implementation (the `cloudevents` SDK) and the Python webhook
//! can share the one signature check. Conversions only: every decision is in the core.

use bytes::Bytes;
use fastconn_core::cloudevents::{self, Limits, Mode, RouteBy};
use fastconn_core::signature::{now_unix, SignatureRule};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

type Headers = Vec<(String, String)>;
type Call<'py> = (String, String, Headers, Bound<'py, PyBytes>);

fn content_type(headers: &[(String, String)]) -> Option<&[u8]> {
    headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.as_bytes())
}

fn mode(name: &str) -> PyResult<Mode> {
    match name {
        "binary" => Ok(Mode::Binary),
        "structured" => Ok(Mode::Structured),
        _ => Err(PyValueError::new_err(format!(
            "delivery {name:?}: use \"binary\" or \"structured\""
        ))),
    }
}

/// The calls a `type = "cloudevents"` route submits for one request: (topic, message id,
/// headers, body) per event. A refused request raises ValueError((status, message)).
#[pyfunction]
#[pyo3(signature = (headers, body, *, route_by="type", delivery="binary", max_body_bytes=1048576, max_batch=100))]
pub fn cloudevents_calls<'py>(
    py: Python<'py>,
    headers: Headers,
    body: &[u8],
    route_by: &str,
    delivery: &str,
    max_body_bytes: usize,
    max_batch: usize,
) -> PyResult<Vec<Call<'py>>> {
    let (by, delivery) = route_settings(route_by, delivery)?;
    let limits = Limits {
        max_body_bytes,
        max_batch,
    };
    let refused = |e: cloudevents::CeError| PyValueError::new_err((e.status, e.message));
    let events = cloudevents::decode_request(
        content_type(&headers),
        &headers,
        Bytes::copy_from_slice(body),
        &limits,
    )
    .map_err(refused)?;
    events
        .iter()
        .map(|event| {
            let topic = cloudevents::topic_for(event, by).map_err(refused)?;
            let call = cloudevents::to_function_request(event, delivery);
            Ok((
                topic.to_owned(),
                call.message_id,
                call.headers,
                PyBytes::new(py, &call.body),
            ))
        })
        .collect()
}

/// The answer to send back for a function's response: (status, headers, body) carrying its
/// reply event in `mode`, or None when the response is no event. A malformed reply event
/// raises ValueError((status, message)).
#[pyfunction]
#[pyo3(signature = (status, headers, body, *, mode="binary", max_body_bytes=1048576))]
pub fn cloudevents_reply<'py>(
    py: Python<'py>,
    status: u16,
    headers: Headers,
    body: &[u8],
    mode: &str,
    max_body_bytes: usize,
) -> PyResult<Option<(u16, Headers, Bound<'py, PyBytes>)>> {
    let reply_mode = self::mode(mode)?;
    let limits = Limits {
        max_body_bytes,
        ..Limits::default()
    };
    let reply =
        cloudevents::reply_from_response(status, &headers, Bytes::copy_from_slice(body), &limits)
            .map_err(|e| PyValueError::new_err((e.status, e.message)))?;
    Ok(reply.map(|event| {
        let answer = cloudevents::encode_response(&event, reply_mode);
        (
            answer.status,
            answer.headers,
            PyBytes::new(py, &answer.body),
        )
    }))
}

/// The reply events in a batch of function responses (status, headers, body), each encoded
/// in structured mode (`application/cloudevents+json`: one self-contained body, the form every
/// broker carries alike), for a `reply_sink`: per response (the event's body, None) or (None,
/// why the reply event is malformed), or (None, None) when the response is no event. One call
/// per batch.
#[pyfunction]
#[pyo3(signature = (responses, *, max_body_bytes=1048576))]
pub fn cloudevents_replies<'py>(
    py: Python<'py>,
    responses: Vec<(u16, Headers, Vec<u8>)>,
    max_body_bytes: usize,
) -> Vec<(Option<Bound<'py, PyBytes>>, Option<String>)> {
    let limits = Limits {
        max_body_bytes,
        ..Limits::default()
    };
    responses
        .into_iter()
        .map(|(status, headers, body)| {
            match cloudevents::reply_from_response(status, &headers, Bytes::from(body), &limits) {
                Ok(None) => (None, None),
                Ok(Some(event)) => {
                    let encoded = cloudevents::encode_response(&event, Mode::Structured);
                    (Some(PyBytes::new(py, &encoded.body)), None)
                }
                Err(e) => (None, Some(e.message)),
            }
        })
        .collect()
}

/// Why the request's signature is refused (the 401 message), or None when it verifies.
/// `scheme` is "hmac", "stripe" or "token"; `now` is Unix seconds (default: the clock).
#[pyfunction]
#[pyo3(signature = (headers, body, *, header, scheme, secret, prefix="", algorithm="sha256", encoding="hex", tolerance_secs=300, now=None))]
#[allow(clippy::too_many_arguments)]
pub fn verify_signature(
    headers: Headers,
    body: &[u8],
    header: &str,
    scheme: &str,
    secret: &[u8],
    prefix: &str,
    algorithm: &str,
    encoding: &str,
    tolerance_secs: u64,
    now: Option<i64>,
) -> PyResult<Option<String>> {
    let rule = SignatureRule::configured(
        header,
        scheme,
        secret,
        prefix,
        algorithm,
        encoding,
        tolerance_secs,
    )
    .map_err(PyValueError::new_err)?;
    let now = now.unwrap_or_else(now_unix);
    Ok(rule.verify(&headers, body, now).err().map(|e| e.message()))
}

/// A route's `route_by` and `delivery` as the core's values.
pub fn route_settings(route_by: &str, delivery: &str) -> PyResult<(RouteBy, Mode)> {
    let by = RouteBy::parse(route_by).ok_or_else(|| {
        PyValueError::new_err(format!(
            "route_by {route_by:?}: use \"type\", \"source\" or \"subject\""
        ))
    })?;
    Ok((by, mode(delivery)?))
}
