//! The JSON event format (`formats/json-format.md`): structured mode (one object) and batched
//! mode (an array of objects). A JSON `data` member is kept as the sender's JSON text (a slice
//! of the request body, no copy); `data_base64` is decoded.

use base64::Engine as _;
use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

use super::event::{is_json_media_type, AttrValue, CloudEvent, EventBuilder, Origin};
use super::{CeError, SPEC_VERSION};

/// A JSON object's members in order, values unparsed. Duplicate member names are kept so they
/// can be refused (serde_json's maps keep the last silently).
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object (one CloudEvent)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    members.push((key.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// A member name, borrowed from the body unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// `text` as a slice of `body` when it lies inside it (no copy), else a copy.
fn sub_bytes(body: &Bytes, text: &str) -> Bytes {
    let start = text.as_ptr() as usize;
    let base = body.as_ptr() as usize;
    if start >= base && start + text.len() <= base + body.len() {
        body.slice(start - base..start - base + text.len())
    } else {
        Bytes::copy_from_slice(text.as_bytes())
    }
}

fn json_error(what: &str, err: &serde_json::Error) -> CeError {
    CeError::bad_request(format!(
        "{what} is not valid JSON ({err}): send application/cloudevents+json as one JSON object \
         per the CloudEvents JSON format"
    ))
}

/// One event from a structured-mode body.
pub(crate) fn decode_structured(body: &Bytes) -> Result<CloudEvent, CeError> {
    let members: Members<'_> =
        serde_json::from_slice(body).map_err(|err| json_error("the body", &err))?;
    event_from_members(body, members, "")
}

/// The events of a batched-mode body (a JSON array, possibly empty), at most `max_batch`.
pub(crate) fn decode_batch(body: &Bytes, max_batch: usize) -> Result<Vec<CloudEvent>, CeError> {
    let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|err| {
        CeError::bad_request(format!(
            "the body is not a JSON array of events ({err}): \
             application/cloudevents-batch+json takes [event, event, ...]"
        ))
    })?;
    if items.len() > max_batch {
        return Err(CeError::too_large(format!(
            "batch of {} events exceeds max_batch ({max_batch}): send smaller batches",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let what = format!("event #{index} of the batch");
            let members: Members<'_> =
                serde_json::from_str(item.get()).map_err(|err| json_error(&what, &err))?;
            event_from_members(body, members, &format!("{what}: "))
        })
        .collect()
}

fn event_from_members(
    body: &Bytes,
    members: Members<'_>,
    context: &str,
) -> Result<CloudEvent, CeError> {
    let with_context = |err: CeError| CeError {
        status: err.status,
        message: format!("{context}{}", err.message),
    };
    let mut event = EventBuilder::new(Origin::Json);
    let mut data: Option<&RawValue> = None;
    let mut data_base64: Option<&RawValue> = None;
    for (name, raw) in members.0 {
        match &*name {
            "data" | "data_base64" => {
                let slot = if name == "data" {
                    &mut data
                } else {
                    &mut data_base64
                };
                if slot.replace(raw).is_some() {
                    return Err(with_context(CeError::bad_request(format!(
                        "member {name:?} is given twice: send it once"
                    ))));
                }
            }
            _ => {
                let value = attribute_value(&name, raw).map_err(with_context)?;
                if let Some(value) = value {
                    event.set(&name, value).map_err(with_context)?;
                }
            }
        }
    }
    match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(with_context(CeError::bad_request(
                "both \"data\" and \"data_base64\" are present: send one of them",
            )))
        }
        (Some(raw), None) if raw.get() != "null" => {
            let declared_json = event.content_type().is_none_or(is_json_media_type);
            event.data = Some(if !declared_json && raw.get().starts_with('"') {
                // Non-JSON data (text/plain, ...) travels as a JSON string: its content is the data.
                let text: Cow<'_, str> = serde_json::from_str(raw.get())
                    .map_err(|err| with_context(json_error("member \"data\"", &err)))?;
                match text {
                    Cow::Borrowed(text) => sub_bytes(body, text),
                    Cow::Owned(text) => Bytes::from(text),
                }
            } else {
                sub_bytes(body, raw.get())
            });
            // The JSON format: data without datacontenttype is processed as application/json.
            event.default_content_type("application/json");
        }
        (None, Some(raw)) if raw.get() != "null" => {
            let encoded: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(|_| {
                with_context(CeError::bad_request(
                    "member \"data_base64\" must be a string of base64",
                ))
            })?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|err| {
                    with_context(CeError::bad_request(format!(
                        "member \"data_base64\" is not valid base64 ({err}): use the standard \
                         alphabet with padding (RFC 4648 §4)"
                    )))
                })?;
            event.data = Some(Bytes::from(decoded));
        }
        _ => {}
    }
    event.build().map_err(with_context)
}

