//! `POST <path>` of a `type = "cloudevents"` source: CloudEvents 1.0 over HTTP (binary,
//! structured and batched modes), decoded by [`crate::cloudevents`] and submitted straight into
//! the engine, one message per event, without Python per request:
//!
//! * 202 + `X-Message-Id` (the first event's `id`) once the engine took every event of the
//!   request; a batch is reserved whole before anything is submitted, so it is accepted whole
//!   or refused whole (503) and a 202 covers every event in it;
//! * the decoder's status and message for a request that is not an acceptable event (400
//!   naming the missing attribute, 413 over `max_body_bytes` / `max_batch`, 415);
//! * 401 on a wrong bearer token or signature ([`SignatureRule`]);
//! * 503 + `Retry-After` under backpressure, before the topic map, while not accepting;
//! * with `reply` set, a single event and `Prefer: reply`: the function's reply event (in the
//!   mode the event came in), or 202 when it answered none, 502 when it answered a malformed one.
//!
//! With `asynchronous` the events' functions are invoked through `/async-function/`: each call
//! waits for its callback in the core ([`crate::callbacks`]), and a reply is the callback's.

use super::service::event_route_refusal;
use super::webhook::{
    bearer_matches, bearer_refusal, error, first_result, signature_refusal, unavailable, unrouted,
    waited_response, with_header,
};
use super::{Accepted, Shared};
use crate::cloudevents::{self, Limits, Mode, RouteBy};
use crate::engine::{SubmitError, INGRESS_TOKEN};
use crate::message::{Completion, Message};
use crate::signature::SignatureRule;
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One CloudEvents source's settings, as its Python source pushes them.
#[derive(Debug)]
pub struct CloudEventsRoute {
    /// The source's name (metrics, logs).
    pub name: Arc<str>,
    pub limits: Limits,
    pub route_by: RouteBy,
    /// How functions receive each event.
    pub delivery: Mode,
    /// Whether senders asking with `Prefer: reply` get the function's reply event.
    pub reply: bool,
    /// Whether every event's function response goes back to Python with its outcome (a
    /// `reply_sink` publishes the reply events in it), asked or not.
    pub capture_replies: bool,
    /// `Bearer <token>` expected in `Authorization`.
    pub auth_token: Option<String>,
    pub signature: Option<SignatureRule>,
    /// Whether the source takes events now (not while starting or shutting down).
    pub accepting: bool,
    /// Whether accepted messages carry their body to Python (`print_request_body`).
    pub record_payload: bool,
    /// Invoke functions through `/async-function/` (each call then waits for its callback in
    /// the core; `Prefer: reply` answers with the callback's result).
    pub asynchronous: bool,
}

fn refused(status: u16, message: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        message,
    )
}

