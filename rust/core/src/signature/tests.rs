//! Known vectors (GitHub's documented example; the others computed with Python's `hmac`, an
//! independent implementation) and the ways a forged or replayed request must fail.

use super::*;
use proptest::prelude::*;

const GITHUB_SECRET: &[u8] = b"It's a Secret to Everybody";
const GITHUB_BODY: &[u8] = b"Hello, World!";
const GITHUB_SIGNATURE: &str =
    "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

const STRIPE_SECRET: &[u8] = b"whsec_test";
const STRIPE_BODY: &[u8] = br#"{"id":"evt_1"}"#;
const STRIPE_T: i64 = 1_700_000_000;
const STRIPE_V1: &str = "c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925";

fn github() -> SignatureRule {
    SignatureRule::new(
        "X-Hub-Signature-256",
        Scheme::Hmac {
            prefix: "sha256=".to_owned(),
            encoding: Encoding::Hex,
        },
        Algorithm::Sha256,
        GITHUB_SECRET,
    )
}

fn stripe() -> SignatureRule {
    SignatureRule::new(
        "Stripe-Signature",
        Scheme::Timestamped {
            prefix: "v1=".to_owned(),
            tolerance_secs: 300,
        },
        Algorithm::Sha256,
        STRIPE_SECRET,
    )
}

fn one(name: &str, value: &str) -> Vec<(String, String)> {
    vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        (name.to_owned(), value.to_owned()),
    ]
}

#[test]
fn github_documented_example_verifies() {
    let rule = github();
    assert_eq!(
        rule.verify(
            &one("x-hub-signature-256", GITHUB_SIGNATURE),
            GITHUB_BODY,
            0
        ),
        Ok(())
    );
    // Upper-case hex is the same digest; the prefix is compared exactly.
    let upper_hex = format!(
        "sha256={}",
        GITHUB_SIGNATURE["sha256=".len()..].to_ascii_uppercase()
    );
    assert_eq!(
        rule.verify(&one("X-Hub-Signature-256", &upper_hex), GITHUB_BODY, 0),
        Ok(())
    );
    let upper = GITHUB_SIGNATURE.to_ascii_uppercase();
    assert!(matches!(
        rule.verify(&one("X-Hub-Signature-256", &upper), GITHUB_BODY, 0),
        Err(SignatureError::Malformed { .. })
    ));
}

#[test]
fn github_refuses_other_body_secret_or_missing_header() {
    let rule = github();
    let headers = one("X-Hub-Signature-256", GITHUB_SIGNATURE);
    assert!(matches!(
        rule.verify(&headers, b"Hello, World?", 0),
        Err(SignatureError::Mismatch { .. })
    ));
    let other = SignatureRule::new(
        "X-Hub-Signature-256",
        Scheme::Hmac {
            prefix: "sha256=".to_owned(),
            encoding: Encoding::Hex,
        },
        Algorithm::Sha256,
        b"another secret",
    );
    assert!(matches!(
        other.verify(&headers, GITHUB_BODY, 0),
        Err(SignatureError::Mismatch { .. })
    ));
    let missing = rule.verify(&one("X-Other", GITHUB_SIGNATURE), GITHUB_BODY, 0);
    assert!(matches!(missing, Err(SignatureError::Missing { .. })));
    assert!(missing
        .expect_err("missing")
        .message()
        .contains("X-Hub-Signature-256"));
}

#[test]
fn github_refuses_wrong_prefix_truncated_and_non_hex_digests() {
    let rule = github();
    let hex = &GITHUB_SIGNATURE["sha256=".len()..];
    for (value, malformed) in [
        (format!("sha1={hex}"), true),
        (hex.to_owned(), true),
        (format!("sha256={}", &hex[..63]), true),
        (format!("sha256={}", &hex[..62]), false),
        (format!("sha256={}zz", &hex[..62]), true),
        ("sha256=".to_owned(), false),
    ] {
        let result = rule.verify(&one("X-Hub-Signature-256", &value), GITHUB_BODY, 0);
        if malformed {
            assert!(
                matches!(result, Err(SignatureError::Malformed { .. })),
                "{value}: {result:?}"
            );
        } else {
            assert!(
                matches!(result, Err(SignatureError::Mismatch { .. })),
                "{value}: {result:?}"
            );
        }
    }
}

