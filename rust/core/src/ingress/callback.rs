//! What a callback (`POST /callback/<token>`, [`crate::callbacks`]) is answered, whichever
//! server read it: hyper ([`super::service`]) or the callback lane ([`super::callback_lane`]).
//!
//! Two steps around the body: [`admit`] checks the head (token, status header) and starts
//! receiving the call's callback, so the call is not timed out while its body arrives;
//! [`settle`] claims the call with the body read and hands it the result. Both answer with a
//! small JSON object.

use crate::callbacks::{self as callback, CallbackResult, CallbackRoute, CallbackTable, Claim};
use crate::callbacks::{Receipt, Refusal};
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

/// The body of a callback that settled its call: `{"status": "settled"}`, written once.
pub(super) const SETTLED: &[u8] = br#"{"status":"settled"}"#;

/// A callback's answer: its status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    fn json(status: StatusCode, key: &str, text: &str) -> Answer {
        Answer {
            status,
            body: Bytes::from(serde_json::json!({ key: text }).to_string()),
        }
    }

    fn settled() -> Answer {
        Answer {
            status: StatusCode::OK,
            body: Bytes::from_static(SETTLED),
        }
    }

    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        response
    }
}

/// A callback whose head passed: its call is being received until [`settle`].
#[derive(Debug)]
pub(super) struct Admitted {
    call_id: String,
    status: i64,
    receipt: Receipt,
}

/// Checks a callback's head: the token of its call id, its `X-Function-Status`, and that its
/// call is pending. `Err` is the refusal to answer once the body is read (closing on an
/// unread body resets the client).
pub(super) fn admit(
    route: &CallbackRoute,
    token: &str,
    call_id: Option<&HeaderValue>,
    status: Option<&HeaderValue>,
) -> Result<Admitted, Answer> {
    let refuse = |status, why, text: &str| {
        route.table.refuse(why);
        Answer::json(status, "error", text)
    };
    // A call id is ASCII (uuid hex): anything else, even undecodable bytes, is not ours.
    let call_id = call_id.map_or(&b""[..], HeaderValue::as_bytes);
    let call_id = match std::str::from_utf8(call_id) {
        Ok(id) if id.is_ascii() && route.table.token_matches(id.as_bytes(), token.as_bytes()) => {
            id.to_owned()
        }
        _ => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                Refusal::BadToken,
                "bad callback token",
            ))
        }
    };
    let Some(status) = callback::parse_status(status.map(HeaderValue::as_bytes)) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            Refusal::BadRequest,
            "missing or invalid X-Function-Status",
        ));
    };
    match route.table.receive(&call_id) {
        Ok(receipt) => Ok(Admitted {
            call_id,
            status,
            receipt,
        }),
        Err(claim) => Err(refuse_claim(&route.table, claim, &call_id)),
    }
}

/// Claims the admitted callback's call with its body (or, `too_large`, without it: the call
/// fails) and hands the call its result.
pub(super) fn settle(
    route: &CallbackRoute,
    admitted: Admitted,
    headers: HeaderMap,
    body: Bytes,
    too_large: bool,
) -> Answer {
    let Admitted {
        call_id,
        status,
        receipt,
    } = admitted;
    let result = CallbackResult {
        status,
        headers,
        body,
        too_large,
    };
    match receipt.complete(result) {
        Claim::Claimed => {}
        other => return refuse_claim(&route.table, other, &call_id),
    }
    if too_large {
        route.table.refuse(Refusal::TooLarge);
        return Answer::json(
            StatusCode::PAYLOAD_TOO_LARGE,
            "error",
            &too_large_text(route.max_body),
        );
    }
    Answer::settled()
}

/// Why a callback over the limit fails its call (its answer, and the call's result).
pub(super) fn too_large_text(limit: usize) -> String {
    format!(
        "the callback body exceeds [dispatch] max_callback_bytes ({limit} bytes); the result was \
         not read: raise max_callback_bytes or make the function return less"
    )
}

/// 409 for a call settled already, 404 for one never expected (or long forgotten).
fn refuse_claim(table: &CallbackTable, claim: Claim, call_id: &str) -> Answer {
    let (status, why) = if claim == Claim::Duplicate {
        (StatusCode::CONFLICT, Refusal::Duplicate)
    } else {
        (StatusCode::NOT_FOUND, Refusal::Unknown)
    };
    table.refuse(why);
    Answer::json(
        status,
        "error",
        &format!("{} call id {call_id}", why.label()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn route() -> CallbackRoute {
        CallbackRoute {
            table: Arc::new(CallbackTable::new(b"secret", 16)),
            max_body: 1024,
        }
    }

    fn value(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static(""))
    }

    fn token(route: &CallbackRoute, id: &str) -> String {
        String::from_utf8_lossy(&route.table.token(id.as_bytes())).into_owned()
    }

    #[test]
    fn the_static_settled_answer_is_the_json_answer() {
        let json: serde_json::Value = serde_json::from_slice(SETTLED).unwrap_or_default();
        assert_eq!(json, serde_json::json!({"status": "settled"}));
    }

    #[test]
    fn a_callback_settles_once_then_is_a_duplicate() {
        let route = route();
        let mut waiter = route.table.wait_for("call-1");
        let token = token(&route, "call-1");
        let admitted = admit(
            &route,
            &token,
            Some(&value("call-1")),
            Some(&value(" 201 ")),
        );
        let Ok(admitted) = admitted else {
            panic!("refused: {admitted:?}");
        };
        let answer = settle(
            &route,
            admitted,
            HeaderMap::new(),
            Bytes::from_static(b"out"),
            false,
        );
        assert_eq!(answer, Answer::settled());
        let result = waiter.try_recv().unwrap_or_default();
        assert_eq!((result.status, &result.body[..]), (201, &b"out"[..]));
        let again = admit(&route, &token, Some(&value("call-1")), Some(&value("200")));
        assert_eq!(again.err().map(|a| a.status), Some(StatusCode::CONFLICT));
    }

    #[test]
    fn forged_malformed_and_unknown_callbacks_are_refused_and_counted() {
        let route = route();
        let _waiter = route.table.wait_for("call-2");
        let status = |token: &str, id: Option<&str>, code: Option<&str>| {
            let (id, code) = (id.map(value), code.map(value));
            admit(&route, token, id.as_ref(), code.as_ref())
                .err()
                .map(|a| a.status)
        };
        let good = token(&route, "call-2");
        assert_eq!(
            status("f00d", Some("call-2"), Some("200")),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(&good, None, Some("200")),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(&good, Some("call-2"), Some("two hundred")),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(&good, Some("call-2"), None),
            Some(StatusCode::BAD_REQUEST)
        );
        let stranger = token(&route, "call-3");
        assert_eq!(
            status(&stranger, Some("call-3"), Some("200")),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            route.table.refused(),
            vec![("bad_token", 2), ("bad_request", 2), ("unknown", 1)]
        );
    }

    #[test]
    fn a_body_over_the_limit_fails_the_call_with_413() {
        let route = route();
        let mut waiter = route.table.wait_for("call-4");
        let token = token(&route, "call-4");
        let admitted = admit(&route, &token, Some(&value("call-4")), Some(&value("200")));
        let Ok(admitted) = admitted else {
            panic!("refused: {admitted:?}");
        };
        let text = too_large_text(route.max_body);
        let answer = settle(&route, admitted, HeaderMap::new(), Bytes::from(text), true);
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(waiter.try_recv().is_ok_and(|r| r.too_large));
        assert_eq!(route.table.refused(), vec![("too_large", 1)]);
    }
}
