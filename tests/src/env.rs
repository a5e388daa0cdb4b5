//! The local environment written by `hack/env.sh` (`.qp-env/env`): every address a test needs.
//! Tests never hard-code ports; they ask this module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// KEY=VALUE pairs from the env file.
#[derive(Debug, Clone)]
pub struct Env {
    vars: HashMap<String, String>,
    path: PathBuf,
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the env file: `$QP_ENV_FILE`, else `<workspace>/.qp-env/env`.
pub fn path() -> PathBuf {
    std::env::var_os("QP_ENV_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".qp-env/env"))
}

/// Read the env file. Panics with the fix when it is missing: the tests need real services.
pub fn load() -> Env {
    let path = path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nThe tests run against real services: run `make env-up` first \
             (or `make test`, which does it for you).",
            path.display()
        )
    });
    let vars = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Env { vars, path }
}

impl Env {
    /// A variable that must exist.
    pub fn get(&self, key: &str) -> String {
        self.vars.get(key).cloned().unwrap_or_else(|| {
            panic!(
                "{key} is missing from {}; re-run `make env-up`",
                self.path.display()
            )
        })
    }

    pub fn try_get(&self, key: &str) -> Option<String> {
        self.vars.get(key).cloned()
    }
}

/// A client for the local kube-apiserver, from the env file's kubeconfig.
pub async fn kube_client() -> kube::Client {
    let env = load();
    let kubeconfig = kube::config::Kubeconfig::read_from(env.get("KUBECONFIG"))
        .expect("kubeconfig written by hack/env.sh is readable");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig is valid");
    kube::Client::try_from(config).expect("kube client")
}
