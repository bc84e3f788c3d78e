//! Webhook authenticity checks, pure and in constant time: the sender proves it knows a shared
//! secret by an HMAC of the body (GitHub, most providers), an HMAC of a timestamp and the body
//! (Stripe: replay-proof within a tolerance), or by sending the secret itself (GitLab's
//! `X-Gitlab-Token`). The server calls [`SignatureRule::verify`] with the request's headers and
//! the whole body, and answers 401 with the error's message when it fails.
//!
//! | provider | header | scheme | prefix | algorithm |
//! |---|---|---|---|---|
//! | GitHub | `X-Hub-Signature-256` | `hmac` | `sha256=` | `sha256` (hex) |
//! | GitHub (legacy) | `X-Hub-Signature` | `hmac` | `sha1=` | `sha1` (hex) |
//! | Shopify | `X-Shopify-Hmac-Sha256` | `hmac` | (none) | `sha256`, base64 |
//! | Stripe | `Stripe-Signature` | `stripe` | `v1=` | `sha256` of `<t>.<body>` |
//! | GitLab | `X-Gitlab-Token` | `token` | (none) | (none) |

use base64::Engine as _;
use ring::hmac;
use subtle::ConstantTimeEq;

/// The HMAC's hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Sha256,
    /// Legacy (GitHub's `X-Hub-Signature`); only for providers that offer nothing better.
    Sha1,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" => Some(Algorithm::Sha256),
            "sha1" => Some(Algorithm::Sha1),
            _ => None,
        }
    }

    fn ring(self) -> hmac::Algorithm {
        match self {
            Algorithm::Sha256 => hmac::HMAC_SHA256,
            Algorithm::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        }
    }
}

/// How the digest is written in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Hexadecimal, either case (GitHub, Stripe).
    #[default]
    Hex,
    /// Standard base64 with padding (Shopify, Twilio-style).
    Base64,
}

impl Encoding {
    pub fn parse(name: &str) -> Option<Encoding> {
        match name.to_ascii_lowercase().as_str() {
            "hex" => Some(Encoding::Hex),
            "base64" => Some(Encoding::Base64),
            _ => None,
        }
    }
}

/// What the signature header holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// `<prefix><digest>`: HMAC of the body (GitHub `sha256=<hex>`).
    Hmac { prefix: String, encoding: Encoding },
    /// Stripe: `t=<unix seconds>,<prefix><hex>[,<prefix><hex>...]` (prefix `v1=`), HMAC of
    /// `<t>.<body>`; any of the signatures may match (secret rotation), and `t` must be within
    /// `tolerance_secs` of now (replays of an old request are refused).
    Timestamped { prefix: String, tolerance_secs: u64 },
    /// The header's value is the secret itself (GitLab `X-Gitlab-Token`, IFTTT-style tokens).
    Token,
}

/// Why a request's signature was refused; answer 401 with [`SignatureError::message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    Missing {
        header: String,
    },
    Malformed {
        header: String,
        why: String,
    },
    Mismatch {
        header: String,
    },
    Stale {
        header: String,
        age_secs: i64,
        tolerance_secs: u64,
    },
}

