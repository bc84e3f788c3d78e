//! HTTPS through the pool against real TLS servers, with certificates from a private CA made
//! for each test.

use crate::http::{Attempt, Endpoint, Pool};
use crate::message::ErrorKind;
use crate::retry::RetryPolicy;
use crate::tls::{TlsSetting, TlsSettings};
use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::server::WebPkiClientVerifier;
use rustls::{HandshakeKind, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A private CA and a scratch directory for the PEM files the client reads.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// A certificate and its key, as rustls wants them and as PEM files.
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        let dir = std::env::temp_dir().join(format!(
            "fastconn-tls-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let pki = Pki { ca, dir };
        std::fs::write(pki.ca_file(), pki.ca.pem()).expect("write ca");
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn leaf(&self, label: &str, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &self.ca)
            .expect("sign");
        let cert_file = self.dir.join(format!("{label}.crt"));
        let key_file = self.dir.join(format!("{label}.key"));
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_file,
            key_file,
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        roots
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a test server treats client certificates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientCerts {
    Ignored,
    /// Required in the handshake (a refusal is a TLS alert).
    Required,
    /// Asked for, and a client without one is hung up on after the handshake, without an
    /// alert (as asyncio's TLS servers do).
    AskedThenHungUp,
}

fn server_config(leaf: &Leaf, pki: &Pki, client_certs: ClientCerts) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(pki.roots()), provider());
    let builder = match client_certs {
        ClientCerts::Ignored => builder.with_no_client_auth(),
        ClientCerts::Required => {
            builder.with_client_cert_verifier(verifier.build().expect("client verifier"))
        }
        ClientCerts::AskedThenHungUp => builder.with_client_cert_verifier(
            verifier
                .allow_unauthenticated()
                .build()
                .expect("client verifier"),
        ),
    };
    let config = builder
        .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
        .expect("server cert");
    Arc::new(config)
}

/// What a TLS test server saw.
#[derive(Default)]
struct Seen {
    /// TCP connections accepted.
    accepted: AtomicUsize,
    /// Handshakes that resumed an earlier session.
    resumed: AtomicUsize,
    /// The SNI of each completed handshake.
    sni: Mutex<Vec<Option<String>>>,
}

/// An HTTPS server answering every request with 200 "ok" (closing after each answer when
/// `close_each`).
async fn tls_server(config: Arc<ServerConfig>, close_each: bool) -> (u16, Arc<Seen>) {
    let hang_up_on_anonymous = false;
    serve_tls(config, close_each, hang_up_on_anonymous).await
}

async fn serve_tls(
    config: Arc<ServerConfig>,
    close_each: bool,
    hang_up_on_anonymous: bool,
) -> (u16, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Seen::default());
    let record = Arc::clone(&seen);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            record.accepted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                {
                    let (_, session) = tls.get_ref();
                    if session.handshake_kind() == Some(HandshakeKind::Resumed) {
                        record.resumed.fetch_add(1, Ordering::SeqCst);
                    }
                    record
                        .sni
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(session.server_name().map(str::to_owned));
                    if hang_up_on_anonymous && session.peer_certificates().is_none() {
                        // Dropped without close_notify: the client sees a bare EOF.
                        return;
                    }
                }
                serve_http(&mut tls, close_each).await;
            });
        }
    });
    (port, seen)
}

/// Answers requests (head + Content-Length body) on one connection until it closes.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, close_each: bool) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
            continue;
        };
        let head = String::from_utf8_lossy(got.get(..end).unwrap_or_default()).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if got.len() < end + 4 + length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
            continue;
        }
        got.drain(..end + 4 + length);
        let reply: &[u8] = if close_each {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        if stream.write_all(reply).await.is_err() || close_each {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn pool(settings: &TlsSettings) -> Pool {
    Pool::new(4, Duration::from_secs(2)).with_tls(settings.client_config().expect("client config"))
}

async fn call(pool: &Pool, url: &str) -> Attempt {
    let endpoint = Endpoint::parse(url).expect("endpoint");
    let mut head = endpoint.head.to_vec();
    head.extend_from_slice(b"content-length: 5\r\n\r\n");
    pool.attempt(
        &endpoint,
        &head,
        &Bytes::from_static(b"hello"),
        Duration::from_secs(5),
        true,
    )
    .await
}

fn excerpt(attempt: &Attempt) -> String {
    String::from_utf8_lossy(attempt.body.as_deref().unwrap_or_default()).into_owned()
}

fn trusting(pki: &Pki) -> TlsSettings {
    TlsSettings {
        ca_file: Some(pki.ca_file()),
        ..TlsSettings::default()
    }
}

/// Trusting the test CA and presenting `client`'s certificate (mutual TLS).
fn trusting_as(pki: &Pki, client: &Leaf) -> TlsSettings {
    TlsSettings {
        cert_file: Some(client.cert_file.clone()),
        key_file: Some(client.key_file.clone()),
        ..trusting(pki)
    }
}

#[tokio::test]
async fn https_calls_succeed_over_one_kept_alive_connection() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", &["localhost", "127.0.0.1"]);
    let (port, seen) = tls_server(server_config(&leaf, &pki, ClientCerts::Ignored), false).await;
    let pool = pool(&trusting(&pki));
    for _ in 0..3 {
        let a = call(&pool, &format!("https://localhost:{port}/f")).await;
        assert_eq!(
            (a.status, a.error, a.body.as_deref()),
            (200, ErrorKind::None, Some(&b"ok"[..])),
            "{}",
            excerpt(&a)
        );
    }
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "one connection reused"
    );
    assert_eq!(
        *seen.sni.lock().unwrap_or_else(PoisonError::into_inner),
        vec![Some("localhost".to_owned())],
        "the URL's host is sent as SNI"
    );
}