#[test]
fn sha1_and_base64_variants() {
    let sha1 = SignatureRule::new(
        "X-Hub-Signature",
        Scheme::Hmac {
            prefix: "sha1=".to_owned(),
            encoding: Encoding::Hex,
        },
        Algorithm::Sha1,
        b"topsecret",
    );
    let headers = one(
        "X-Hub-Signature",
        "sha1=c230efd27602aeb7a6a62f4e64ab9a2b514d35a2",
    );
    assert_eq!(sha1.verify(&headers, b"payload", 0), Ok(()));
    assert!(sha1.verify(&headers, b"payloaD", 0).is_err());

    let shopify = SignatureRule::new(
        "X-Shopify-Hmac-Sha256",
        Scheme::Hmac {
            prefix: String::new(),
            encoding: Encoding::Base64,
        },
        Algorithm::Sha256,
        b"shpss",
    );
    let headers = one(
        "X-Shopify-Hmac-Sha256",
        "izHHT/+BTdk+hYqCeTleJqTG0no7sCTO4rIZEi9fnxs=",
    );
    assert_eq!(shopify.verify(&headers, br#"{"a":1}"#, 0), Ok(()));
    assert!(shopify.verify(&headers, br#"{"a":2}"#, 0).is_err());
}

#[test]
fn stripe_verifies_within_tolerance_and_with_rotated_secrets() {
    let rule = stripe();
    let value = format!("t={STRIPE_T},v1={STRIPE_V1},v0=deadbeef");
    let headers = one("Stripe-Signature", &value);
    assert_eq!(rule.verify(&headers, STRIPE_BODY, STRIPE_T + 10), Ok(()));
    assert_eq!(rule.verify(&headers, STRIPE_BODY, STRIPE_T - 300), Ok(()));
    // During a secret rotation Stripe sends one v1 per secret: any match is enough.
    let rotated = format!("t={STRIPE_T},v1={},v1={STRIPE_V1}", "00".repeat(32));
    assert_eq!(
        rule.verify(&one("stripe-signature", &rotated), STRIPE_BODY, STRIPE_T),
        Ok(())
    );
}

#[test]
fn stripe_refuses_replays_tampering_and_malformed_headers() {
    let rule = stripe();
    let value = format!("t={STRIPE_T},v1={STRIPE_V1}");
    let headers = one("Stripe-Signature", &value);
    // A replay 301 s later, or a timestamp far in the future.
    for now in [STRIPE_T + 301, STRIPE_T - 301] {
        let result = rule.verify(&headers, STRIPE_BODY, now);
        assert!(
            matches!(result, Err(SignatureError::Stale { .. })),
            "{result:?}"
        );
    }
    // The timestamp is signed: moving it forward breaks the signature.
    let moved = format!("t={},v1={STRIPE_V1}", STRIPE_T + 1);
    assert!(matches!(
        rule.verify(&one("Stripe-Signature", &moved), STRIPE_BODY, STRIPE_T),
        Err(SignatureError::Mismatch { .. })
    ));
    assert!(matches!(
        rule.verify(&headers, br#"{"id":"evt_2"}"#, STRIPE_T),
        Err(SignatureError::Mismatch { .. })
    ));
    for bad in [
        format!("v1={STRIPE_V1}"),
        format!("t=soon,v1={STRIPE_V1}"),
        format!("t={STRIPE_T}"),
        format!("t={STRIPE_T},t={STRIPE_T},v1={STRIPE_V1}"),
    ] {
        let result = rule.verify(&one("Stripe-Signature", &bad), STRIPE_BODY, STRIPE_T);
        assert!(
            matches!(result, Err(SignatureError::Malformed { .. })),
            "{bad}: {result:?}"
        );
    }
}

#[test]
fn gitlab_token_is_compared_whole() {
    let rule = SignatureRule::new(
        "X-Gitlab-Token",
        Scheme::Token,
        Algorithm::Sha256,
        b"s3cr3t",
    );
    assert_eq!(
        rule.verify(&one("X-Gitlab-Token", "s3cr3t"), b"{}", 0),
        Ok(())
    );
    for wrong in ["s3cr3", "s3cr3tt", "S3CR3T", ""] {
        assert!(
            matches!(
                rule.verify(&one("X-Gitlab-Token", wrong), b"{}", 0),
                Err(SignatureError::Mismatch { .. })
            ),
            "{wrong}"
        );
    }
}

#[test]
fn a_looked_up_header_value_verifies_the_same() {
    let rule = github();
    assert_eq!(
        rule.verify_value(Some(GITHUB_SIGNATURE.as_bytes()), GITHUB_BODY, 0),
        Ok(())
    );
    assert!(matches!(
        rule.verify_value(None, GITHUB_BODY, 0),
        Err(SignatureError::Missing { .. })
    ));
}

#[test]
fn debug_output_never_shows_the_secret() {
    let shown = format!("{:?}", github());
    assert!(!shown.contains("Secret to Everybody"), "{shown}");
}

proptest! {
    /// A signature made for one body never verifies another, and arbitrary header bytes never
    /// panic the parser.
    #[test]
    fn only_the_signed_body_verifies(body in proptest::collection::vec(any::<u8>(), 0..256),
                                     other in proptest::collection::vec(any::<u8>(), 0..256),
                                     garbage in proptest::collection::vec(any::<u8>(), 0..128)) {
        let rule = github();
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, GITHUB_SECRET), &body);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let headers = vec![("X-Hub-Signature-256".to_owned(), format!("sha256={hex}").into_bytes())];
        prop_assert_eq!(rule.verify(&headers, &body, 0), Ok(()));
        if other != body {
            prop_assert!(rule.verify(&headers, &other, 0).is_err());
        }
        let junk = vec![("X-Hub-Signature-256".to_owned(), garbage.clone())];
        let _ = rule.verify(&junk, &body, 0);
        let _ = stripe().verify(&[("Stripe-Signature".to_owned(), garbage)], &body, 0);
    }
}
