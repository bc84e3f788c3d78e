//! Binary content mode (HTTP binding §3.1): attributes in `ce-<name>` headers, `datacontenttype`
//! in `Content-Type`, the data is the body. Header values are percent-encoded (§3.1.3.2).

use bytes::Bytes;

use super::event::{AttrValue, CloudEvent, EventBuilder, Origin};
use super::CeError;

/// Header-name prefix of binary-mode attributes (compared case-insensitively).
pub const PREFIX: &str = "ce-";

/// Whether a header of this name carries an attribute.
pub(crate) fn is_ce_header(name: &str) -> bool {
    name.len() > PREFIX.len()
        && name.as_bytes()[..PREFIX.len()].eq_ignore_ascii_case(PREFIX.as_bytes())
}

/// Whether the headers hold every required attribute of a binary-mode event.
pub(crate) fn has_required_headers<K: AsRef<str>, V>(headers: &[(K, V)]) -> bool {
    ["ce-id", "ce-source", "ce-specversion", "ce-type"]
        .iter()
        .all(|want| {
            headers
                .iter()
                .any(|(name, _)| name.as_ref().eq_ignore_ascii_case(want))
        })
}

/// Percent-encodes an attribute value for a header: space, `"`, `%` and everything outside
/// printable ASCII become `%XX` (upper-case hex) of the UTF-8 bytes.
pub fn encode_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value.as_bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes a header value: unquotes an RFC 7230 quoted-string, then percent-decodes once; the
/// result must be UTF-8 (so overlong forms like `%C0%A0` are refused).
pub fn decode_value(value: &[u8]) -> Result<String, String> {
    let unquoted;
    let value = if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
        unquoted = unquote(&value[1..value.len() - 1])?;
        &unquoted[..]
    } else {
        value
    };
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let byte = value[i];
        if byte == b'%' {
            let pair = value.get(i + 1..i + 3);
            let decoded = pair.and_then(|p| Some(hex_digit(p[0])? << 4 | hex_digit(p[1])?));
            let Some(decoded) = decoded else {
                return Err(format!(
                    "has a '%' at byte {i} not followed by two hex digits: percent-encode '%' as %25"
                ));
            };
            out.push(decoded);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        "is not UTF-8 after percent-decoding: encode the value's UTF-8 bytes".to_owned()
    })
}

fn unquote(inner: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some(&escaped) => out.push(escaped),
                None => return Err("ends its quoted-string with a lone '\\'".to_owned()),
            },
            b'"' => return Err("has an unescaped '\"' inside its quoted-string".to_owned()),
            _ => out.push(byte),
        }
    }
    Ok(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The event of a binary-mode message. `content_type` is the message's `Content-Type`.
pub(crate) fn decode<K: AsRef<str>, V: AsRef<[u8]>>(
    content_type: Option<&[u8]>,
    headers: &[(K, V)],
    body: Bytes,
) -> Result<CloudEvent, CeError> {
    let mut event = EventBuilder::new(Origin::Header);
    for (name, value) in headers {
        let name = name.as_ref();
        if !is_ce_header(name) {
            continue;
        }
        let attribute = name[PREFIX.len()..].to_ascii_lowercase();
        if attribute == "datacontenttype" {
            // The binding maps datacontenttype to Content-Type; a ce- header for it is not part
            // of the binding, so it cannot contradict the real one.
            return Err(CeError::bad_request(
                "header ce-datacontenttype is not part of binary mode: send the data's media \
                 type in Content-Type",
            ));
        }
        let decoded = decode_value(value.as_ref())
            .map_err(|why| CeError::bad_request(format!("header {name} {why}")))?;
        event.set(&attribute, AttrValue::String(decoded))?;
    }
    if let Some(content_type) = content_type {
        let content_type = std::str::from_utf8(content_type).map_err(|_| {
            CeError::bad_request("Content-Type is not UTF-8: send an ASCII media type")
        })?;
        event.set(
            "datacontenttype",
            AttrValue::String(content_type.to_owned()),
        )?;
    }
    // An empty body is an event without data (§3.1.1).
    if !body.is_empty() {
        event.data = Some(body);
    }
    event.build()
}

/// The headers (names lower case) and body of `event` in binary mode. `traceparent` and
/// `tracestate` extensions are also sent as the W3C headers of the same name (see
/// [`trace_headers`]), so tracing middleware in the function continues the event's trace.
pub(crate) fn encode(event: &CloudEvent) -> (Vec<(String, String)>, Bytes) {
    let mut headers = Vec::with_capacity(6 + event.extensions.len());
    headers.push(("ce-specversion".to_owned(), super::SPEC_VERSION.to_owned()));
    headers.push(("ce-id".to_owned(), encode_value(&event.id)));
    headers.push(("ce-source".to_owned(), encode_value(&event.source)));
    headers.push(("ce-type".to_owned(), encode_value(&event.ty)));
    for (name, value) in [
        ("ce-dataschema", &event.dataschema),
        ("ce-subject", &event.subject),
        ("ce-time", &event.time),
    ] {
        if let Some(value) = value {
            headers.push((name.to_owned(), encode_value(value)));
        }
    }
    headers.extend(trace_headers(event));
    for (name, value) in &event.extensions {
        headers.push((format!("{PREFIX}{name}"), encode_value(&value.to_string())));
    }
    if let Some(content_type) = &event.datacontenttype {
        // A plain HTTP header, not percent-encoded (the value has no control characters).
        headers.push(("content-type".to_owned(), content_type.clone()));
    }
    (headers, event.data.clone().unwrap_or_default())
}

/// The event's `traceparent`/`tracestate` extensions as the W3C Trace Context headers of the
/// same name, for tracing middleware that knows nothing of CloudEvents (any content mode).
pub(crate) fn trace_headers(event: &CloudEvent) -> impl Iterator<Item = (String, String)> + '_ {
    event
        .extensions
        .iter()
        .filter(|(name, _)| name == "traceparent" || name == "tracestate")
        .map(|(name, value)| (name.clone(), encode_value(&value.to_string())))
}
