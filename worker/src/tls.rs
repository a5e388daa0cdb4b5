//! TLS for the gateway's API, with client certificates for in-mesh callers (mTLS).
//!
//! The serving certificate and key come from files (a mounted Secret). With a client CA, every
//! connection must present a certificate that chains to it, or the handshake fails; the
//! certificate's subject common name is then the caller's client name, exactly as a bearer
//! token's client would be (results are readable only by the same name). Parsing a
//! certificate's subject is left to `x509-parser`: rustls verifies the chain but does not
//! expose names.
//!
//! The files are read again when they change ([`Reloading`]): a mounted Secret is updated in
//! place by the kubelet when cert-manager (or anyone) rotates it, and a gateway that kept the
//! old certificate until its next restart would fail every handshake once it expired.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, Result};

/// How often the files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// A TLS acceptor that follows its files: [`Reloading::current`] for each new connection,
/// [`Reloading::watch`] in the background.
#[derive(Clone)]
pub struct Reloading {
    files: Arc<OwnedFiles>,
    current: Arc<RwLock<(TlsAcceptor, [u8; 32])>>,
}

struct OwnedFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl OwnedFiles {
    fn borrowed(&self) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            client_ca: self.client_ca.as_deref(),
        }
    }

    /// A digest of the files' contents (unreadable files count as empty).
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for p in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            h.update(std::fs::read(p).unwrap_or_default());
            h.update([0]);
        }
        h.finalize().into()
    }
}

impl Reloading {
    /// Read the files now: a missing or broken file stops the gateway at start.
    pub fn new(files: &TlsFiles<'_>) -> Result<Reloading> {
        let files = OwnedFiles {
            cert: files.cert.to_owned(),
            key: files.key.to_owned(),
            client_ca: files.client_ca.map(Path::to_owned),
        };
        let digest = files.digest();
        let acceptor = acceptor(&files.borrowed())?;
        Ok(Reloading {
            files: Arc::new(files),
            current: Arc::new(RwLock::new((acceptor, digest))),
        })
    }

    /// The acceptor for a new connection.
    pub fn current(&self) -> TlsAcceptor {
        self.current.read().expect("tls lock").0.clone()
    }

    /// Rebuild the acceptor when the files' contents change, until `stop`. Files caught
    /// half-written (a key that does not match its certificate) keep the acceptor in force
    /// and are tried again at the next change.
    pub async fn watch(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let digest = self.files.digest();
            if digest == self.current.read().expect("tls lock").1 {
                continue;
            }
            match acceptor(&self.files.borrowed()) {
                Ok(a) => {
                    *self.current.write().expect("tls lock") = (a, digest);
                    info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    self.current.write().expect("tls lock").1 = digest;
                    warn!(error = %e, "the changed TLS files do not load; keeping the ones in force");
                }
            }
        }
    }
}

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
