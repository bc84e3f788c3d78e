//! The TLS client configuration of an engine: which servers are trusted (the system's roots plus
//! an optional CA file, or nobody's word at all with `insecure_skip_verify`), and the optional
//! client certificate for mutual TLS.
//!
//! Built once per engine and shared by every connection, so rustls' session cache (and with it
//! session resumption on reconnects) spans all functions. Everything an operator can get wrong
//! here (a missing file, a file without PEM, a key that does not belong to the certificate) is
//! reported as a [`TlsConfigError`] naming the setting, when the engine is built: never as a
//! failed call later.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

/// TLS settings as the operator gives them: file paths (PEM) and one switch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Extra CA certificates trusted on top of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain for servers that require one (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate (still checking the handshake's signatures). For tests
    /// and emergencies only: it gives up all protection against impostors.
    pub insecure_skip_verify: bool,
}

/// The setting a [`TlsConfigError`] is about; `name` is the key operators write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSetting {
    Ca,
    Cert,
    Key,
}

impl TlsSetting {
    pub fn name(self) -> &'static str {
        match self {
            TlsSetting::Ca => "tls_ca",
            TlsSetting::Cert => "tls_cert",
            TlsSetting::Key => "tls_key",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfigError {
    pub setting: TlsSetting,
    pub message: String,
}

impl std::fmt::Display for TlsConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting.name(), self.message)
    }
}

impl std::error::Error for TlsConfigError {}

fn problem(setting: TlsSetting, message: String) -> TlsConfigError {
    TlsConfigError { setting, message }
}

impl TlsSettings {
    /// Checks the files (readable, PEM, usable, key matching certificate) without loading the
    /// system's roots: what a configuration check needs.
    pub fn validate(&self) -> Result<(), TlsConfigError> {
        self.build(false).map(|_| ())
    }

    /// The client configuration every connection of an engine shares.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsConfigError> {
        self.build(true)
    }

    fn build(&self, system_roots: bool) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = self.roots(system_roots)?;
        let identity = self.identity()?;
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            // Only a provider without cipher suites fails here: a build problem, not a file
            // problem, reported against the first setting rather than panicking.
            .map_err(|e| {
                problem(
                    TlsSetting::Ca,
                    format!("TLS is unusable in this build: {e}"),
                )
            })?;
        let builder = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCertificate(Arc::clone(
                    &provider,
                ))))
        } else {
            // An empty store (no system roots, no tls_ca) is allowed: every https call then
            // fails verification with an excerpt that says which CA to add.
            builder.with_root_certificates(roots)
        };
        let mut config = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                problem(
                    TlsSetting::Key,
                    format!(
                        "{} cannot be used with the certificate in {}: {e}",
                        shown(self.key_file.as_deref()),
                        shown(self.cert_file.as_deref())
                    ),
                )
            })?,
            None => builder.with_no_client_auth(),
        };
        // The client speaks HTTP/1.1 only; saying so stops an h2-preferring server from
        // switching protocols under it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.client_auth_cert_resolver = Arc::new(ObservedClientAuth(Arc::clone(
            &config.client_auth_cert_resolver,
        )));
        Ok(Arc::new(config))
    }

    fn roots(&self, system_roots: bool) -> Result<RootCertStore, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        if system_roots {
            // Unreadable entries in the system store are skipped: one bad file there must not
            // take down every https call.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
        if let Some(path) = &self.ca_file {
            let certs = read_certificates(TlsSetting::Ca, path)?;
            for (i, cert) in certs.into_iter().enumerate() {
                roots.add(cert).map_err(|e| {
                    problem(
                        TlsSetting::Ca,
                        format!(
                            "certificate #{} in {} is not a usable CA certificate: {e}",
                            i + 1,
                            shown(Some(path))
                        ),
                    )
                })?;
            }
        }
        Ok(roots)
    }

    #[allow(clippy::type_complexity)]
    fn identity(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsConfigError>
    {
        let (cert, key) = match (&self.cert_file, &self.key_file) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err(problem(
                    TlsSetting::Key,
                    "required with tls_cert: the private key of the client certificate".to_owned(),
                ))
            }
            (None, Some(_)) => {
                return Err(problem(
                    TlsSetting::Cert,
                    "required with tls_key: the client certificate (PEM) of that key".to_owned(),
                ))
            }
        };
        let chain = read_certificates(TlsSetting::Cert, cert)?;
        let key = read_private_key(key)?;
        Ok(Some((chain, key)))
    }
}