impl Shared {
    pub(crate) async fn cloudevents(
        self: &Arc<Self>,
        route: &Arc<CloudEventsRoute>,
        request: Request<Incoming>,
        remote: &str,
    ) -> Response<Full<Bytes>> {
        if let Some(refused) = event_route_refusal(route.accepting, request.method()) {
            return refused;
        }
        if let Some(token) = &route.auth_token {
            if bearer_matches(request.headers(), token) != Some(true) {
                return bearer_refusal();
            }
        }
        let max_body = route.limits.max_body_bytes;
        let (parts, body) = match self.read_body(&route.name, request, max_body, remote).await {
            Ok(read) => read,
            Err(refusal) => return refusal,
        };
        if let Some(refused) = signature_refusal(
            route.signature.as_ref(),
            &parts.headers,
            &body,
            crate::signature::now_unix(),
        ) {
            return refused;
        }
        let headers: Vec<(&str, &[u8])> = parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(HeaderValue::as_bytes);
        let events = match cloudevents::decode_request(content_type, &headers, body, &route.limits)
        {
            Ok(events) => events,
            Err(e) if e.status == 400 => {
                return self.bad_request(&route.name, remote, &e.message);
            }
            Err(e) => return refused(e.status, &e.message),
        };
        let mut calls = Vec::with_capacity(events.len());
        for event in &events {
            match cloudevents::topic_for(event, route.route_by) {
                Ok(topic) => calls.push((
                    topic.to_owned(),
                    cloudevents::to_function_request(event, route.delivery),
                )),
                Err(e) => return self.bad_request(&route.name, remote, &e.message),
            }
        }
        let Some(first_id) = calls.first().map(|(_, call)| call.message_id.clone()) else {
            // An empty batch: nothing to dispatch, and nothing refused.
            return super::service::text_response(StatusCode::ACCEPTED, "accepted\n");
        };
        // Every event's room first: a batch the engine cannot take whole is refused whole.
        let mut slots = Vec::with_capacity(calls.len());
        for _ in &calls {
            match self.engine.reserve_ingress() {
                Ok(slot) => slots.push(slot),
                Err(SubmitError::Full { .. }) => {
                    return unavailable("dispatcher at capacity, retry later");
                }
                Err(_) => return unavailable("shutting down"),
            }
        }
        if !self.routing_ready.load(Ordering::Acquire) {
            return unavailable("topic map not loaded yet");
        }
        let wait = route.reply && calls.len() == 1 && cloudevents::wants_reply(&headers);
        let reply_mode = cloudevents::request_mode(content_type).reply_mode();
        let mut waiter = None;
        for (slot, (topic, call)) in slots.into_iter().zip(calls) {
            let token = INGRESS_TOKEN | self.next_token.fetch_add(1, Ordering::Relaxed);
            let mut message = Message::new(token, topic.clone(), call.body);
            message.message_id = call.message_id;
            message.headers = call.headers;
            message.capture = wait || route.capture_replies;
            message.asynchronous = route.asynchronous;
            // Python hears of the message before its completion can reach it.
            self.sink.accepted(Accepted {
                token,
                source: Arc::clone(&route.name),
                topic,
                message_id: message.message_id.clone(),
                payload: route.record_payload.then(|| message.payload.clone()),
            });
            let sender = if wait {
                let (tx, rx) = tokio::sync::oneshot::channel();
                waiter = Some(rx);
                Some(tx)
            } else {
                None
            };
            self.engine.submit_reserved_ingress(slot, message, sender);
        }
        let Some(waiter) = waiter else {
            let response = super::service::text_response(StatusCode::ACCEPTED, "accepted\n");
            return with_header(response, "x-message-id", &first_id);
        };
        match waiter.await {
            Ok(completion) => reply_response(&completion, &first_id, route, reply_mode),
            Err(_) => with_header(
                unavailable("shut down before every function answered"),
                "x-message-id",
                &first_id,
            ),
        }
    }
}

/// The answer to a `Prefer: reply` sender: the first function's reply event, 202 when it
/// answered none, 502 when its reply is not a valid event; a failed call is answered as
/// `?wait=true` answers it (the function's status and body).
fn reply_response(
    completion: &Completion,
    message_id: &str,
    route: &CloudEventsRoute,
    reply_mode: Mode,
) -> Response<Full<Bytes>> {
    let Some(first) = first_result(completion) else {
        return unrouted(message_id);
    };
    if !(200..300).contains(&first.status) {
        return waited_response(completion, message_id);
    }
    let headers = first.headers.clone().unwrap_or_default();
    let body = first.body.clone().unwrap_or_default();
    let response =
        match cloudevents::reply_from_response(first.status, &headers, body, &route.limits) {
            Ok(Some(event)) => {
                let reply = cloudevents::encode_response(&event, reply_mode);
                let mut response = Response::new(Full::new(reply.body));
                *response.status_mut() =
                    StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
                for (name, value) in &reply.headers {
                    if let (Ok(name), Ok(value)) = (
                        http::header::HeaderName::try_from(name.as_str()),
                        HeaderValue::try_from(value.as_str()),
                    ) {
                        response.headers_mut().append(name, value);
                    }
                }
                response
            }
            Ok(None) => super::service::text_response(StatusCode::ACCEPTED, "accepted\n"),
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "{} answered a malformed reply event (the event was delivered): {}",
                    first.function, e.message
                ),
            ),
        };
    with_header(response, "x-message-id", message_id)
}
