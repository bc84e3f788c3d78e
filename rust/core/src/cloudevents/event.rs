//! The event itself and the attribute rules of the CloudEvents 1.0 spec (`spec.md`): required
//! attributes, attribute names, the string and timestamp types. Every decoder builds events
//! through [`EventBuilder`], so the rules live here once.

use bytes::Bytes;
use std::fmt;

use super::CeError;

/// The only `specversion` accepted and produced.
pub const SPEC_VERSION: &str = "1.0";

/// One CloudEvents 1.0 event, validated: required attributes present and non-empty, names and
/// values as the spec allows. `specversion` is always [`SPEC_VERSION`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    pub id: String,
    pub source: String,
    /// The `type` attribute.
    pub ty: String,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    pub subject: Option<String>,
    /// RFC 3339 timestamp, as sent.
    pub time: Option<String>,
    /// Extension attributes in the order received (`traceparent`, `tracestate`, `partitionkey`, ...).
    pub extensions: Vec<(String, AttrValue)>,
    /// The event's data as it travels in binary mode: the body bytes. For a structured event
    /// whose `data` member is JSON, the JSON text as sent; for `data_base64`, the decoded bytes.
    pub data: Option<Bytes>,
}

impl CloudEvent {
    /// The value of extension `name`, if the event has it.
    pub fn extension(&self, name: &str) -> Option<&AttrValue> {
        self.extensions
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value)
    }
}

/// An extension attribute's value. Binary mode carries every value as a string; the JSON
/// format also has integers and booleans, kept as such so a structured relay does not change
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    String(String),
    /// The spec's Integer: a 32-bit signed value.
    Integer(i32),
    Boolean(bool),
}

impl fmt::Display for AttrValue {
    /// The canonical string form (binary mode headers).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::String(s) => f.write_str(s),
            AttrValue::Integer(i) => write!(f, "{i}"),
            AttrValue::Boolean(b) => write!(f, "{b}"),
        }
    }
}

/// Why an attribute name is not allowed, or None: lower-case `a`-`z` and `0`-`9` only, not
/// empty, not `data` (reserved by the JSON format). The spec only recommends (SHOULD) names of
/// at most 20 characters, so longer ones are accepted.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an attribute name is empty: names are 1+ of a-z and 0-9".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
    {
        return Some(format!(
            "attribute name {name:?} contains {bad:?}: CloudEvents attribute names use only \
             lower-case a-z and 0-9 (no '-', '_' or upper case)"
        ));
    }
    if name == "data" || name == "data_base64" {
        return Some(format!(
            "attribute name {name:?} is reserved for the event's data"
        ));
    }
    None
}

/// Why a string value is not a CloudEvents String, or None. Control characters (U+0000-U+001F,
/// U+007F-U+009F) are not allowed; they would also be a header-injection risk downstream.
fn string_problem(name: &str, value: &str) -> Option<String> {
    value.chars().find(|c| c.is_control()).map(|c| {
        format!(
            "attribute {name} contains the control character U+{:04X}: CloudEvents strings \
                 must be printable (percent-encode it in a ce- header, escape it in JSON only \
                 if it is really part of the value)",
            u32::from(c)
        )
    })
}

/// Whether `value` is an RFC 3339 `date-time` (`2026-12-03T10:43:30.5Z`, `...+01:00`).
pub fn is_rfc3339(value: &str) -> bool {
    let b = value.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    };
    let sep = |i: usize, want: &[u8]| b.get(i).is_some_and(|c| want.contains(c));
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    let (Some(hour), Some(minute), Some(second)) = (digits(11..13), digits(14..16), digits(17..19))
    else {
        return false;
    };
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return false;
    }
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > month_days || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            let (Some(oh), Some(om)) = (digits(i + 1..i + 3), digits(i + 4..i + 6)) else {
                return false;
            };
            sep(i + 3, b":") && oh <= 23 && om <= 59 && i + 6 == b.len()
        }
        _ => false,
    }
}

