//! Reading a request body within a limit: refused from its `Content-Length` before reading,
//! and while reading when it has none (chunked), so an oversized body is never buffered.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over the limit; `Some(n)` when the `Content-Length` said so before reading.
    TooLarge(Option<u64>),
    /// The body did not arrive whole (the client went away, a malformed chunk).
    Incomplete(String),
}

pub(crate) async fn read_limited(
    mut body: Incoming,
    content_length: Option<u64>,
    limit: usize,
) -> Result<Bytes, BodyError> {
    if let Some(n) = content_length {
        if n > limit as u64 {
            return Err(BodyError::TooLarge(Some(n)));
        }
    }
    let mut buf = BytesMut::with_capacity(content_length.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            BodyError::Incomplete(format!(
                "the body did not arrive whole ({} bytes read): {e}",
                buf.len()
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge(None));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