/// The private key in the PEM file at `path` (`tls_key`, client or listener side).
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read_file(TlsSetting::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        problem(
            TlsSetting::Key,
            format!(
                "no private key found in {} ({e}); expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block",
                shown(Some(path))
            ),
        )
    })
}

pub(crate) fn shown(path: Option<&Path>) -> String {
    path.map_or_else(
        || "(unset)".to_owned(),
        |p| format!("{:?}", p.display().to_string()),
    )
}

fn read_file(setting: TlsSetting, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| {
        problem(
            setting,
            format!(
                "cannot read {}: {e}; point {} at a readable PEM file",
                shown(Some(path)),
                setting.name()
            ),
        )
    })
}

pub(crate) fn read_certificates(
    setting: TlsSetting,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read_file(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            problem(
                setting,
                format!("{} is not valid PEM: {e}", shown(Some(path))),
            )
        })?;
    if certs.is_empty() {
        return Err(problem(
            setting,
            format!(
                "no certificate found in {}: expected PEM \"CERTIFICATE\" blocks",
                shown(Some(path))
            ),
        ));
    }
    Ok(certs)
}

/// `insecure_skip_verify`: any certificate is accepted, but the handshake signatures are still
/// checked against it (so the session is at least bound to the certificate the server sent).
#[derive(Debug)]
struct AcceptAnyServerCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a TLS-level failure happened, from an I/O error of a TLS stream: `Some` when rustls
/// itself failed (a certificate it would not accept, an alert from the server, a peer that
/// does not speak TLS), `None` for plain transport errors (reset, refused, timed out).
pub(crate) fn failure_reason(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Whether the server asked this client for a certificate during a handshake, and whether it
/// got one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ClientAuth {
    #[default]
    NotRequested,
    /// Asked, and no certificate is configured.
    RequestedNone,
    Presented,
}

thread_local! {
    /// What the resolver saw during the handshake step being polled on this thread.
    static CLIENT_AUTH: Cell<ClientAuth> = const { Cell::new(ClientAuth::NotRequested) };
}

/// Reports, per handshake, whether the server asked for a client certificate. A server that
/// requires one and gets none may just close the connection without an alert (asyncio's TLS
/// servers do): knowing it asked turns that bare EOF into a diagnosis. The resolver must stay
/// one per engine (rustls resumes a session only under the same resolver), so it reports to
/// the handshake that is being polled on this thread: rustls calls it synchronously from
/// inside that poll (see [`observe_client_auth`]).
#[derive(Debug)]
struct ObservedClientAuth(Arc<dyn ResolvesClientCert>);

impl ResolvesClientCert for ObservedClientAuth {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let key = self.0.resolve(root_hint_subjects, sigschemes);
        let seen = if key.is_some() {
            ClientAuth::Presented
        } else {
            ClientAuth::RequestedNone
        };
        CLIENT_AUTH.with(|cell| cell.set(seen));
        key
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }

    fn has_certs(&self) -> bool {
        self.0.has_certs()
    }
}

/// Drives a handshake future to completion, noting what its server asked of the client.
pub(crate) async fn observe_client_auth<F: Future + Unpin>(
    mut handshake: F,
) -> (F::Output, ClientAuth) {
    let mut seen = ClientAuth::NotRequested;
    let output = std::future::poll_fn(|cx| {
        CLIENT_AUTH.with(|cell| cell.set(ClientAuth::NotRequested));
        let poll = Pin::new(&mut handshake).poll(cx);
        let step = CLIENT_AUTH.with(|cell| cell.replace(ClientAuth::NotRequested));
        if step != ClientAuth::NotRequested {
            seen = step;
        }
        poll
    })
    .await;
    (output, seen)
}
