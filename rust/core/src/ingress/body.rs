//! Reading a request body within a limit: refused from its `Content-Length` before reading,
//! and while reading when it has none (chunked), so an oversized body is never buffered.
//!
//! A refused body is still read and discarded, up to [`DRAIN_BYTES`] for up to [`DRAIN_TIME`]:
//! a client still sending when the 413 goes out and the socket closes would get a reset
//! instead of the answer (the kernel resets a connection closed with unread data).

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::time::Duration;

/// The most a refused body is read for nothing before answering anyway.
const DRAIN_BYTES: u64 = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

async fn drain(mut body: Incoming) {
    let discard = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

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
            if n <= DRAIN_BYTES {
                drain(body).await;
            }
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
                drain(body).await;
                return Err(BodyError::TooLarge(None));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
