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