#[tokio::test]
async fn an_ip_address_is_verified_against_the_certificate_without_sni() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", &["127.0.0.1"]);
    let (port, seen) = tls_server(server_config(&leaf, &pki, ClientCerts::Ignored), false).await;
    let pool = pool(&trusting(&pki));
    let a = call(&pool, &format!("https://127.0.0.1:{port}/f")).await;
    assert_eq!(
        (a.status, a.error),
        (200, ErrorKind::None),
        "{}",
        excerpt(&a)
    );
    assert_eq!(
        *seen.sni.lock().unwrap_or_else(PoisonError::into_inner),
        vec![None]
    );

    // The same server under a name its certificate does not carry is refused.
    let a = call(&pool, &format!("https://localhost:{port}/f")).await;
    assert_eq!((a.status, a.error), (0, ErrorKind::Tls));
    assert!(
        excerpt(&a).contains("not valid for name"),
        "{}",
        excerpt(&a)
    );
    assert!(excerpt(&a).contains("URL's host"), "{}", excerpt(&a));
}

#[tokio::test]
async fn reconnects_resume_the_tls_session() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", &["localhost"]);
    // The server closes after each answer, so every call needs a new connection.
    let (port, seen) = tls_server(server_config(&leaf, &pki, ClientCerts::Ignored), true).await;
    let pool = pool(&trusting(&pki));
    for _ in 0..3 {
        let a = call(&pool, &format!("https://localhost:{port}/f")).await;
        assert_eq!(
            (a.status, a.error),
            (200, ErrorKind::None),
            "{}",
            excerpt(&a)
        );
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
    assert_eq!(
        seen.resumed.load(Ordering::SeqCst),
        2,
        "the second and third connections resume the first session"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_final_tls_error_with_the_fix_in_the_excerpt() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", &["localhost"]);
    let (port, _seen) = tls_server(server_config(&leaf, &pki, ClientCerts::Ignored), false).await;
    // System roots only: the private CA is unknown.
    let pool = pool(&TlsSettings::default());
    let a = call(&pool, &format!("https://localhost:{port}/f")).await;
    assert_eq!((a.status, a.error), (0, ErrorKind::Tls));
    let text = excerpt(&a);
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("tls_ca"), "the excerpt names the fix: {text}");
    assert!(
        !RetryPolicy::default().is_retryable(a.status, a.error),
        "a certificate error does not fix itself"
    );
}

#[tokio::test]
async fn insecure_skip_verify_accepts_an_untrusted_certificate() {
    let pki = Pki::new();
    let leaf = pki.leaf("server", &["some.other.name"]);
    let (port, _seen) = tls_server(server_config(&leaf, &pki, ClientCerts::Ignored), false).await;
    let settings = TlsSettings {
        insecure_skip_verify: true,
        ..TlsSettings::default()
    };
    let a = call(&pool(&settings), &format!("https://localhost:{port}/f")).await;
    assert_eq!(
        (a.status, a.error),
        (200, ErrorKind::None),
        "{}",
        excerpt(&a)
    );
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["localhost"]);
    let client = pki.leaf("client", &["fastconn"]);
    let (port, _seen) =
        tls_server(server_config(&server, &pki, ClientCerts::Required), false).await;
    let url = format!("https://localhost:{port}/f");

    let a = call(&pool(&trusting(&pki)), &url).await;
    assert_eq!((a.status, a.error), (0, ErrorKind::Tls), "{}", excerpt(&a));
    assert!(excerpt(&a).contains("tls_cert"), "{}", excerpt(&a));

    let a = call(&pool(&trusting_as(&pki, &client)), &url).await;
    assert_eq!(
        (a.status, a.error),
        (200, ErrorKind::None),
        "{}",
        excerpt(&a)
    );
}

