//! TLS for the gateway's API, with client certificates for in-mesh callers (mTLS).
//!
//! The serving certificate and key come from files (a mounted Secret). With a client CA, every
//! connection must present a certificate that chains to it, or the handshake fails; the
//! certificate's subject common name is then the caller's client name, exactly as a bearer
//! token's client would be (results are readable only by the same name). Parsing a
//! certificate's subject is left to `x509-parser`: rustls verifies the chain but does not
//! expose names.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::{Error, Result};

/// The common name a verified client certificate gives, put into the request's extensions by
/// the accept loop; the gateway's authentication decides whether it is an acceptable client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerName(pub String);

/// Where the gateway's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Require client certificates that chain to this CA.
    pub client_ca: Option<&'a Path>,
}

/// A TLS acceptor from the files; errors name the file and never its contents.
pub fn acceptor(files: &TlsFiles<'_>) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(files.cert)?;
    let key = PrivateKeyDer::from_pem_file(files.key)
        .map_err(|e| Error::config(format!("TLS key {}: {e}", files.key.display())))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS: {e}")))?;
    let builder = match files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| Error::config(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::config(format!("TLS certificate {}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::config(format!("certificates {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The subject common name of a (verified) certificate, if it has exactly one readable one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut names = parsed.subject().iter_common_name();
    let first = names.next()?.as_str().ok()?.to_owned();
    names.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate made by openssl for `subject`, so the parser is checked on
    /// what real tools produce.
    fn cert_with(subject: &str) -> CertificateDer<'static> {
        let dir = std::env::temp_dir().join(format!("qp-tls-unit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("c.pem");
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", subject, "-keyout", "/dev/null", "-out"])
            .arg(&pem)
            .output()
            .unwrap();
        assert!(out.status.success());
        let cert = read_certs(&pem).unwrap().remove(0);
        std::fs::remove_dir_all(&dir).unwrap();
        cert
    }

    #[test]
    fn the_common_name_is_the_client() {
        assert_eq!(
            common_name(&cert_with("/O=acme/CN=orders")).as_deref(),
            Some("orders")
        );
        assert_eq!(common_name(&cert_with("/O=acme")), None);
        assert_eq!(common_name(&cert_with("/CN=a/CN=b")), None);
    }

    #[test]
    fn errors_name_the_file() {
        let missing = Path::new("/nonexistent/tls.crt");
        let e = acceptor(&TlsFiles {
            cert: missing,
            key: missing,
            client_ca: None,
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("/nonexistent/tls.crt"), "{e}");
    }
}
