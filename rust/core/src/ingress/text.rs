//! Small text helpers of the ingress: percent-decoding, query parameters, topic checks, JSON
//! and quoting of error texts, and a constant-time comparison.

/// Percent-decodes `raw` (and `+` as space when `plus_is_space`, as in a query). Invalid
/// escapes are kept as they are. The result may not be UTF-8.
pub fn percent_decode(raw: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| {
                let h = std::str::from_utf8(h).ok()?;
                u8::from_str_radix(h, 16).ok()
            });
            if let Some(decoded) = hex {
                out.push(decoded);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b == b'+' { b' ' } else { b });
        i += 1;
    }
    out
}

/// The first value of query parameter `name` in `query` (decoded), or None.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key, true);
        (key == name.as_bytes())
            .then(|| String::from_utf8_lossy(&percent_decode(value, true)).into_owned())
    })
}

/// `text` quoted as Python's `repr` quotes a string (what the Python sources' messages show).
pub fn quoted(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\x7f' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `{"error": text}` as JSON.
pub fn json_error(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    out.push_str("{\"error\": \"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push_str("\"}");
    out
}

/// Why `topic` (from the URL path, decoded) cannot be published to, or None when it can:
/// control characters, and the wildcards of subscriptions (MQTT's `+`/`#` as a `/` level,
/// NATS's `*`/`>` as a `.` token; inside a longer token they are literals, as in the router).
pub fn topic_problem(topic: &str) -> Option<String> {
    if let Some(c) = topic.chars().find(|c| (*c as u32) < 0x20 || *c == '\x7f') {
        return Some(format!(
            "topic {} contains the control character U+{:04X}: use printable characters only",
            quoted(topic),
            c as u32
        ));
    }
    let wildcard = topic
        .split('/')
        .find(|t| matches!(*t, "+" | "#"))
        .or_else(|| topic.split('.').find(|t| matches!(*t, "*" | ">")));
    wildcard.map(|w| {
        format!(
            "topic {} contains the wildcard {}: wildcards are for subscriptions; publish to a concrete topic",
            quoted(topic),
            quoted(w)
        )
    })
}

/// Whether `a` equals `b`, in time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_invalid_escapes_and_decodes_plus_in_queries_only() {
        assert_eq!(percent_decode("a%2Fb%zz%4", false), b"a/b%zz%4");
        assert_eq!(percent_decode("a+b%20c", true), b"a b c");
        assert_eq!(percent_decode("a+b", false), b"a+b");
        assert_eq!(percent_decode("%FF", false), vec![0xff]);
    }

    #[test]
    fn query_values_are_found_and_decoded() {
        assert_eq!(
            query_value("wait=true&key=a%2Bb", "key").as_deref(),
            Some("a+b")
        );
        assert_eq!(query_value("wait", "wait").as_deref(), Some(""));
        assert_eq!(query_value("waiting=1", "wait"), None);
        assert_eq!(query_value("", "wait"), None);
    }

    #[test]
    fn topic_problems_name_the_character_or_wildcard() {
        let nul = topic_problem("a\0b").expect("refused");
        assert!(
            nul.contains("U+0000") && nul.contains("control character"),
            "{nul}"
        );
        assert!(topic_problem("a\nb").expect("refused").contains("U+000A"));
        for (topic, named) in [
            ("a.*", "'*'"),
            ("a.>", "'>'"),
            ("a/#", "'#'"),
            ("a/+/b", "'+'"),
        ] {
            let why = topic_problem(topic).expect("refused");
            assert!(why.contains(named) && why.contains("wildcard"), "{why}");
        }
        for fine in ["c++", "a.b*", "orders/eu", "x>y"] {
            assert_eq!(topic_problem(fine), None, "{fine}");
        }
    }

    #[test]
    fn json_errors_escape_quotes_and_control_characters() {
        assert_eq!(
            json_error("topic 'a\"\n\u{1}'"),
            "{\"error\": \"topic 'a\\\"\\n\\u0001'\"}"
        );
    }

    #[test]
    fn quoting_matches_python_repr() {
        assert_eq!(quoted("a\0b"), "'a\\x00b'");
        assert_eq!(quoted("it's"), "\"it's\"");
        assert_eq!(quoted("a\nb"), "'a\\nb'");
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
