//! The binding of the ingress server: its queue towards Python (requests for Python routes,
//! accepted webhook messages, notices to log), drained in one call per wake-up, and the
//! conversions of route tables and answers.

use crate::completions::WakeQueue;
use bytes::Bytes;
use fastconn_core::ingress::{
    Accepted, Answer, CallbackRoute, CallbackTable, CloudEventsRoute, IngressSink, Notice,
    PyRequest, RouteEntry, RouteKind, WebhookRoute,
};
use fastconn_core::signature::SignatureRule;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use std::sync::Arc;

pub enum Record {
    Request(PyRequest),
    Accepted(Accepted),
    Notice(Notice),
}

pub struct IngressQueue(pub WakeQueue<Record>);

impl IngressSink for IngressQueue {
    fn request(&self, request: PyRequest) {
        self.0.push(Record::Request(request));
    }
    fn accepted(&self, accepted: Accepted) {
        self.0.push(Record::Accepted(accepted));
    }
    fn notice(&self, notice: Notice) {
        self.0.push(Record::Notice(notice));
    }
}

/// A Python route as Python passes it: (method, path, prefix, max_body, oversized).
pub type PythonRoute = (String, String, bool, usize, bool);

/// A webhook source as Python passes it: (name, max_body, auth_token, signature, accepting,
/// python_fallback, record_payload, asynchronous).
pub type WebhookTuple = (
    String,
    usize,
    Option<String>,
    Option<SignatureTuple>,
    bool,
    Option<usize>,
    bool,
    bool,
);

/// A signature check as Python passes it (`SignatureKeys.rule()`): (header, scheme, secret,
/// prefix, algorithm, encoding, tolerance_secs). Webhook and CloudEvents routes take the same.
pub type SignatureTuple = (String, String, String, String, String, String, u64);

/// The core's rule for a route's signature tuple ([`SignatureRule::configured`] parses it);
/// a wrong key is a ValueError naming it.
fn signature_check(tuple: Option<SignatureTuple>) -> PyResult<Option<SignatureRule>> {
    tuple
        .map(
            |(header, scheme, secret, prefix, algorithm, encoding, tolerance)| {
                SignatureRule::configured(
                    &header,
                    &scheme,
                    secret.as_bytes(),
                    &prefix,
                    &algorithm,
                    &encoding,
                    tolerance,
                )
                .map_err(PyValueError::new_err)
            },
        )
        .transpose()
}

/// A CloudEvents source as Python passes it: (name, path, max_body, max_batch, route_by,
/// delivery, reply, auth_token, signature, accepting, record_payload, (capture_replies,
/// asynchronous)); the last two travel as a pair: PyO3 converts tuples of up to 12.
pub type CloudEventsTuple = (
    String,
    String,
    usize,
    usize,
    String,
    String,
    bool,
    Option<String>,
    Option<SignatureTuple>,
    bool,
    bool,
    (bool, bool),
);

fn cloudevents_entry(
    (
        name,
        path,
        max_body,
        max_batch,
        route_by,
        delivery,
        reply,
        auth_token,
        signature,
        accepting,
        record,
        (capture_replies, asynchronous),
    ): CloudEventsTuple,
) -> PyResult<RouteEntry> {
    let (route_by, delivery) = crate::cloudevents::route_settings(&route_by, &delivery)?;
    let signature = signature_check(signature)?;
    Ok(RouteEntry {
        path,
        prefix: false,
        kind: RouteKind::CloudEvents(Arc::new(CloudEventsRoute {
            name: Arc::from(name.as_str()),
            limits: fastconn_core::cloudevents::Limits {
                max_body_bytes: max_body,
                max_batch,
            },
            route_by,
            delivery,
            reply,
            capture_replies,
            auth_token,
            signature,
            accepting,
            record_payload: record,
            asynchronous,
        })),
    })
}

pub fn route_table(
    python: Vec<PythonRoute>,
    webhooks: Vec<WebhookTuple>,
    cloudevents: Vec<CloudEventsTuple>,
    callback: Option<(Arc<CallbackTable>, usize)>,
) -> PyResult<Vec<RouteEntry>> {
    let mut table: Vec<RouteEntry> = python
        .into_iter()
        .map(|(method, path, prefix, max_body, oversized)| RouteEntry {
            path,
            prefix,
            kind: RouteKind::Python {
                method,
                max_body,
                oversized,
            },
        })
        .collect();
    for (name, max_body, auth_token, rule, accepting, fallback, record, asynchronous) in webhooks {
        let signature = signature_check(rule)
            .map_err(|e| PyValueError::new_err(format!("webhook source {name}: {e}")))?;
        table.push(RouteEntry {
            path: fastconn_core::ingress::webhook::PREFIX.to_owned(),
            prefix: true,
            kind: RouteKind::Webhook(Arc::new(WebhookRoute {
                name: Arc::from(name.as_str()),
                max_body,
                auth_token,
                signature,
                accepting,
                python_fallback: fallback,
                record_payload: record,
                asynchronous,
            })),
        });
    }
    for route in cloudevents {
        table.push(cloudevents_entry(route)?);
    }
    if let Some((calls, max_body)) = callback {
        table.push(RouteEntry {
            path: fastconn_core::callbacks::PREFIX.to_owned(),
            prefix: true,
            kind: RouteKind::Callback(Arc::new(CallbackRoute {
                table: calls,
                max_body,
            })),
        });
    }
    Ok(table)
}

/// The four lists of a drain.
pub type Drained<'py> = (Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>);

/// Everything queued, as three lists: requests (id, route, method, path, query, headers,
/// body, remote, too_large), accepted messages (token, source, topic, message_id, payload) and
/// notices (kind, source, remote, text).
pub fn drain<'py>(py: Python<'py>, records: Vec<Record>) -> PyResult<Drained<'py>> {
    let requests = PyList::empty(py);
    let accepted = PyList::empty(py);
    let notices = PyList::empty(py);
    for record in records {
        match record {
            Record::Request(r) => {
                let headers: Vec<(String, Bound<'py, PyBytes>)> = r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), PyBytes::new(py, v)))
                    .collect();
                requests.append((
                    r.id,
                    r.route,
                    r.method,
                    r.path,
                    r.query,
                    headers,
                    PyBytes::new(py, &r.body),
                    r.remote,
                    r.too_large,
                ))?;
            }
            Record::Accepted(a) => {
                accepted.append((
                    a.token,
                    a.source.as_ref(),
                    a.topic,
                    a.message_id,
                    a.payload.as_ref().map(|p| PyBytes::new(py, p)),
                ))?;
            }
            Record::Notice(n) => {
                notices.append((n.kind, n.source.as_deref(), n.remote, n.text))?;
            }
        }
    }
    Ok((requests, accepted, notices))
}

/// An answer as Python passes it: (id, status, headers, body).
pub type AnswerTuple<'py> = (u64, u16, Vec<(String, String)>, Bound<'py, PyBytes>);

pub fn answers(items: Vec<AnswerTuple<'_>>) -> Vec<(u64, Answer)> {
    items
        .into_iter()
        .map(|(id, status, headers, body)| {
            (
                id,
                Answer {
                    status,
                    headers,
                    body: Bytes::copy_from_slice(body.as_bytes()),
                },
            )
        })
        .collect()
}
