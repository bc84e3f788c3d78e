//! HTTP/1.1 response framing without I/O: bytes in, a decoded response out.
//!
//! [`ResponseDecoder`] parses the response head (skipping 1xx answers), decides how the body
//! is delimited (RFC 9112 §6.3), decodes it, and says whether the connection may carry another
//! request. It never reads or writes a socket, so every split of the input can be tested, and
//! it never panics: lengths are checked, never trusted, and indexing goes through `get`.
//!
//! Anything that breaks HTTP/1.1 framing is a [`FramingError`]: the caller reports it as a
//! final protocol error and closes the connection, because bytes after a framing error could
//! belong to any response (the request-smuggling family of bugs).

use crate::retry::parse_retry_after;
use bytes::{Buf, Bytes, BytesMut};
use std::fmt;
use std::mem::MaybeUninit;
use std::time::{Duration, SystemTime};

/// How much of a failed call's body is kept for logs and dead-letter context.
pub(crate) const FAILURE_EXCERPT: usize = 1024;
/// Response bodies beyond this are read (so the connection stays usable) but not kept.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;
/// Response heads larger than this are refused.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Header fields per response head: hyper's default limit.
pub(crate) const MAX_HEADERS: usize = 100;
/// A chunk-size line (size and extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Chunk extensions summed over one body: a peer sending tiny chunks with large extensions
/// would otherwise make us parse far more than the body it delivers (hyper's limit).
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// Trailer section of a chunked body.
const MAX_TRAILERS: usize = MAX_HEAD;

/// One complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    /// Every header field, when the decoder was asked to capture them.
    pub headers: Option<Vec<(String, String)>>,
    /// `Retry-After` of a 429 or 503.
    pub retry_after: Option<Duration>,
    /// The body, when kept (captured, or an excerpt of a non-2xx answer); empty otherwise.
    pub body: Bytes,
    /// The connection may carry another request: the server did not ask to close it, the body
    /// did not end with the connection, and nothing followed the response.
    pub reusable: bool,
}

/// What one [`ResponseDecoder::feed`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Every byte given was consumed; the response needs more.
    NeedMore,
    Done(Response),
}

/// Why a response breaks HTTP/1.1. The text is what the caller reports to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FramingError {
    MalformedHead(httparse::Error),
    /// Counted once the whole head arrived (`None` if it never fits in [`MAX_HEAD`]).
    TooManyHeaders(Option<usize>),
    HeadTooLarge,
    InvalidStatus(u16),
    /// 101 answers a request to switch protocols, which fastconn never makes.
    UnrequestedUpgrade,
    InvalidContentLength(String),
    ConflictingContentLength(u64, u64),
    LengthAndTransferEncoding,
    TransferEncodingInHttp10,
    EmptyTransferEncoding,
    ChunkedTwice,
    InvalidChunkSize,
    ChunkLineTooLong,
    ChunkExtensionsTooLarge,
    MissingChunkCrlf,
    InvalidTrailer,
    TrailersTooLarge,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::MalformedHead(e) => write!(f, "malformed response head: {e}"),
            FramingError::TooManyHeaders(Some(n)) => {
                write!(f, "response has {n} headers, the limit is {MAX_HEADERS}")
            }
            FramingError::TooManyHeaders(None) => write!(
                f,
                "response has more than {MAX_HEADERS} headers, the limit is {MAX_HEADERS}"
            ),
            FramingError::HeadTooLarge => {
                write!(f, "response head is larger than {MAX_HEAD} bytes")
            }
            FramingError::InvalidStatus(code) => {
                write!(f, "response status {code} is not an HTTP status (100-999)")
            }
            FramingError::UnrequestedUpgrade => {
                write!(f, "response is 101 Switching Protocols, but no upgrade was asked for")
            }
            FramingError::InvalidContentLength(value) => write!(
                f,
                "invalid Content-Length {value:?}: expected decimal digits only (RFC 9112 §6.3)"
            ),
            FramingError::ConflictingContentLength(a, b) => write!(
                f,
                "conflicting Content-Length values {a} and {b} (RFC 9112 §6.3)"
            ),
            FramingError::LengthAndTransferEncoding => write!(
                f,
                "response has both Content-Length and Transfer-Encoding (RFC 9112 §6.3)"
            ),
            FramingError::TransferEncodingInHttp10 => write!(
                f,
                "HTTP/1.0 response has Transfer-Encoding, which HTTP/1.0 does not define (RFC 9112 §6.1)"
            ),
            FramingError::EmptyTransferEncoding => {
                write!(f, "response has an empty Transfer-Encoding")
            }
            FramingError::ChunkedTwice => {
                write!(f, "Transfer-Encoding applies chunked more than once (RFC 9112 §6.1)")
            }
            FramingError::InvalidChunkSize => write!(
                f,
                "invalid chunk-size line: expected hex digits, optional extensions, CRLF (RFC 9112 §7.1)"
            ),
            FramingError::ChunkLineTooLong => {
                write!(f, "chunk-size line is longer than {MAX_CHUNK_LINE} bytes")
            }
            FramingError::ChunkExtensionsTooLarge => write!(
                f,
                "chunk extensions exceed {MAX_CHUNK_EXTENSIONS} bytes in one response"
            ),
            FramingError::MissingChunkCrlf => write!(f, "chunk data is not followed by CRLF"),
            FramingError::InvalidTrailer => {
                write!(f, "invalid trailer field line in a chunked body")
            }
            FramingError::TrailersTooLarge => {
                write!(f, "chunked trailers are larger than {MAX_TRAILERS} bytes")
            }
        }
    }
}

