//! HTTPS on the ingress listener (`[server] tls_cert` / `tls_key`): the server configuration,
//! built once at start from the operator's PEM files with the same readers (and the same error
//! wording) as the client side in [`crate::tls`], so `check` and `run` agree on every file.

use crate::tls::{read_certificates, read_private_key, shown, TlsConfigError, TlsSetting};
use rustls::ServerConfig;
use std::path::Path;
use std::sync::Arc;

/// The listener's TLS configuration: the certificate chain of `cert` with the key of `key`,
/// ALPN `h2` then `http/1.1` when HTTP/2 is on (else `http/1.1` only, so an h2-preferring
/// client does not pick a protocol the server will not speak).
pub fn server_config(
    cert: &Path,
    key: &Path,
    http2: bool,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let chain = read_certificates(TlsSetting::Cert, cert)?;
    let private_key = read_private_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError {
            setting: TlsSetting::Cert,
            message: format!("TLS is unusable in this build: {e}"),
        })?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsConfigError {
            setting: TlsSetting::Key,
            message: format!(
                "{} is not the private key of the certificate in {} ({e}): give tls_key the key \
                 the certificate was issued for",
                shown(Some(key)),
                shown(Some(cert))
            ),
        })?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// The first problem with a listener certificate and key given as paths, or None. Both are
/// needed together; each message names the key and the fix.
pub fn check_server_tls(cert: Option<&Path>, key: Option<&Path>) -> Option<TlsConfigError> {
    match (cert, key) {
        (None, None) => None,
        (Some(_), None) => Some(TlsConfigError {
            setting: TlsSetting::Key,
            message: "required with tls_cert: the private key (PEM) of the listener's certificate"
                .to_owned(),
        }),
        (None, Some(_)) => Some(TlsConfigError {
            setting: TlsSetting::Cert,
            message: "required with tls_key: the certificate chain (PEM) of that key".to_owned(),
        }),
        (Some(cert), Some(key)) => server_config(cert, key, false).err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fastconn-ingress-tls-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn a_matching_pair_loads_and_announces_h2_only_when_asked() {
        let dir = scratch("ok");
        let issued =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let cert = write(&dir, "cert.pem", &issued.cert.pem());
        let key = write(&dir, "key.pem", &issued.signing_key.serialize_pem());
        let h1 = server_config(&cert, &key, false).expect("h1");
        assert_eq!(h1.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let h2 = server_config(&cert, &key, true).expect("h2");
        assert_eq!(h2.alpn_protocols[0], b"h2".to_vec());
        assert!(check_server_tls(Some(&cert), Some(&key)).is_none());
    }

    #[test]
    fn bad_files_name_the_key_at_fault() {
        let dir = scratch("bad");
        let one = rcgen::generate_simple_self_signed(vec!["a".to_owned()]).expect("cert");
        let other = rcgen::generate_simple_self_signed(vec!["b".to_owned()]).expect("cert");
        let cert = write(&dir, "cert.pem", &one.cert.pem());
        let wrong_key = write(&dir, "other.pem", &other.signing_key.serialize_pem());
        let not_pem = write(&dir, "junk.pem", "hello\n");
        let missing = dir.join("missing.pem");

        let mismatch = check_server_tls(Some(&cert), Some(&wrong_key)).expect("mismatch");
        assert_eq!(mismatch.setting, TlsSetting::Key);
        assert!(
            mismatch.message.contains("not the private key"),
            "{mismatch}"
        );
        let junk = check_server_tls(Some(&not_pem), Some(&wrong_key)).expect("junk cert");
        assert_eq!(junk.setting, TlsSetting::Cert);
        let junk_key = check_server_tls(Some(&cert), Some(&not_pem)).expect("junk key");
        assert_eq!(junk_key.setting, TlsSetting::Key);
        let gone = check_server_tls(Some(&missing), Some(&wrong_key)).expect("missing");
        assert!(gone.message.contains("cannot read"), "{gone}");
        let alone = check_server_tls(Some(&cert), None).expect("alone");
        assert_eq!(alone.setting, TlsSetting::Key);
    }
}