/// An attribute's JSON value as an [`AttrValue`]; None for `null` (the JSON format treats it
/// as absent).
fn attribute_value(name: &str, raw: &RawValue) -> Result<Option<AttrValue>, CeError> {
    let value: Value = serde_json::from_str(raw.get())
        .map_err(|err| json_error(&format!("attribute {name:?}"), &err))?;
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::String(s) => AttrValue::String(s),
        Value::Bool(b) => AttrValue::Boolean(b),
        Value::Number(n) => match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
            Some(i) => AttrValue::Integer(i),
            None => {
                return Err(CeError::bad_request(format!(
                    "attribute {name:?} is {n}: CloudEvents numbers are 32-bit integers; send \
                     other numbers as strings"
                )))
            }
        },
        Value::Array(_) | Value::Object(_) => {
            return Err(CeError::bad_request(format!(
                "attribute {name:?} is a JSON {}: attributes are strings, integers or \
                 booleans; put structured content in \"data\"",
                if value.is_array() { "array" } else { "object" }
            )))
        }
    }))
}

/// `event` as one JSON object (structured mode). Data goes to `data` as JSON when the content
/// type declares JSON (or is absent) and the bytes are valid JSON, to `data` as a string for
/// UTF-8 text types, and to `data_base64` otherwise.
pub(crate) fn encode_structured(event: &CloudEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + event.data.as_ref().map_or(0, Bytes::len));
    out.push(b'{');
    let member = |out: &mut Vec<u8>, name: &str, first: bool| {
        if !first {
            out.push(b',');
        }
        push_json_string(out, name);
        out.push(b':');
    };
    member(&mut out, "specversion", true);
    push_json_string(&mut out, SPEC_VERSION);
    for (name, value) in [
        ("id", Some(&event.id)),
        ("source", Some(&event.source)),
        ("type", Some(&event.ty)),
        ("datacontenttype", event.datacontenttype.as_ref()),
        ("dataschema", event.dataschema.as_ref()),
        ("subject", event.subject.as_ref()),
        ("time", event.time.as_ref()),
    ] {
        if let Some(value) = value {
            member(&mut out, name, false);
            push_json_string(&mut out, value);
        }
    }
    for (name, value) in &event.extensions {
        member(&mut out, name, false);
        match value {
            AttrValue::String(s) => push_json_string(&mut out, s),
            other => out.extend_from_slice(other.to_string().as_bytes()),
        }
    }
    if let Some(data) = &event.data {
        let content_type = event.datacontenttype.as_deref();
        if content_type.is_none_or(is_json_media_type)
            && serde_json::from_slice::<de::IgnoredAny>(data).is_ok()
        {
            member(&mut out, "data", false);
            out.extend_from_slice(data);
        } else if let (Some(text), true) = (
            std::str::from_utf8(data).ok(),
            content_type.is_some_and(is_text_media_type),
        ) {
            member(&mut out, "data", false);
            push_json_string(&mut out, text);
        } else {
            member(&mut out, "data_base64", false);
            push_json_string(
                &mut out,
                &base64::engine::general_purpose::STANDARD.encode(data),
            );
        }
    }
    out.push(b'}');
    out
}

/// Text media types whose data the JSON format carries as a string.
fn is_text_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/") || essence.ends_with("/xml") || essence.ends_with("+xml")
}

fn push_json_string(out: &mut Vec<u8>, value: &str) {
    // Writing a str into a Vec cannot fail; the fallback keeps the output valid JSON anyway.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}