impl std::error::Error for FramingError {}

/// Decodes responses from a byte buffer the caller fills.
#[derive(Debug)]
pub(crate) struct ResponseDecoder {
    capture: bool,
    state: State,
    head: Head,
    sink: BodySink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers(usize),
    UntilClose,
}

/// What the final response head said, kept while its body is decoded.
#[derive(Debug, Default)]
struct Head {
    status: u16,
    keep_alive: bool,
    retry_after: Option<Duration>,
    headers: Option<Vec<(String, String)>>,
    /// Chunk extension bytes seen so far in this body.
    extensions: usize,
}

impl ResponseDecoder {
    /// `capture`: keep every header and up to [`MAX_BODY`] of the body. Without it, only a
    /// non-2xx body is kept, up to [`FAILURE_EXCERPT`].
    pub fn new(capture: bool) -> Self {
        ResponseDecoder {
            capture,
            state: State::Head,
            head: Head::default(),
            sink: BodySink::new(false, 0),
        }
    }

    /// Consumes what it can of `buf`. On `Done`, bytes after the response stay in `buf` and
    /// the decoder is ready for the next response.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Result<Progress, FramingError> {
        loop {
            match self.state {
                State::Head => match parse_head(buf, self.capture)? {
                    None => return Ok(Progress::NeedMore),
                    Some(parsed) => {
                        buf.advance(parsed.len);
                        if let Some(done) = self.start_body(parsed, buf) {
                            return Ok(Progress::Done(done));
                        }
                    }
                },
                State::Length(remaining) => {
                    let remaining = self.take_body(buf, remaining);
                    if remaining > 0 {
                        self.state = State::Length(remaining);
                        return Ok(Progress::NeedMore);
                    }
                    return Ok(Progress::Done(self.finish(buf, true)));
                }
                State::ChunkSize => {
                    let len = match find_line(buf, MAX_CHUNK_LINE) {
                        Line::Complete(len) => len,
                        Line::Incomplete => return Ok(Progress::NeedMore),
                        Line::TooLong => return Err(FramingError::ChunkLineTooLong),
                        Line::BareLf => return Err(FramingError::InvalidChunkSize),
                    };
                    let (size, extensions) = parse_chunk_size(buf.get(..len).unwrap_or_default())?;
                    buf.advance(len + 2);
                    self.head.extensions = self.head.extensions.saturating_add(extensions);
                    if self.head.extensions > MAX_CHUNK_EXTENSIONS {
                        return Err(FramingError::ChunkExtensionsTooLarge);
                    }
                    self.state = match size {
                        0 => State::Trailers(0),
                        n => State::ChunkData(n),
                    };
                }
                State::ChunkData(remaining) => {
                    let remaining = self.take_body(buf, remaining);
                    if remaining > 0 {
                        self.state = State::ChunkData(remaining);
                        return Ok(Progress::NeedMore);
                    }
                    self.state = State::ChunkDataEnd;
                }
                State::ChunkDataEnd => match (buf.first(), buf.get(1)) {
                    (Some(b'\r'), Some(b'\n')) => {
                        buf.advance(2);
                        self.state = State::ChunkSize;
                    }
                    (None, _) | (Some(b'\r'), None) => return Ok(Progress::NeedMore),
                    _ => return Err(FramingError::MissingChunkCrlf),
                },
                State::Trailers(seen) => {
                    let len = match find_line(buf, MAX_TRAILERS.saturating_sub(seen)) {
                        Line::Complete(len) => len,
                        Line::Incomplete => return Ok(Progress::NeedMore),
                        Line::TooLong => return Err(FramingError::TrailersTooLarge),
                        Line::BareLf => return Err(FramingError::InvalidTrailer),
                    };
                    if len == 0 {
                        buf.advance(2);
                        return Ok(Progress::Done(self.finish(buf, true)));
                    }
                    if !is_field_line(buf.get(..len).unwrap_or_default()) {
                        return Err(FramingError::InvalidTrailer);
                    }
                    buf.advance(len + 2);
                    self.state = State::Trailers(seen.saturating_add(len + 2));
                }
                State::UntilClose => {
                    self.sink.push(buf);
                    buf.clear();
                    return Ok(Progress::NeedMore);
                }
            }
        }
    }

    /// The peer closed the connection: the response, if its body is delimited by the close.
    /// `None` means the response was cut short.
    pub fn eof(&mut self, buf: &mut BytesMut) -> Option<Response> {
        match self.state {
            State::UntilClose => {
                self.sink.push(buf);
                buf.clear();
                Some(self.finish(buf, false))
            }
            _ => None,
        }
    }

    /// Sets up the body of a parsed head; returns the response at once when it has no body.
    fn start_body(&mut self, parsed: ParsedHead, buf: &BytesMut) -> Option<Response> {
        if (100..200).contains(&parsed.status) {
            // Informational: the final response follows.
            return None;
        }
        let keep = self.capture || !(200..300).contains(&parsed.status);
        let limit = if self.capture {
            MAX_BODY
        } else {
            FAILURE_EXCERPT
        };
        self.sink = BodySink::new(keep, limit);
        self.head = Head {
            status: parsed.status,
            keep_alive: parsed.keep_alive,
            retry_after: parsed.retry_after,
            headers: parsed.headers,
            extensions: 0,
        };
        match parsed.framing {
            Framing::Empty => return Some(self.finish(buf, true)),
            Framing::Length(n) => self.state = State::Length(n),
            Framing::Chunked => self.state = State::ChunkSize,
            Framing::UntilClose => self.state = State::UntilClose,
        }
        None
    }

    /// Moves up to `remaining` body bytes from `buf` to the sink; returns what is left.
    fn take_body(&mut self, buf: &mut BytesMut, remaining: u64) -> u64 {
        let take = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        self.sink.push(buf.get(..take).unwrap_or_default());
        buf.advance(take);
        remaining.saturating_sub(u64::try_from(take).unwrap_or(u64::MAX))
    }

    /// Completes the response and resets for the next one.
    fn finish(&mut self, rest: &BytesMut, delimited: bool) -> Response {
        let head = std::mem::take(&mut self.head);
        let sink = std::mem::replace(&mut self.sink, BodySink::new(false, 0));
        self.state = State::Head;
        Response {
            status: head.status,
            headers: head.headers,
            retry_after: head.retry_after,
            body: sink.data.freeze(),
            // Bytes after the response are something we did not ask for: a connection whose
            // framing we no longer trust is not reused.
            reusable: delimited && head.keep_alive && rest.is_empty(),
        }
    }
}