/// Whether `value` starts with a URI scheme (`https:`, `urn:`): an absolute URI, as
/// `dataschema` must be.
fn has_scheme(value: &str) -> bool {
    let mut chars = value.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && value.split_once(':').is_some_and(|(scheme, _)| {
            scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
}

/// Collects attributes from any mode, then checks the whole event once.
#[derive(Default)]
pub(crate) struct EventBuilder {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    ty: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    extensions: Vec<(String, AttrValue)>,
    pub(crate) data: Option<Bytes>,
    /// Where the attributes came from, for messages ("ce-id header", "member \"id\"").
    pub(crate) origin: Origin,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    #[default]
    Header,
    Json,
}

impl EventBuilder {
    pub(crate) fn new(origin: Origin) -> EventBuilder {
        EventBuilder {
            origin,
            ..EventBuilder::default()
        }
    }

    fn label(&self, name: &str) -> String {
        match self.origin {
            Origin::Header => format!("header ce-{name}"),
            Origin::Json => format!("attribute {name:?}"),
        }
    }

    /// Sets attribute `name` (already lower case). Duplicates are refused: two different
    /// values for one attribute cannot both be the event's.
    pub(crate) fn set(&mut self, name: &str, value: AttrValue) -> Result<(), CeError> {
        if let Some(problem) = name_problem(name) {
            return Err(CeError::bad_request(problem));
        }
        if let AttrValue::String(s) = &value {
            if let Some(problem) = string_problem(name, s) {
                return Err(CeError::bad_request(problem));
            }
        }
        let label = self.label(name);
        let slot = match name {
            "specversion" => &mut self.specversion,
            "id" => &mut self.id,
            "source" => &mut self.source,
            "type" => &mut self.ty,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            _ => {
                if self.extensions.iter().any(|(key, _)| key == name) {
                    return Err(CeError::bad_request(format!(
                        "{label} is given twice: send each attribute once"
                    )));
                }
                self.extensions.push((name.to_owned(), value));
                return Ok(());
            }
        };
        let AttrValue::String(text) = value else {
            return Err(CeError::bad_request(format!(
                "{label} must be a string, not {value}"
            )));
        };
        if slot.is_some() {
            return Err(CeError::bad_request(format!(
                "{label} is given twice: send each attribute once"
            )));
        }
        *slot = Some(text);
        Ok(())
    }

    /// Sets `datacontenttype` unless the event already has one (the JSON format's default).
    pub(crate) fn default_content_type(&mut self, value: &str) {
        self.datacontenttype.get_or_insert_with(|| value.to_owned());
    }

    pub(crate) fn content_type(&self) -> Option<&str> {
        self.datacontenttype.as_deref()
    }

    /// The event, or a 400 naming the first missing or invalid attribute and the fix.
    pub(crate) fn build(self) -> Result<CloudEvent, CeError> {
        let mut missing: Vec<&str> = Vec::new();
        for (name, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("specversion", &self.specversion),
            ("type", &self.ty),
        ] {
            if value.as_deref().is_none_or(str::is_empty) {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().map(|n| self.label(n)).collect();
            return Err(CeError::bad_request(format!(
                "not a valid CloudEvent: missing or empty {}: every CloudEvent needs non-empty \
                 id, source, specversion (\"1.0\") and type",
                shown.join(", ")
            )));
        }
        let specversion = self.specversion.as_deref().unwrap_or_default();
        if specversion != SPEC_VERSION {
            return Err(CeError::bad_request(format!(
                "{} is {specversion:?}: only CloudEvents 1.0 is supported, send specversion \"1.0\"",
                self.label("specversion")
            )));
        }
        if let Some(time) = &self.time {
            if !is_rfc3339(time) {
                return Err(CeError::bad_request(format!(
                    "{} {time:?} is not an RFC 3339 timestamp: use e.g. 2026-12-03T10:43:30Z",
                    self.label("time")
                )));
            }
        }
        if let Some(schema) = &self.dataschema {
            if !has_scheme(schema) {
                return Err(CeError::bad_request(format!(
                    "{} {schema:?} is not an absolute URI: give a scheme, e.g. https://...",
                    self.label("dataschema")
                )));
            }
        }
        if self.datacontenttype.as_deref() == Some("") {
            return Err(CeError::bad_request(format!(
                "{} is empty: leave it out or give a media type",
                self.label("datacontenttype")
            )));
        }
        Ok(CloudEvent {
            id: self.id.unwrap_or_default(),
            source: self.source.unwrap_or_default(),
            ty: self.ty.unwrap_or_default(),
            datacontenttype: self.datacontenttype,
            dataschema: self.dataschema,
            subject: self.subject,
            time: self.time,
            extensions: self.extensions,
            data: self.data,
        })
    }
}

/// Whether a media type declares JSON: `application/json`, `*/json`, `*/*+json` (parameters
/// ignored). The JSON format puts such data in `data` as a JSON value.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.ends_with("/json") || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_accepts_the_forms_of_the_rfc() {
        for ok in [
            "2026-12-03T10:43:30Z",
            "2026-12-03t10:43:30z",
            "2026-12-03T10:43:30.123456789Z",
            "2026-12-03T10:43:30+01:00",
            "2026-12-03T10:43:30-23:59",
            "2024-02-29T00:00:00Z",
            "2016-12-31T23:59:60Z",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "",
            "2026-12-03",
            "2026-12-03 10:43:30Z",
            "2026-12-03T10:43:30",
            "2026-13-03T10:43:30Z",
            "2023-02-29T00:00:00Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T10:43:30.Z",
            "2026-12-03T10:43:30+0100",
            "2026-12-03T10:43:30Z ",
            "２026-12-03T10:43:30Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn names_are_lower_case_alphanumerics() {
        assert!(name_problem("traceparent").is_none());
        assert!(name_problem("abc123").is_none());
        for bad in ["", "Trace", "trace-parent", "trace_parent", "data", "é"] {
            assert!(name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn json_media_types() {
        for json in [
            "application/json",
            "application/JSON; charset=utf-8",
            "text/json",
            "application/vnd.github+json",
        ] {
            assert!(is_json_media_type(json), "{json}");
        }
        for other in [
            "text/plain",
            "application/octet-stream",
            "application/jsonx",
            "",
        ] {
            assert!(!is_json_media_type(other), "{other}");
        }
    }
}
