//! TLS termination with rustls (the `ring` provider): PEM certificate chain
//! and key from `[gateway.tls]`, ALPN `h2` then `http/1.1`.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::RawTls;

/// ALPN ids the gateway offers, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate chain: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{} holds no usable PEM private key: {e}", path.display()))
}

/// Checks that `path` holds what `[gateway.tls].{name}` needs (used by config
/// validation, so `switchboard check` reports it with file, line and key).
pub fn check_file(name: &str, path: &Path) -> Result<(), String> {
    match name {
        "cert" => certs(path).map(drop),
        _ => key(path).map(drop),
    }
}

/// The rustls server config for `tls`.
pub fn server_config(tls: &RawTls) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = certs(tls.cert.get_ref()).map_err(io::Error::other)?;
    let key = key(tls.key.get_ref()).map_err(io::Error::other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::other(format!("certificate and key do not match: {e}")))?;
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A TLS acceptor for `tls`.
pub fn acceptor(tls: &RawTls) -> io::Result<TlsAcceptor> {
    server_config(tls).map(TlsAcceptor::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a PEM file holds, checking it never panics, and a refusal
        /// names the file.
        #[test]
        fn any_file_content_is_checked_without_panic(
            body in proptest::collection::vec(any::<u8>(), 0..1024),
            label in prop::sample::select(vec!["CERTIFICATE", "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "X"]),
            wrap in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.pem");
            let mut text = Vec::new();
            if wrap {
                text.extend_from_slice(format!("-----BEGIN {label}-----\n").as_bytes());
            }
            text.extend_from_slice(&body);
            if wrap {
                text.extend_from_slice(format!("\n-----END {label}-----\n").as_bytes());
            }
            std::fs::write(&path, &text).unwrap();
            for name in ["cert", "key"] {
                if let Err(e) = check_file(name, &path) {
                    prop_assert!(e.contains("x.pem"), "{}", e);
                }
            }
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = check_file("cert", Path::new("/nonexistent/chain.pem")).unwrap_err();
        assert!(e.contains("/nonexistent/chain.pem"), "{e}");
        let e = check_file("key", Path::new("/nonexistent/key.pem")).unwrap_err();
        assert!(e.contains("/nonexistent/key.pem"), "{e}");
    }
}