/// Collects up to `limit` body bytes (when `keep`), discarding the rest.
#[derive(Debug)]
struct BodySink {
    keep: bool,
    limit: usize,
    data: BytesMut,
}

impl BodySink {
    fn new(keep: bool, limit: usize) -> Self {
        BodySink {
            keep,
            limit,
            data: BytesMut::new(),
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.keep && self.data.len() < self.limit {
            let room = self.limit - self.data.len();
            self.data
                .extend_from_slice(chunk.get(..chunk.len().min(room)).unwrap_or_default());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

struct ParsedHead {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
    retry_after: Option<Duration>,
    headers: Option<Vec<(String, String)>>,
}

/// Parses one response head at the start of `buf`: `None` until it is complete.
fn parse_head(buf: &[u8], capture: bool) -> Result<Option<ParsedHead>, FramingError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(FramingError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            // Say how many once the whole head is here, so the message is exact.
            return match count_header_lines(buf) {
                Some(n) => Err(FramingError::TooManyHeaders(Some(n))),
                None if buf.len() > MAX_HEAD => Err(FramingError::TooManyHeaders(None)),
                None => Ok(None),
            };
        }
        Err(e) => return Err(FramingError::MalformedHead(e)),
    };
    if len > MAX_HEAD {
        return Err(FramingError::HeadTooLarge);
    }
    let status = response.code.unwrap_or(0);
    if status < 100 {
        return Err(FramingError::InvalidStatus(status));
    }
    if status == 101 {
        return Err(FramingError::UnrequestedUpgrade);
    }
    let http10 = response.version == Some(0);
    let mut fields = Fields::default();
    for h in response.headers.iter() {
        fields.add(h.name, h.value, status)?;
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        // RFC 9112 §6.3 rule 1: no content, whatever the header fields say.
        Framing::Empty
    } else if fields.transfer_encoding {
        if http10 {
            return Err(FramingError::TransferEncodingInHttp10);
        }
        if fields.length.is_some() {
            return Err(FramingError::LengthAndTransferEncoding);
        }
        match fields.last_coding {
            LastCoding::None => return Err(FramingError::EmptyTransferEncoding),
            LastCoding::Chunked => Framing::Chunked,
            // Rule 4: a response whose final coding is not chunked ends with the connection.
            LastCoding::Other => Framing::UntilClose,
        }
    } else {
        match fields.length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let keep_alive = !fields.close && (!http10 || fields.keep_alive);
    let headers = capture.then(|| {
        response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect()
    });
    Ok(Some(ParsedHead {
        len,
        status,
        framing,
        keep_alive,
        retry_after: fields.retry_after,
        headers,
    }))
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LastCoding {
    #[default]
    None,
    Chunked,
    Other,
}

/// What the head's framing and connection fields say, across repeated fields.
#[derive(Default)]
struct Fields {
    length: Option<u64>,
    transfer_encoding: bool,
    last_coding: LastCoding,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    retry_after: Option<Duration>,
}

impl Fields {
    fn add(&mut self, name: &str, value: &[u8], status: u16) -> Result<(), FramingError> {
        if name.eq_ignore_ascii_case("content-length") {
            self.add_content_length(value)
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.transfer_encoding = true;
            for coding in list_elements(value) {
                if coding.eq_ignore_ascii_case(b"chunked") {
                    if self.chunked {
                        return Err(FramingError::ChunkedTwice);
                    }
                    self.chunked = true;
                    self.last_coding = LastCoding::Chunked;
                } else {
                    self.last_coding = LastCoding::Other;
                }
            }
            Ok(())
        } else if name.eq_ignore_ascii_case("connection") {
            for option in list_elements(value) {
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
            Ok(())
        } else {
            if (status == 429 || status == 503) && name.eq_ignore_ascii_case("retry-after") {
                self.retry_after = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
            }
            Ok(())
        }
    }

    /// RFC 9112 §6.3: identical repeated values are one length; anything else is an error.
    fn add_content_length(&mut self, value: &[u8]) -> Result<(), FramingError> {
        for element in value.split(|&b| b == b',') {
            let n = parse_decimal(trim_ows(element)).ok_or_else(|| {
                let shown = value.get(..value.len().min(40)).unwrap_or_default();
                FramingError::InvalidContentLength(String::from_utf8_lossy(shown).into_owned())
            })?;
            match self.length {
                Some(previous) if previous != n => {
                    return Err(FramingError::ConflictingContentLength(previous, n))
                }
                _ => self.length = Some(n),
            }
        }
        Ok(())
    }
}

/// The non-empty elements of a comma-separated list, without surrounding whitespace.
fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `1*DIGIT` into a u64: no sign, no whitespace, no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

enum Line {
    /// A line of this many bytes, then CRLF.
    Complete(usize),
    Incomplete,
    TooLong,
    /// A line ending in LF alone, which HTTP/1.1 framing refuses.
    BareLf,
}

/// Finds a CRLF-terminated line of at most `max` bytes at the start of `buf`.
fn find_line(buf: &[u8], max: usize) -> Line {
    // The CRLF of a line of `max` bytes ends at index `max + 1`.
    let window = max.saturating_add(2);
    let search = buf.get(..buf.len().min(window)).unwrap_or_default();
    let Some(lf) = search.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= window {
            Line::TooLong
        } else {
            Line::Incomplete
        };
    };
    let Some(cr) = lf.checked_sub(1).filter(|&cr| buf.get(cr) == Some(&b'\r')) else {
        return Line::BareLf;
    };
    Line::Complete(cr)
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1.1): the size and the extensions' length.
fn parse_chunk_size(line: &[u8]) -> Result<(u64, usize), FramingError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (hex, rest) = line
        .split_at_checked(digits)
        .ok_or(FramingError::InvalidChunkSize)?;
    if hex.is_empty() {
        return Err(FramingError::InvalidChunkSize);
    }
    let size = hex
        .iter()
        .try_fold(0u64, |n, &b| {
            let digit = char::from(b).to_digit(16)?;
            n.checked_mul(16)?.checked_add(u64::from(digit))
        })
        .ok_or(FramingError::InvalidChunkSize)?;
    let rest = trim_ows(rest);
    if rest.is_empty() {
        return Ok((size, 0));
    }
    // Extensions are ignored but must look like extensions: `;` first, no control bytes.
    let valid = rest.first() == Some(&b';')
        && rest
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80);
    if !valid {
        return Err(FramingError::InvalidChunkSize);
    }
    Ok((size, rest.len()))
}

/// A trailer `field-name ":" field-value` line.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = line.split_at(colon);
    !name.is_empty()
        && name.iter().all(|&b| is_tchar(b))
        && value
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Header field lines in a complete head, or `None` while the head's end has not arrived.
fn count_header_lines(buf: &[u8]) -> Option<usize> {
    let mut rest = buf;
    let mut status_line_seen = false;
    let mut count = 0;
    loop {
        let lf = rest.iter().position(|&b| b == b'\n')?;
        let (line, after) = rest.split_at(lf);
        rest = after.get(1..).unwrap_or_default();
        let blank = line.strip_suffix(b"\r").unwrap_or(line).is_empty();
        match (status_line_seen, blank) {
            // httparse skips empty lines before the status line.
            (false, true) => {}
            (false, false) => status_line_seen = true,
            (true, true) => return Some(count),
            (true, false) => count += 1,
        }
    }
}

#[cfg(test)]
mod tests;
