//! The one header policy: which request headers only fastconn sets, and which describe a single
//! HTTP hop. Every source's headers go through it (the core filters every message; Python
//! sources read the same lists through the binding), so a publisher cannot spoof fastconn's
//! own headers — above all `X-Callback-Url`, which would let anyone who can publish a message
//! redirect a function's asynchronous result to themselves.

/// Headers only fastconn sets on a call. A message's own headers of these names are dropped.
pub const RESERVED: &[&str] = &[
    "x-topic",
    "x-connector",
    "x-message-id",
    "x-delivery-attempt",
    "x-callback-url",
    "x-call-id",
    "user-agent",
];

/// Headers about one HTTP hop (RFC 9110 §7.6.1 and framing): never forwarded from a message,
/// whatever its source, because they would break or redirect the request fastconn makes.
pub const HOP_BY_HOP: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authorization",
    "proxy-connection",
];

/// Whether a message may carry a header of this (lower-case) name to a function.
pub fn forwardable(lower_name: &str) -> bool {
    !RESERVED.contains(&lower_name) && !HOP_BY_HOP.contains(&lower_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_and_framing_headers_are_not_forwardable() {
        for name in [
            "x-callback-url",
            "x-call-id",
            "content-length",
            "host",
            "x-topic",
        ] {
            assert!(!forwardable(name), "{name}");
        }
        assert!(forwardable("x-custom"));
        assert!(forwardable("content-type"));
    }

    #[test]
    fn lists_are_lower_case() {
        for name in RESERVED.iter().chain(HOP_BY_HOP) {
            assert_eq!(name.to_ascii_lowercase(), *name);
        }
    }
}
