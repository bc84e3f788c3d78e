//! The three content modes against the HTTP binding and JSON format rules, the refusals (each
//! with its status and a message naming the attribute), routing, delivery and reply events,
//! and round trips of arbitrary events through both encodings.

use super::*;
use proptest::prelude::*;

type Headers = Vec<(String, String)>;

fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

fn binary_headers() -> Headers {
    headers(&[
        ("ce-specversion", "1.0"),
        ("Ce-Id", "A234-1234-1234"),
        ("CE-SOURCE", "https://github.com/cloudevents/spec/pull"),
        ("ce-type", "com.github.pull_request.opened"),
        ("ce-subject", "123"),
        ("ce-time", "2018-04-05T17:31:00Z"),
        (
            "ce-traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("ce-comexampleextension1", "value"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
    ])
}

fn decode(
    content_type: Option<&str>,
    headers: &Headers,
    body: &[u8],
) -> Result<Vec<CloudEvent>, CeError> {
    decode_request(
        content_type.map(str::as_bytes),
        headers,
        Bytes::copy_from_slice(body),
        &Limits::default(),
    )
}

fn decode_one(content_type: Option<&str>, headers: &Headers, body: &[u8]) -> CloudEvent {
    let mut events = decode(content_type, headers, body).expect("a valid event");
    assert_eq!(events.len(), 1);
    events.remove(0)
}

fn refused(content_type: Option<&str>, headers: &Headers, body: &[u8]) -> CeError {
    decode(content_type, headers, body).expect_err("must be refused")
}

fn assert_refused(err: &CeError, status: u16, needles: &[&str]) {
    assert_eq!(err.status, status, "{err}");
    for needle in needles {
        assert!(
            err.message.contains(needle),
            "{needle:?} not in {:?}",
            err.message
        );
    }
}

// -- binary mode ------------------------------------------------------------------------------

#[test]
fn binary_mode_reads_ce_headers_in_any_case_and_the_body_as_data() {
    let event = decode_one(Some("application/json"), &binary_headers(), br#"{"n": 1}"#);
    assert_eq!(event.id, "A234-1234-1234");
    assert_eq!(event.source, "https://github.com/cloudevents/spec/pull");
    assert_eq!(event.ty, "com.github.pull_request.opened");
    assert_eq!(event.subject.as_deref(), Some("123"));
    assert_eq!(event.time.as_deref(), Some("2018-04-05T17:31:00Z"));
    assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(event.data.as_deref(), Some(&br#"{"n": 1}"#[..]));
    assert_eq!(
        event.extension("traceparent"),
        Some(&AttrValue::String(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()
        ))
    );
    assert_eq!(
        event.extension("comexampleextension1"),
        Some(&AttrValue::String("value".to_owned()))
    );
}

#[test]
fn binary_mode_without_content_type_or_body_has_no_datacontenttype_or_data() {
    let mut h = binary_headers();
    h.retain(|(n, _)| n != "Content-Type");
    let event = decode_one(None, &h, b"");
    assert_eq!(event.datacontenttype, None);
    assert_eq!(event.data, None);
}

#[test]
fn binary_mode_percent_decodes_and_unquotes_header_values() {
    let mut h = binary_headers();
    h.push((
        "ce-greeting".to_owned(),
        "Euro%20%E2%82%AC%20%F0%9F%98%80".to_owned(),
    ));
    h.push(("ce-quoted".to_owned(), r#""a \"b\" c%25""#.to_owned()));
    let event = decode_one(Some("text/plain"), &h, b"x");
    assert_eq!(
        event.extension("greeting"),
        Some(&AttrValue::String("Euro € 😀".to_owned()))
    );
    assert_eq!(
        event.extension("quoted"),
        Some(&AttrValue::String("a \"b\" c%".to_owned()))
    );
}

#[test]
fn binary_mode_refuses_bad_percent_encoding_overlong_utf8_and_control_characters() {
    for (value, needle) in [
        ("50%", "percent-encode '%' as %25"),
        ("%G1", "two hex digits"),
        ("%C0%A0", "not UTF-8"),
        ("line%0Abreak", "control character U+000A"),
        (r#""unterminated\""#, "lone '\\'"),
    ] {
        let mut h = binary_headers();
        h.push(("ce-subject2".to_owned(), value.to_owned()));
        let err = refused(Some("text/plain"), &h, b"x");
        assert_refused(&err, 400, &[needle]);
    }
}

#[test]
fn binary_mode_names_each_missing_required_attribute() {
    for missing in ["ce-id", "ce-source", "ce-specversion", "ce-type"] {
        let mut h = binary_headers();
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(missing));
        let err = refused(Some("application/json"), &h, b"{}");
        assert_refused(
            &err,
            400,
            &[&format!("header {missing}"), "non-empty id, source"],
        );
    }
    let mut h = binary_headers();
    h.retain(|(n, _)| n != "Ce-Id");
    h.push(("ce-id".to_owned(), String::new()));
    assert_refused(&refused(None, &h, b""), 400, &["header ce-id"]);
}

#[test]
fn binary_mode_refuses_other_spec_versions_bad_names_duplicates_and_bad_time() {
    let with = |name: &str, value: &str, drop: Option<&str>| {
        let mut h = binary_headers();
        if let Some(drop) = drop {
            h.retain(|(n, _)| !n.eq_ignore_ascii_case(drop));
        }
        h.push((name.to_owned(), value.to_owned()));
        refused(Some("application/json"), &h, b"{}")
    };
    assert_refused(
        &with("ce-specversion", "0.3", Some("ce-specversion")),
        400,
        &["\"0.3\"", "1.0"],
    );
    assert_refused(
        &with("ce-foo_bar", "x", None),
        400,
        &["foo_bar", "lower-case a-z and 0-9"],
    );
    assert_refused(&with("ce-data", "x", None), 400, &["reserved"]);
    assert_refused(&with("ce-ID", "other", None), 400, &["given twice"]);
    assert_refused(
        &with("ce-time", "yesterday", Some("ce-time")),
        400,
        &["RFC 3339"],
    );
    assert_refused(
        &with("ce-dataschema", "schema.json", None),
        400,
        &["absolute URI"],
    );
    assert_refused(
        &with("ce-datacontenttype", "text/plain", None),
        400,
        &["Content-Type"],
    );
}

#[test]
fn a_request_without_ce_headers_or_event_content_type_is_not_an_event() {
    let err = refused(
        Some("application/json"),
        &headers(&[("X-Other", "1")]),
        b"{}",
    );
    assert_refused(&err, 400, &["not a CloudEvent", "ce-id"]);
}

// -- structured mode ---------------------------------------------------------------------------

const STRUCTURED: &str = r#"{
    "specversion" : "1.0",
    "type" : "com.github.pull_request.opened",
    "source" : "https://github.com/cloudevents/spec/pull",
    "subject" : "123",
    "id" : "A234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "flag": true,
    "nothing": null,
    "datacontenttype" : "application/json",
    "data" : {"appinfoA" : "abc", "appinfoB" : 123, "appinfoC" : true}
}"#;

#[test]
fn structured_mode_keeps_json_data_as_sent_and_typed_extensions() {
    let body = Bytes::from_static(STRUCTURED.as_bytes());
    let events = decode_request(
        Some(b"application/cloudevents+json; charset=UTF-8"),
        &Headers::new(),
        body.clone(),
        &Limits::default(),
    )
    .expect("valid");
    let event = &events[0];
    assert_eq!(event.id, "A234-1234-1234");
    let data = event.data.as_ref().expect("data");
    assert_eq!(
        &data[..],
        br#"{"appinfoA" : "abc", "appinfoB" : 123, "appinfoC" : true}"#
    );
    // Zero copy: the data is a slice of the request body.
    let base = body.as_ptr() as usize;
    let at = data.as_ptr() as usize;
    assert!(at >= base && at < base + body.len());
    assert_eq!(
        event.extension("comexampleothervalue"),
        Some(&AttrValue::Integer(5))
    );
    assert_eq!(event.extension("flag"), Some(&AttrValue::Boolean(true)));
    assert_eq!(event.extension("nothing"), None);
}

#[test]
fn structured_mode_reads_attributes_from_the_body_only() {
    // A sender may add ce- headers in structured mode (§3.2.3); the body is the event.
    let mut h = binary_headers();
    h.push(("ce-id".to_owned(), "from-a-header".to_owned()));
    let event = decode_one(
        Some("Application/CloudEvents+JSON"),
        &h,
        STRUCTURED.as_bytes(),
    );
    assert_eq!(event.id, "A234-1234-1234");
    assert_eq!(event.extension("traceparent"), None);
}

#[test]
fn structured_mode_data_forms() {
    let event = |extra: &str| {
        let body = format!(r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t"{extra}}}"#);
        decode(
            Some(STRUCTURED_CONTENT_TYPE),
            &Headers::new(),
            body.as_bytes(),
        )
    };
    let text = event(r#","datacontenttype":"text/plain","data":"h\u00e9llo \"x\"""#).expect("text");
    assert_eq!(text[0].data.as_deref(), Some("héllo \"x\"".as_bytes()));
    let b64 = event(
        r#","datacontenttype":"application/octet-stream","data_base64":"AAH/"}"#
            .trim_end_matches('}'),
    )
    .expect("base64");
    assert_eq!(b64[0].data.as_deref(), Some(&[0u8, 1, 255][..]));
    // JSON data without datacontenttype is application/json (JSON format §3.1).
    let implied = event(r#","data":[1,2]"#).expect("implied json");
    assert_eq!(
        implied[0].datacontenttype.as_deref(),
        Some("application/json")
    );
    assert_eq!(implied[0].data.as_deref(), Some(&b"[1,2]"[..]));
    let none = event(r#","data":null"#).expect("null data");
    assert_eq!(none[0].data, None);
    assert_refused(
        &event(r#","data":1,"data_base64":"AA==""#).expect_err("both"),
        400,
        &["send one of them"],
    );
    assert_refused(
        &event(r#","data_base64":"not base64!""#).expect_err("b64"),
        400,
        &["data_base64", "base64"],
    );
    assert_refused(
        &event(r#","data_base64":5"#).expect_err("b64 type"),
        400,
        &["string of base64"],
    );
}

#[test]
fn structured_mode_refusals_name_the_problem() {
    let refuse = |body: &str| {
        refused(
            Some(STRUCTURED_CONTENT_TYPE),
            &Headers::new(),
            body.as_bytes(),
        )
    };
    assert_refused(&refuse("{"), 400, &["not valid JSON"]);
    assert_refused(&refuse("[1]"), 400, &["not valid JSON"]);
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","type":"t"}"#),
        400,
        &["attribute \"source\""],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","id":"2","source":"/s","type":"t"}"#),
        400,
        &["given twice"],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":7,"source":"/s","type":"t"}"#),
        400,
        &["attribute \"id\" must be a string"],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ratio":0.5}"#),
        400,
        &["32-bit integers"],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","big":4294967296}"#),
        400,
        &["32-bit integers"],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","obj":{}}"#),
        400,
        &["JSON object"],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Upper":"x"}"#),
        400,
        &["\"Upper\""],
    );
    assert_refused(
        &refuse(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t\u0000"}"#),
        400,
        &["control character U+0000"],
    );
}

#[test]
fn unsupported_formats_and_charsets_are_415() {
    for content_type in [
        "application/cloudevents+xml",
        "application/cloudevents",
        "application/cloudevents-batch+avro",
    ] {
        assert_refused(
            &refused(Some(content_type), &Headers::new(), b"{}"),
            415,
            &["not supported"],
        );
    }
    assert_refused(
        &refused(
            Some("application/cloudevents+json; charset=latin1"),
            &Headers::new(),
            b"{}",
        ),
        415,
        &["charset=utf-8"],
    );
}

#[test]
fn bodies_over_the_limit_are_413() {
    let limits = Limits {
        max_body_bytes: 10,
        max_batch: 2,
    };
    let err = decode_request(
        Some(STRUCTURED_CONTENT_TYPE.as_bytes()),
        &Headers::new(),
        Bytes::from_static(b"{\"data\":\"12345\"}"),
        &limits,
    )
    .expect_err("too big");
    assert_refused(&err, 413, &["max_body_bytes (10)"]);
}

#[test]
fn deeply_nested_json_is_a_400_not_a_stack_overflow() {
    let deep = "[".repeat(100_000);
    let body =
        format!(r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{deep}}}"#);
    assert_refused(
        &refused(
            Some(STRUCTURED_CONTENT_TYPE),
            &Headers::new(),
            body.as_bytes(),
        ),
        400,
        &["not valid JSON"],
    );
    assert_refused(
        &refused(Some(BATCH_CONTENT_TYPE), &Headers::new(), deep.as_bytes()),
        400,
        &["JSON array"],
    );
}

// -- batched mode -------------------------------------------------------------------------------

fn batch_of(n: usize) -> String {
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"specversion":"1.0","id":"{i}","source":"/s","type":"t","data":{{"i":{i}}}}}"#
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

#[test]
fn batched_mode_decodes_every_event_in_order() {
    let events = decode(
        Some(BATCH_CONTENT_TYPE),
        &Headers::new(),
        batch_of(3).as_bytes(),
    )
    .expect("batch");
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["0", "1", "2"]);
    assert_eq!(events[2].data.as_deref(), Some(&br#"{"i":2}"#[..]));
    assert!(decode(Some(BATCH_CONTENT_TYPE), &Headers::new(), b"[]")
        .expect("empty")
        .is_empty());
}

#[test]
fn batched_mode_caps_the_batch_and_refuses_it_whole_on_one_bad_event() {
    let limits = Limits {
        max_body_bytes: 1 << 20,
        max_batch: 2,
    };
    let err = decode_request(
        Some(BATCH_CONTENT_TYPE.as_bytes()),
        &Headers::new(),
        Bytes::from(batch_of(3)),
        &limits,
    )
    .expect_err("over max_batch");
    assert_refused(&err, 413, &["3 events", "max_batch (2)"]);
    let bad = r#"[{"specversion":"1.0","id":"0","source":"/s","type":"t"},{"specversion":"1.0","id":"1","source":"/s"}]"#;
    assert_refused(
        &refused(Some(BATCH_CONTENT_TYPE), &Headers::new(), bad.as_bytes()),
        400,
        &["event #1 of the batch", "\"type\""],
    );
    assert_refused(
        &refused(
            Some(BATCH_CONTENT_TYPE),
            &Headers::new(),
            STRUCTURED.as_bytes(),
        ),
        400,
        &["JSON array"],
    );
    assert_refused(
        &refused(Some(BATCH_CONTENT_TYPE), &Headers::new(), b"[1]"),
        400,
        &["event #0"],
    );
}

// -- routing -------------------------------------------------------------------------------------

#[test]
fn topics_are_the_routing_attribute_and_never_a_wildcard() {
    let event = decode_one(Some("application/json"), &binary_headers(), b"{}");
    assert_eq!(
        topic_for(&event, RouteBy::Type),
        Ok("com.github.pull_request.opened")
    );
    assert_eq!(
        topic_for(&event, RouteBy::Source),
        Ok("https://github.com/cloudevents/spec/pull")
    );
    assert_eq!(topic_for(&event, RouteBy::Subject), Ok("123"));
    let pattern = crate::Pattern::compile("com.github.>").expect("pattern");
    assert!(pattern.matches(topic_for(&event, RouteBy::Type).expect("topic")));
    let mut no_subject = event.clone();
    no_subject.subject = None;
    assert_refused(
        &topic_for(&no_subject, RouteBy::Subject).expect_err("none"),
        400,
        &["no subject"],
    );
    for (ty, wildcard) in [
        ("com.*.push", "\"*\""),
        ("com.github.>", "\">\""),
        ("a/#", "\"#\""),
    ] {
        let mut wild = event.clone();
        wild.ty = ty.to_owned();
        assert_refused(
            &topic_for(&wild, RouteBy::Type).expect_err("wildcard"),
            400,
            &[wildcard],
        );
    }
    for name in ["type", "source", "subject"] {
        assert_eq!(RouteBy::parse(name).map(RouteBy::name), Some(name));
    }
}

// -- delivery to functions -------------------------------------------------------------------------

#[test]
fn functions_get_binary_mode_with_the_event_id_as_message_id() {
    let mut h = binary_headers();
    h.retain(|(n, _)| n != "ce-subject");
    h.push(("ce-subject".to_owned(), "a b%22%25%C3%A9".to_owned()));
    h.push((
        "ce-tracestate".to_owned(),
        "rojo=00f067aa0ba902b7".to_owned(),
    ));
    let event = decode_one(Some("application/json; charset=utf-8"), &h, b"{\"n\":1}");
    let call = to_function_request(&event, Mode::Binary);
    assert_eq!(call.message_id, "A234-1234-1234");
    assert_eq!(&call.body[..], b"{\"n\":1}");
    let get = |name: &str| {
        call.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("ce-specversion"), Some("1.0"));
    assert_eq!(get("ce-id"), Some("A234-1234-1234"));
    assert_eq!(get("ce-subject"), Some("a%20b%22%25%C3%A9"));
    assert_eq!(get("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(get("traceparent"), get("ce-traceparent"));
    assert_eq!(get("tracestate"), Some("rojo=00f067aa0ba902b7"));
    assert!(call
        .headers
        .iter()
        .all(|(n, _)| crate::headers::forwardable(n)));
    // What the function receives decodes to the same event.
    let again = decode_one(get("content-type"), &call.headers, &call.body);
    assert_eq!(again, event);
}

#[test]
fn functions_get_structured_mode_on_request() {
    let event = decode_one(
        Some(STRUCTURED_CONTENT_TYPE),
        &Headers::new(),
        STRUCTURED.as_bytes(),
    );
    let call = to_function_request(&event, Mode::Structured);
    assert_eq!(
        call.headers,
        headers(&[(
            "content-type",
            "application/cloudevents+json; charset=utf-8"
        )])
    );
    let again = decode_one(Some(STRUCTURED_CONTENT_TYPE), &Headers::new(), &call.body);
    assert_eq!(again, event);
}

// -- reply events -----------------------------------------------------------------------------------

#[test]
fn replies_are_200_answers_carrying_an_event() {
    let limits = Limits::default();
    let reply = |status: u16, h: &Headers, body: &[u8]| {
        reply_from_response(status, h, Bytes::copy_from_slice(body), &limits)
    };
    let plain = headers(&[("Content-Type", "application/json")]);
    assert_eq!(reply(200, &plain, b"{\"ok\":true}"), Ok(None));
    assert_eq!(reply(200, &plain, b""), Ok(None));
    assert_eq!(reply(202, &binary_headers(), b"{}"), Ok(None));
    assert_eq!(reply(500, &binary_headers(), b"{}"), Ok(None));
    let binary = reply(200, &binary_headers(), b"{\"r\":1}")
        .expect("ok")
        .expect("event");
    assert_eq!(binary.id, "A234-1234-1234");
    assert_eq!(binary.data.as_deref(), Some(&b"{\"r\":1}"[..]));
    let structured_headers = headers(&[("content-type", STRUCTURED_CONTENT_TYPE)]);
    let structured = reply(200, &structured_headers, STRUCTURED.as_bytes())
        .expect("ok")
        .expect("event");
    assert_eq!(structured.ty, "com.github.pull_request.opened");
    assert_refused(
        &reply(200, &structured_headers, b"{\"id\":\"1\"}").expect_err("invalid"),
        400,
        &["missing"],
    );
    let batch = headers(&[("content-type", BATCH_CONTENT_TYPE)]);
    assert_refused(
        &reply(200, &batch, b"[]").expect_err("batch"),
        415,
        &["batch"],
    );
}

#[test]
fn reply_events_go_back_in_the_mode_asked() {
    let event = decode_one(
        Some(STRUCTURED_CONTENT_TYPE),
        &Headers::new(),
        STRUCTURED.as_bytes(),
    );
    let binary = encode_response(&event, Mode::Binary);
    assert_eq!(binary.status, 200);
    let ct = binary
        .headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| v.as_str());
    // Binary mode carries every extension as a string (headers have no types).
    let mut as_strings = event.clone();
    for (_, value) in &mut as_strings.extensions {
        *value = AttrValue::String(value.to_string());
    }
    assert_eq!(decode_one(ct, &binary.headers, &binary.body), as_strings);
    let structured = encode_response(&event, Mode::Structured);
    assert_eq!(
        decode_one(
            Some(STRUCTURED_CONTENT_TYPE),
            &Headers::new(),
            &structured.body
        ),
        event
    );
    assert_eq!(
        request_mode(Some(b"application/cloudevents-batch+json")).reply_mode(),
        Mode::Structured
    );
    assert_eq!(request_mode(None).reply_mode(), Mode::Binary);
}

#[test]
fn prefer_reply_is_found_in_any_case_and_list_position() {
    assert!(wants_reply(&headers(&[("Prefer", "reply")])));
    assert!(wants_reply(&headers(&[(
        "prefer",
        "respond-async, Reply; x=1"
    )])));
    assert!(!wants_reply(&headers(&[("Prefer", "return=minimal")])));
    assert!(!wants_reply(&headers(&[("X-Prefer", "reply")])));
}

// -- properties -------------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    // Printable Unicode, including space, quote, percent and non-ASCII: what percent-encoding is for.
    proptest::string::string_regex("[ -~\u{a0}-\u{2fff}\u{1f600}-\u{1f64f}]{1,24}").expect("regex")
}

fn name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9]{1,20}")
        .expect("regex")
        .prop_filter("not a core attribute", |n| {
            ![
                "id",
                "source",
                "type",
                "specversion",
                "datacontenttype",
                "dataschema",
                "subject",
                "time",
                "data",
                "traceparent",
                "tracestate",
            ]
            .contains(&n.as_str())
        })
}

fn attr_value(typed: bool) -> BoxedStrategy<AttrValue> {
    if typed {
        prop_oneof![
            text().prop_map(AttrValue::String),
            any::<i32>().prop_map(AttrValue::Integer),
            any::<bool>().prop_map(AttrValue::Boolean),
        ]
        .boxed()
    } else {
        text().prop_map(AttrValue::String).boxed()
    }
}

prop_compose! {
    fn event(typed: bool)(
        id in text(), source in text(), ty in text(),
        subject in proptest::option::of(text()),
        time in proptest::option::of(Just("2026-12-03T10:43:30.25+01:00".to_owned())),
        content_type in proptest::option::of(prop_oneof![
            Just("application/json".to_owned()),
            Just("text/plain; charset=utf-8".to_owned()),
            Just("application/octet-stream".to_owned()),
        ]),
        data in proptest::option::of(prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..64),
            Just(br#"{"a":[1,"x"]}"#.to_vec()),
            text().prop_map(String::into_bytes),
        ]),
        extensions in proptest::collection::btree_map(name(), attr_value(typed), 0..4),
    ) -> CloudEvent {
        CloudEvent {
            id, source, ty, subject, time,
            datacontenttype: content_type,
            dataschema: None,
            extensions: extensions.into_iter().collect(),
            data: data.map(Bytes::from),
        }
    }
}

proptest! {
    #[test]
    fn header_values_survive_percent_encoding(value in "\\PC*") {
        let encoded = binary::encode_value(&value);
        prop_assert!(encoded.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"'));
        prop_assert_eq!(binary::decode_value(encoded.as_bytes()), Ok(value));
    }

    #[test]
    fn any_event_survives_binary_mode(event in event(false)) {
        let call = to_function_request(&event, Mode::Binary);
        // The engine refuses a message whose headers, topic or id are not valid HTTP: nothing
        // the decoder accepts may be refused there.
        for (name, value) in &call.headers {
            prop_assert!(http::HeaderName::try_from(name.as_str()).is_ok(), "{}", name);
            prop_assert!(http::HeaderValue::try_from(value.as_str()).is_ok(), "{}: {:?}", name, value);
        }
        prop_assert!(http::HeaderValue::try_from(call.message_id.as_str()).is_ok());
        for by in [RouteBy::Type, RouteBy::Source] {
            if let Ok(topic) = topic_for(&event, by) {
                prop_assert!(http::HeaderValue::try_from(topic).is_ok());
            }
        }
        let ct = call.headers.iter().find(|(n, _)| n == "content-type").map(|(_, v)| v.as_str());
        let again = decode_one(ct, &call.headers, &call.body);
        prop_assert_eq!(again, event);
    }

    #[test]
    fn any_event_survives_structured_mode(event in event(true)) {
        let call = to_function_request(&event, Mode::Structured);
        let again = decode_one(Some(STRUCTURED_CONTENT_TYPE), &Headers::new(), &call.body);
        let mut expected = event.clone();
        // Data in "data" without datacontenttype is application/json by the JSON format.
        if expected.datacontenttype.is_none()
            && expected.data.as_ref().is_some_and(|d| serde_json::from_slice::<serde::de::IgnoredAny>(d).is_ok())
        {
            expected.datacontenttype = Some("application/json".to_owned());
        }
        prop_assert_eq!(again, expected);
    }

    #[test]
    fn arbitrary_requests_never_panic(
        content_type in proptest::option::of(prop_oneof![
            Just(STRUCTURED_CONTENT_TYPE.to_owned()),
            Just(BATCH_CONTENT_TYPE.to_owned()),
            "\\PC{0,30}",
        ]),
        header_list in proptest::collection::vec(
            (prop_oneof![Just("ce-id".to_owned()), Just("ce-specversion".to_owned()), "ce-[a-zA-Z_]{0,5}"],
             proptest::collection::vec(any::<u8>(), 0..16)),
            0..6),
        body in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let limits = Limits { max_body_bytes: 100, max_batch: 3 };
        if let Err(err) = decode_request(content_type.as_deref().map(str::as_bytes), &header_list, Bytes::from(body.clone()), &limits) {
            prop_assert!([400, 413, 415].contains(&err.status));
            prop_assert!(!err.message.is_empty());
        }
        let _ = reply_from_response(200, &header_list, Bytes::from(body), &limits);
    }
}