impl SignatureError {
    pub fn message(&self) -> String {
        match self {
            SignatureError::Missing { header } => {
                format!("missing {header} header: sign the request with the shared secret")
            }
            SignatureError::Malformed { header, why } => format!("malformed {header}: {why}"),
            SignatureError::Mismatch { header } => format!(
                "wrong {header} signature: it does not match the body and the configured secret"
            ),
            SignatureError::Stale {
                header,
                age_secs,
                tolerance_secs,
            } => format!(
                "{header} timestamp is {age_secs} s from now, more than the tolerance of \
                 {tolerance_secs} s: send fresh requests (and check the sender's clock)"
            ),
        }
    }
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for SignatureError {}

/// A configured check: which header, which scheme, the secret (kept as a ready HMAC key).
#[derive(Clone)]
pub struct SignatureRule {
    header: String,
    scheme: Scheme,
    key: hmac::Key,
    secret: Vec<u8>,
}

impl std::fmt::Debug for SignatureRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("SignatureRule")
            .field("header", &self.header)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl SignatureRule {
    /// A rule checking `header` (any case) by `scheme` with `secret`; `algorithm` is the HMAC's
    /// (Stripe's scheme is defined with SHA-256; `Token` uses none).
    pub fn new(header: &str, scheme: Scheme, algorithm: Algorithm, secret: &[u8]) -> SignatureRule {
        SignatureRule {
            header: header.to_owned(),
            scheme,
            key: hmac::Key::new(algorithm.ring(), secret),
            secret: secret.to_vec(),
        }
    }

    /// A rule from a route's configuration keys as text (`fastconn.signatures.SignatureKeys`):
    /// the one place that turns `scheme` ("hmac", "stripe", "token"), `algorithm` and
    /// `encoding` names into a rule, for every route that checks signatures. The error names
    /// the key that is wrong and the values it takes.
    pub fn configured(
        header: &str,
        scheme: &str,
        secret: &[u8],
        prefix: &str,
        algorithm: &str,
        encoding: &str,
        tolerance_secs: u64,
    ) -> Result<SignatureRule, String> {
        let algorithm = Algorithm::parse(algorithm).ok_or_else(|| {
            format!("signature_algorithm {algorithm:?}: use \"sha256\" or \"sha1\"")
        })?;
        let encoding = Encoding::parse(encoding)
            .ok_or_else(|| format!("signature_encoding {encoding:?}: use \"hex\" or \"base64\""))?;
        let scheme = match scheme {
            "hmac" => Scheme::Hmac {
                prefix: prefix.to_owned(),
                encoding,
            },
            "stripe" => Scheme::Timestamped {
                prefix: prefix.to_owned(),
                tolerance_secs,
            },
            "token" => Scheme::Token,
            _ => {
                return Err(format!(
                    "signature_scheme {scheme:?}: use \"hmac\", \"stripe\" or \"token\""
                ))
            }
        };
        if header.is_empty() || http::header::HeaderName::try_from(header).is_err() {
            return Err(format!(
                "signature_header {header:?} is not a header name, e.g. X-Hub-Signature-256"
            ));
        }
        Ok(SignatureRule::new(header, scheme, algorithm, secret))
    }

    pub fn header(&self) -> &str {
        &self.header
    }

    /// Checks the request. `now_unix` is the current time in seconds (for Stripe's timestamp);
    /// the first header of the configured name counts.
    pub fn verify<K: AsRef<str>, V: AsRef<[u8]>>(
        &self,
        headers: &[(K, V)],
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        let given = headers
            .iter()
            .find(|(name, _)| name.as_ref().eq_ignore_ascii_case(&self.header))
            .map(|(_, value)| value.as_ref());
        self.verify_value(given, body, now_unix)
    }

    /// [`verify`](Self::verify) with the signature header's value already looked up (a hyper
    /// server: `parts.headers.get(rule.header()).map(|v| v.as_bytes())`).
    pub fn verify_value(
        &self,
        given: Option<&[u8]>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        let Some(given) = given.map(<[u8]>::trim_ascii) else {
            return Err(SignatureError::Missing {
                header: self.header.clone(),
            });
        };
        match &self.scheme {
            // ct_eq answers at once for a different length: that leaks the token's length
            // only, never its content.
            Scheme::Token => self.check(bool::from(given.ct_eq(&self.secret))),
            Scheme::Hmac { prefix, encoding } => {
                let digest = strip_prefix(given, prefix).ok_or_else(|| {
                    self.malformed(format!("the value does not start with {prefix:?}"))
                })?;
                let digest = decode(digest, *encoding).map_err(|why| self.malformed(why))?;
                let expected = hmac::sign(&self.key, body);
                self.check(bool::from(expected.as_ref().ct_eq(&digest)))
            }
            Scheme::Timestamped {
                prefix,
                tolerance_secs,
            } => self.verify_timestamped(given, body, prefix, *tolerance_secs, now_unix),
        }
    }

    fn verify_timestamped(
        &self,
        given: &[u8],
        body: &[u8],
        prefix: &str,
        tolerance_secs: u64,
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        let mut timestamp: Option<&[u8]> = None;
        let mut signatures = Vec::new();
        for part in given.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if let Some(t) = part.strip_prefix(b"t=") {
                if timestamp.replace(t).is_some() {
                    return Err(self.malformed("more than one t= timestamp".to_owned()));
                }
            } else if let Some(signature) = strip_prefix(part, prefix) {
                signatures.push(signature);
            }
            // Other schemes (Stripe's v0=, test-mode entries) are not ours to check.
        }
        let timestamp =
            timestamp.ok_or_else(|| self.malformed("no t=<unix seconds> timestamp".to_owned()))?;
        let seconds = std::str::from_utf8(timestamp)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| self.malformed("the t= timestamp is not an integer".to_owned()))?;
        if signatures.is_empty() {
            return Err(self.malformed(format!("no {prefix}<signature> entry")));
        }
        let age = now_unix.saturating_sub(seconds);
        if age.unsigned_abs() > tolerance_secs {
            return Err(SignatureError::Stale {
                header: self.header.clone(),
                age_secs: age,
                tolerance_secs,
            });
        }
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp);
        context.update(b".");
        context.update(body);
        let expected = context.sign();
        // Every entry is compared (no early exit), so timing does not tell which one matched.
        let mut matched = subtle::Choice::from(0);
        for signature in signatures {
            if let Ok(digest) = decode(signature, Encoding::Hex) {
                matched |= expected.as_ref().ct_eq(&digest);
            }
        }
        self.check(bool::from(matched))
    }

    fn check(&self, matched: bool) -> Result<(), SignatureError> {
        if matched {
            Ok(())
        } else {
            Err(SignatureError::Mismatch {
                header: self.header.clone(),
            })
        }
    }

    fn malformed(&self, why: String) -> SignatureError {
        SignatureError::Malformed {
            header: self.header.clone(),
            why,
        }
    }
}

/// The clock [`SignatureRule::verify`] takes for Stripe's timestamps: Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `value` without `prefix`, compared exactly: providers send it exactly as documented.
fn strip_prefix<'a>(value: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    value.strip_prefix(prefix.as_bytes())
}

fn decode(digest: &[u8], encoding: Encoding) -> Result<Vec<u8>, String> {
    match encoding {
        Encoding::Hex => {
            if !digest.len().is_multiple_of(2) {
                return Err("the signature is not hexadecimal (odd length)".to_owned());
            }
            digest
                .chunks_exact(2)
                .map(|pair| {
                    let hi = char::from(pair[0]).to_digit(16);
                    let lo = char::from(pair[1]).to_digit(16);
                    match (hi, lo) {
                        // Both digits are < 16, so the byte fits.
                        (Some(hi), Some(lo)) => Ok(u8::try_from(hi * 16 + lo).unwrap_or_default()),
                        _ => Err("the signature is not hexadecimal".to_owned()),
                    }
                })
                .collect()
        }
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(digest)
            .map_err(|err| format!("the signature is not base64 ({err})")),
    }
}

#[cfg(test)]
mod tests;
