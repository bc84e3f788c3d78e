//! The decoder's RFC 9112 edge cases, and property tests over splits and mutations.

use super::*;

/// Decodes `input` fed in pieces cut at `cuts`, then the end of the stream.
fn decode_split(
    input: &[u8],
    cuts: &[usize],
    capture: bool,
) -> Result<Option<Response>, FramingError> {
    let mut decoder = ResponseDecoder::new(capture);
    let mut buf = BytesMut::new();
    let mut start = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    ends.sort_unstable();
    ends.push(input.len());
    for end in ends {
        buf.extend_from_slice(input.get(start..end).unwrap_or_default());
        start = end;
        if let Progress::Done(response) = decoder.feed(&mut buf)? {
            assert_eq!(start, input.len(), "done before the end of one response");
            return Ok(Some(response));
        }
    }
    Ok(decoder.eof(&mut buf))
}

fn decode(input: &[u8]) -> Result<Option<Response>, FramingError> {
    decode_split(input, &[], true)
}

fn ok(input: &[u8]) -> Response {
    match decode(input) {
        Ok(Some(response)) => response,
        other => panic!(
            "expected a response from {:?}, got {other:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

fn err(input: &[u8]) -> FramingError {
    match decode(input) {
        Err(e) => e,
        other => panic!(
            "expected an error from {:?}, got {other:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

#[test]
fn content_length_body_and_reuse() {
    let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    assert_eq!((r.status, &r.body[..], r.reusable), (200, &b"ok"[..], true));
    let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((r.body.len(), r.reusable), (0, true));
    // Bytes after the response: answered, but the connection is not trusted again.
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naEXTRA"[..]);
    let mut decoder = ResponseDecoder::new(true);
    match decoder.feed(&mut buf) {
        Ok(Progress::Done(r)) => assert_eq!((&r.body[..], r.reusable), (&b"a"[..], false)),
        other => panic!("{other:?}"),
    }
    assert_eq!(&buf[..], b"EXTRA");
}

#[test]
fn identical_repeated_content_lengths_are_one_length() {
    let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!((&r.body[..], r.reusable), (&b"abc"[..], true));
    let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc");
    assert_eq!(&r.body[..], b"abc");
}

#[test]
fn conflicting_content_lengths_are_refused() {
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        FramingError::ConflictingContentLength(3, 4)
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nContent-Length: 3,4\r\n\r\nabcd"),
        FramingError::ConflictingContentLength(3, 4)
    );
}

#[test]
fn content_length_must_be_plain_digits() {
    for bad in [
        "+2",
        "-1",
        "0x10",
        "1 2",
        "",
        "5,",
        ",5",
        "2a",
        "١",
        "18446744073709551616",
        "99999999999999999999999",
    ] {
        let input = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\nxx");
        assert!(
            matches!(err(input.as_bytes()), FramingError::InvalidContentLength(_)),
            "{bad:?} accepted"
        );
    }
    // The largest value fits: the body is simply not complete.
    let max = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nxx", u64::MAX);
    assert_eq!(decode(max.as_bytes()), Ok(None));
    let text = err(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nxx").to_string();
    assert!(text.contains("\"+2\"") && text.contains("digits"), "{text}");
}

#[test]
fn content_length_with_transfer_encoding_is_refused() {
    for input in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ] {
        assert_eq!(err(input), FramingError::LengthAndTransferEncoding);
    }
}

#[test]
fn transfer_encoding_rules() {
    // Final coding not chunked: the body ends with the connection.
    for te in ["gzip", "chunked, gzip"] {
        let input = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\nraw bytes");
        let r = ok(input.as_bytes());
        assert_eq!(
            (&r.body[..], r.reusable),
            (&b"raw bytes"[..], false),
            "{te}"
        );
    }
    let r = ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n");
    assert_eq!((&r.body[..], r.reusable), (&b"z"[..], true));
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        FramingError::ChunkedTwice
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        FramingError::ChunkedTwice
    );
    assert_eq!(
        err(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        FramingError::TransferEncodingInHttp10
    );
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n"),
        FramingError::EmptyTransferEncoding
    );
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let r = ok(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\nA ; a=\"b c\"\r\n0123456789\r\n000\r\nTrailer-A: x\r\nB: \r\n\r\n");
    assert_eq!(
        (r.status, &r.body[..], r.reusable),
        (201, &b"abcde0123456789"[..], true)
    );
}

#[test]
fn invalid_chunk_size_lines_are_refused() {
    for line in [
        "zz",
        "",
        " 5",
        "-5",
        "+5",
        "0x5",
        "5 x",
        "5\0",
        "5;\x01",
        "10000000000000000",
        "5\r\x0b",
    ] {
        let input = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{line}\r\nhello\r\n0\r\n\r\n"
        );
        assert_eq!(
            err(input.as_bytes()),
            FramingError::InvalidChunkSize,
            "{line:?}"
        );
    }
    // A bare LF ends no line in HTTP/1.1 framing.
    assert_eq!(
        err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
        FramingError::InvalidChunkSize
    );
}

#[test]
fn chunk_extension_abuse_is_refused() {
    let mut input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let ext = format!(";{}", "e".repeat(1000));
    for _ in 0..20 {
        input.extend_from_slice(format!("1{ext}\r\nx\r\n").as_bytes());
    }
    input.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(err(&input), FramingError::ChunkExtensionsTooLarge);
    // One line longer than the limit is refused before its end arrives.
    let mut input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    input.extend_from_slice(&[b'e'; MAX_CHUNK_LINE + 8]);
    assert_eq!(err(&input), FramingError::ChunkLineTooLong);
}

#[test]
fn chunk_data_must_end_with_crlf() {
    for input in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\rX0\r\n\r\n",
    ] {
        assert_eq!(err(input), FramingError::MissingChunkCrlf);
    }
}

#[test]
fn invalid_trailers_are_refused() {
    for trailer in ["no colon", ": empty name", "bad name: x", "x: \x01"] {
        let input =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{trailer}\r\n\r\n");
        assert_eq!(
            err(input.as_bytes()),
            FramingError::InvalidTrailer,
            "{trailer:?}"
        );
    }
}

fn with_headers(n: usize) -> Vec<u8> {
    let mut input = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
    for i in 1..n {
        input.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    input.extend_from_slice(b"\r\nok");
    input
}

#[test]
fn header_limit_is_hypers_and_the_error_counts_them() {
    let r = ok(&with_headers(MAX_HEADERS));
    assert_eq!(r.headers.map(|h| h.len()), Some(MAX_HEADERS));
    let input = with_headers(140);
    // Fed in small pieces, the count waits for the whole head.
    let cuts: Vec<usize> = (0..input.len()).step_by(7).collect();
    let e = decode_split(&input, &cuts, false).expect_err("too many headers");
    assert_eq!(e, FramingError::TooManyHeaders(Some(140)));
    assert_eq!(e.to_string(), "response has 140 headers, the limit is 100");
}

#[test]
fn oversized_heads_are_refused() {
    let mut input = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    input.extend_from_slice(&[b'v'; MAX_HEAD]);
    assert_eq!(err(&input), FramingError::HeadTooLarge);
}

#[test]
fn informational_answers_are_skipped_and_101_refused() {
    let r = ok(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nX-Final: 1\r\nContent-Length: 1\r\n\r\nk");
    assert_eq!((r.status, &r.body[..]), (200, &b"k"[..]));
    assert_eq!(
        r.headers,
        Some(vec![
            ("X-Final".to_owned(), "1".to_owned()),
            ("Content-Length".to_owned(), "1".to_owned())
        ])
    );
    assert_eq!(
        err(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
        FramingError::UnrequestedUpgrade
    );
    assert_eq!(
        err(b"HTTP/1.1 099 Odd\r\n\r\n"),
        FramingError::InvalidStatus(99)
    );
    assert!(matches!(
        err(b"NOT HTTP AT ALL\r\n\r\n"),
        FramingError::MalformedHead(_)
    ));
}

#[test]
fn connection_reuse_rules() {
    let cases: [(&[u8], bool); 7] = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: closed\r\nContent-Length: 0\r\n\r\n",
            true,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        (
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            true,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil close", false),
    ];
    for (input, reusable) in cases {
        assert_eq!(
            ok(input).reusable,
            reusable,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn no_content_statuses_ignore_framing_fields() {
    for status in [204, 304] {
        let input = format!("HTTP/1.1 {status} X\r\nContent-Length: 12\r\n\r\n");
        let r = ok(input.as_bytes());
        assert_eq!((r.status, r.body.len(), r.reusable), (status, 0, true));
    }
}

#[test]
fn truncated_responses_are_not_responses() {
    for input in [
        &b"HTTP/1.1 200 OK\r\nContent-Len"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
        b"",
    ] {
        assert_eq!(
            decode(input),
            Ok(None),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn bodies_are_kept_within_their_limits() {
    let body = vec![b'x'; FAILURE_EXCERPT + 10];
    let mut input = format!(
        "HTTP/1.1 500 Oops\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    input.extend_from_slice(&body);
    let r = decode_split(&input, &[], false)
        .ok()
        .flatten()
        .expect("response");
    assert_eq!(
        (r.body.len(), r.headers, r.reusable),
        (FAILURE_EXCERPT, None, true)
    );
    // A 2xx without capture keeps nothing; with capture up to MAX_BODY.
    let mut big = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY + 10
    )
    .into_bytes();
    big.resize(big.len() + MAX_BODY + 10, b'y');
    let r = decode_split(&big, &[], false)
        .ok()
        .flatten()
        .expect("response");
    assert_eq!((r.body.len(), r.reusable), (0, true));
    let r = decode_split(&big, &[100, 5000], true)
        .ok()
        .flatten()
        .expect("response");
    assert_eq!((r.body.len(), r.reusable), (MAX_BODY, true));
}

#[test]
fn retry_after_of_busy_answers() {
    let r = ok(b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy");
    assert_eq!(
        (r.retry_after, &r.body[..]),
        (Some(Duration::from_secs(7)), &b"busy"[..])
    );
    let r = ok(b"HTTP/1.1 200 OK\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.retry_after, None);
}

#[test]
fn the_decoder_goes_on_to_the_next_response() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 No\r\nContent-Length: 1\r\n\r\nb"[..]);
    let mut decoder = ResponseDecoder::new(false);
    let first = decoder.feed(&mut buf);
    assert!(matches!(
        first,
        Ok(Progress::Done(Response {
            status: 200,
            reusable: false,
            ..
        }))
    ));
    match decoder.feed(&mut buf) {
        Ok(Progress::Done(r)) => {
            assert_eq!((r.status, &r.body[..], r.reusable), (404, &b"b"[..], true))
        }
        other => panic!("{other:?}"),
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A valid response and what decoding it must give.
    #[derive(Debug, Clone)]
    struct Case {
        bytes: Vec<u8>,
        capture: bool,
        expected: Response,
    }

    #[derive(Debug, Clone)]
    enum BodyForm {
        Length,
        /// Chunk sizes (cut points into the body), extensions on each chunk, trailers.
        Chunked(Vec<usize>, bool, Vec<(String, String)>),
        UntilClose,
    }

    fn header() -> impl Strategy<Value = (String, String)> {
        ("X-[A-Za-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?")
    }

    fn body_form() -> impl Strategy<Value = BodyForm> {
        prop_oneof![
            Just(BodyForm::Length),
            (
                prop::collection::vec(0usize..400, 0..6),
                any::<bool>(),
                prop::collection::vec(header(), 0..3)
            )
                .prop_map(|(cuts, ext, trailers)| BodyForm::Chunked(cuts, ext, trailers)),
            Just(BodyForm::UntilClose),
        ]
    }

    prop_compose! {
        fn case()(
            http10 in any::<bool>(),
            interim in prop::collection::vec((prop::sample::select(vec![100u16, 102, 103]), prop::collection::vec(header(), 0..2)), 0..3),
            status in prop_oneof![200u16..=299, 300u16..=599, Just(204u16), Just(304u16)],
            mut headers in prop::collection::vec(header(), 0..8),
            connection in prop::sample::select(vec!["", "close", "keep-alive", "Keep-Alive, foo"]),
            body in prop::collection::vec(any::<u8>(), 0..600),
            form in body_form(),
            capture in any::<bool>(),
        ) -> Case {
            let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
            let mut bytes = Vec::new();
            for (code, fields) in &interim {
                bytes.extend_from_slice(format!("HTTP/1.1 {code} Info\r\n").as_bytes());
                for (k, v) in fields {
                    bytes.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                }
                bytes.extend_from_slice(b"\r\n");
            }
            let no_content = status == 204 || status == 304;
            // HTTP/1.0 has no chunked coding.
            let form = match form {
                BodyForm::Chunked(..) if http10 => BodyForm::Length,
                form => form,
            };
            let body = if no_content { Vec::new() } else { body };
            if !connection.is_empty() {
                headers.push(("Connection".to_owned(), connection.to_owned()));
            }
            let mut encoded = Vec::new();
            if !no_content {
                match &form {
                    BodyForm::Length => headers.push(("Content-Length".to_owned(), body.len().to_string())),
                    BodyForm::Chunked(cuts, ext, trailers) => {
                        headers.push(("Transfer-Encoding".to_owned(), "chunked".to_owned()));
                        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
                        cuts.push(body.len());
                        cuts.sort_unstable();
                        let mut start = 0;
                        for end in cuts {
                            let chunk = &body[start..end];
                            start = end;
                            if chunk.is_empty() {
                                continue;
                            }
                            encoded.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
                            if *ext {
                                encoded.extend_from_slice(b" ;name=\"v; x\"");
                            }
                            encoded.extend_from_slice(b"\r\n");
                            encoded.extend_from_slice(chunk);
                            encoded.extend_from_slice(b"\r\n");
                        }
                        encoded.extend_from_slice(b"0\r\n");
                        for (k, v) in trailers {
                            encoded.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                        }
                        encoded.extend_from_slice(b"\r\n");
                    }
                    BodyForm::UntilClose => {}
                }
            }
            if !matches!(form, BodyForm::Chunked(..)) || no_content {
                encoded.clone_from(&body);
            }
            bytes.extend_from_slice(format!("{version} {status} Reason\r\n").as_bytes());
            for (k, v) in &headers {
                bytes.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&encoded);
            let keep = capture || !(200..300).contains(&status);
            let limit = if capture { MAX_BODY } else { FAILURE_EXCERPT };
            let kept = if keep { &body[..body.len().min(limit)] } else { &[][..] };
            let closes = connection == "close";
            let keep_alive = !closes && (!http10 || !connection.is_empty());
            let delimited = no_content || !matches!(form, BodyForm::UntilClose);
            Case {
                bytes,
                capture,
                expected: Response {
                    status,
                    headers: capture.then_some(headers),
                    retry_after: None,
                    body: Bytes::copy_from_slice(kept),
                    reusable: keep_alive && delimited,
                },
            }
        }
    }

    proptest! {
        #[test]
        fn any_split_of_a_valid_response_decodes_the_same(
            case in case(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let whole = decode_split(&case.bytes, &[], case.capture);
            prop_assert_eq!(&whole, &Ok(Some(case.expected.clone())));
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(case.bytes.len() + 1)).collect();
            prop_assert_eq!(decode_split(&case.bytes, &cuts, case.capture), whole);
            // One byte at a time, the worst case for resumption.
            let every: Vec<usize> = (0..case.bytes.len()).collect();
            prop_assert_eq!(decode_split(&case.bytes, &every, case.capture), Ok(Some(case.expected)));
        }

        #[test]
        fn mutated_responses_never_panic(
            case in case(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut bytes = case.bytes;
            for (at, byte, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 => bytes.insert(i, byte),
                    1 if i < bytes.len() => { bytes.remove(i); }
                    _ => if let Some(b) = bytes.get_mut(i) { *b = byte },
                }
            }
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            check_clean(&bytes, &cuts)?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            prefix in prop::sample::select(vec![&b""[..], b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            tail in prop::collection::vec(any::<u8>(), 0..800),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut bytes = prefix.to_vec();
            bytes.extend_from_slice(&tail);
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            check_clean(&bytes, &cuts)?;
        }
    }

    /// Decoding ends in a response, a described error, or "cut short": never a panic, and
    /// never a response that claims more body than was sent.
    fn check_clean(bytes: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
        let mut decoder = ResponseDecoder::new(true);
        let mut buf = BytesMut::new();
        let mut ends = cuts.to_vec();
        ends.sort_unstable();
        ends.push(bytes.len());
        let mut start = 0;
        for end in ends {
            buf.extend_from_slice(bytes.get(start..end).unwrap_or_default());
            start = end;
            loop {
                let before = buf.len();
                match decoder.feed(&mut buf) {
                    Ok(Progress::Done(r)) => {
                        prop_assert!(r.body.len() <= bytes.len());
                        // Pipelined leftovers decode as the next response.
                        if buf.is_empty() || buf.len() == before {
                            break;
                        }
                    }
                    Ok(Progress::NeedMore) => break,
                    Err(e) => {
                        prop_assert!(!e.to_string().is_empty());
                        return Ok(());
                    }
                }
            }
        }
        let _ = decoder.eof(&mut buf);
        Ok(())
    }
}
