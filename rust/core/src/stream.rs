//! A connection to a function: plain TCP or TLS over TCP. The HTTP code reads and writes a
//! [`Stream`] without knowing which; only [`connect`] and error classification differ.

use crate::message::ErrorKind;
use crate::tls::{failure_reason, observe_client_auth, ClientAuth};
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is ~1 KiB, and idle connections sit in the pool.
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why a connection could not be made.
#[derive(Debug)]
pub(crate) struct ConnectFailure {
    pub kind: ErrorKind,
    /// What happened, for the call's failure excerpt (TLS failures only: a refused or timed-out
    /// TCP connect says all it has to say through its kind).
    pub detail: Option<String>,
}

impl ConnectFailure {
    fn transport() -> Self {
        ConnectFailure {
            kind: ErrorKind::Connect,
            detail: None,
        }
    }
}

/// Connects to `authority`, then (for `tls`) completes the handshake, all within `timeout`.
/// Also says whether the server asked for a client certificate.
pub(crate) async fn connect(
    authority: &str,
    tls: Option<(&TlsConnector, &ServerName<'static>)>,
    timeout: Duration,
) -> Result<(Stream, ClientAuth), ConnectFailure> {
    match tokio::time::timeout(timeout, open(authority, tls)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectFailure::transport()),
    }
}

async fn open(
    authority: &str,
    tls: Option<(&TlsConnector, &ServerName<'static>)>,
) -> Result<(Stream, ClientAuth), ConnectFailure> {
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|_| ConnectFailure::transport())?;
    // Small request/response pairs: Nagle would add a delayed-ACK round trip to each call.
    tcp.set_nodelay(true)
        .map_err(|_| ConnectFailure::transport())?;
    let Some((connector, name)) = tls else {
        return Ok((Stream::Plain(tcp), ClientAuth::NotRequested));
    };
    let (result, client_auth) = observe_client_auth(connector.connect(name.clone(), tcp)).await;
    match result {
        Ok(stream) => Ok((Stream::Tls(Box::new(stream)), client_auth)),
        Err(e) => Err(match tls_failure(&e, authority) {
            Some(detail) => ConnectFailure {
                kind: ErrorKind::Tls,
                detail: Some(detail),
            },
            // The peer went away mid-handshake: a transport problem, worth another attempt.
            None => ConnectFailure::transport(),
        }),
    }
}

/// A description of a TLS-level failure (see [`failure_reason`]) for the call's excerpt, with
/// the likely fix when the cause is a common one.
pub(crate) fn tls_failure(error: &io::Error, authority: &str) -> Option<String> {
    let reason = failure_reason(error)?;
    let hint = match reason {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "; the server's certificate is signed by a CA this client does not trust: add that CA with tls_ca"
        }
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        ) => "; the certificate does not name the URL's host: call it by a name the certificate carries",
        rustls::Error::InvalidCertificate(_) => {
            "; the server's certificate was refused: fix it, or trust its CA with tls_ca"
        }
        rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::AccessDenied,
        ) => "; the server refused this client's certificate (or its absence): check tls_cert and tls_key",
        rustls::Error::InvalidMessage(_) => "; is this a TLS port? (an http:// server answered?)",
        _ => "",
    };
    Some(format!("TLS with {authority} failed: {reason}{hint}"))
}

/// Why a server closed a fresh TLS connection without answering, when the handshake tells:
/// the kind (final only when it asked for a certificate we do not have) and the excerpt.
pub(crate) fn closed_after_handshake(
    client_auth: ClientAuth,
    authority: &str,
) -> Option<(ErrorKind, String)> {
    match client_auth {
        ClientAuth::NotRequested => None,
        ClientAuth::RequestedNone => Some((
            ErrorKind::Tls,
            format!(
                "TLS with {authority} failed: the server asked for a client certificate, none is configured, and it closed the connection without answering; set tls_cert and tls_key"
            ),
        )),
        ClientAuth::Presented => Some((
            ErrorKind::Io,
            format!(
                "the server {authority} closed the connection right after checking this client's certificate, without answering: does it trust the certificate in tls_cert?"
            ),
        )),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
