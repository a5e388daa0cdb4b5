//! Certificates made with openssl for the TLS tests: a CA and the certificates it signs, in a
//! temporary directory removed on drop, and a CA that nothing trusts.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// CAs and the certificates they sign, in a temporary directory removed on drop.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// An empty directory for test `name`.
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("qp-pki-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        Pki { dir }
    }

    /// The path of `file` in the directory.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// The contents of `file`.
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed CA `name` (`name.crt`, `name.key`).
    pub fn ca(&self, name: &str) -> &Self {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &self.path(&format!("{name}.key")),
            "-out",
            &self.path(&format!("{name}.crt")),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        self
    }

    /// A certificate `name` (`name.crt`, `name.key`) for common name `cn`, signed by CA `ca`,
    /// with these extensions (lines of openssl's extension file).
    pub fn issue(&self, name: &str, ca: &str, cn: &str, extensions: &str) -> &Self {
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(&ext, format!("basicConstraints=CA:FALSE\n{extensions}\n")).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &self.path(&format!("{name}.key")),
            "-out",
            &self.path(&format!("{name}.csr")),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &self.path(&format!("{name}.csr")),
            "-CA",
            &self.path(&format!("{ca}.crt")),
            "-CAkey",
            &self.path(&format!("{ca}.key")),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &self.path(&format!("{name}.crt")),
        ]);
        self
    }

    /// An HTTPS client trusting CA `ca`, presenting certificate `identity` if given.
    pub fn client(&self, ca: &str, identity: Option<&str>) -> reqwest::Client {
        self.client_builder(ca, identity).build().unwrap()
    }

    /// [`Pki::client`], still to be built.
    pub fn client_builder(&self, ca: &str, identity: Option<&str>) -> reqwest::ClientBuilder {
        let read = |f: String| std::fs::read(self.path(&f)).unwrap();
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&read(format!("{ca}.crt"))).unwrap(),
            )
            .timeout(Duration::from_secs(15));
        if let Some(name) = identity {
            let mut pem = read(format!("{name}.crt"));
            pem.extend(read(format!("{name}.key")));
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA certificate (PEM) that nothing here trusts: a server's certificate never chains to it.
pub fn untrusted_ca(name: &str) -> String {
    let pki = Pki::new(&format!("untrusted-{name}"));
    pki.ca("someone-else");
    pki.read("someone-else.crt")
}