#[tokio::test]
async fn a_server_that_hangs_up_on_a_client_without_certificate_is_diagnosed() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["localhost"]);
    let client = pki.leaf("client", &["fastconn"]);
    let config = server_config(&server, &pki, ClientCerts::AskedThenHungUp);
    let (port, _seen) = serve_tls(config, false, true).await;
    let url = format!("https://localhost:{port}/f");

    let a = call(&pool(&trusting(&pki)), &url).await;
    assert_eq!((a.status, a.error), (0, ErrorKind::Tls), "{}", excerpt(&a));
    assert!(
        excerpt(&a).contains("asked for a client certificate, none is configured"),
        "{}",
        excerpt(&a)
    );

    let a = call(&pool(&trusting_as(&pki, &client)), &url).await;
    assert_eq!(
        (a.status, a.error),
        (200, ErrorKind::None),
        "{}",
        excerpt(&a)
    );
}

#[tokio::test]
async fn tls_to_a_plain_http_port_is_a_final_tls_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let a = call(
        &pool(&TlsSettings::default()),
        &format!("https://localhost:{port}/f"),
    )
    .await;
    assert_eq!((a.status, a.error), (0, ErrorKind::Tls));
    assert!(excerpt(&a).contains("TLS port"), "{}", excerpt(&a));
}

#[test]
fn https_endpoints_have_their_own_pool_key_and_default_port() {
    let plain = Endpoint::parse("http://gw:8443/f").expect("valid");
    let tls = Endpoint::parse("https://gw:8443/f").expect("valid");
    assert_eq!(plain.authority, tls.authority);
    assert_ne!(plain.pool_key, tls.pool_key);
    assert!(plain.tls_name.is_none() && tls.tls_name.is_some());
    let e = Endpoint::parse("https://gw/function/f").expect("valid");
    assert_eq!(e.authority, "gw:443");
    assert_eq!(&e.head[..], b"POST /function/f HTTP/1.1\r\nhost: gw\r\n");
    let e = Endpoint::parse("https://[::1]/f").expect("valid");
    assert_eq!(e.authority, "[::1]:443");
    let e = Endpoint::parse("http://gw:/f").expect("an empty port is the default one");
    assert_eq!(e.authority, "gw:80");
    assert!(Endpoint::parse("ftp://gw/f").is_err());
    assert!(Endpoint::parse("https://gw:99999/f").is_err());
    assert!(Endpoint::parse("https://:443/f").is_err());
    assert!(Endpoint::parse("http://::1/f").is_err());
    assert!(Endpoint::parse("http://[::1/f").is_err());
}

#[test]
fn bad_tls_material_names_the_setting() {
    let pki = Pki::new();
    let leaf = pki.leaf("a", &["a"]);
    let other = pki.leaf("b", &["b"]);
    let garbage = pki.dir.join("garbage.pem");
    std::fs::write(&garbage, "not pem at all").expect("write");
    let problem = |settings: TlsSettings| settings.validate().expect_err("must fail");

    let e = problem(TlsSettings {
        ca_file: Some(pki.dir.join("missing.pem")),
        ..TlsSettings::default()
    });
    assert_eq!(e.setting, TlsSetting::Ca);
    assert!(e.message.contains("cannot read"), "{e}");

    let e = problem(TlsSettings {
        ca_file: Some(garbage.clone()),
        ..TlsSettings::default()
    });
    assert_eq!(e.setting, TlsSetting::Ca);
    assert!(e.message.contains("no certificate found"), "{e}");

    let e = problem(TlsSettings {
        cert_file: Some(leaf.cert_file.clone()),
        ..TlsSettings::default()
    });
    assert_eq!(e.setting, TlsSetting::Key);

    let e = problem(TlsSettings {
        cert_file: Some(leaf.cert_file.clone()),
        key_file: Some(garbage),
        ..TlsSettings::default()
    });
    assert_eq!(e.setting, TlsSetting::Key);
    assert!(e.message.contains("no private key"), "{e}");

    let e = problem(TlsSettings {
        cert_file: Some(leaf.cert_file.clone()),
        key_file: Some(other.key_file.clone()),
        ..TlsSettings::default()
    });
    assert_eq!(e.setting, TlsSetting::Key);
    assert!(
        e.message.contains("cannot be used with the certificate"),
        "{e}"
    );

    let good = TlsSettings {
        ca_file: Some(pki.ca_file()),
        cert_file: Some(leaf.cert_file),
        key_file: Some(leaf.key_file),
        insecure_skip_verify: false,
    };
    assert_eq!(good.validate(), Ok(()));
}
