//! The Helm chart as the chart tests (`tests/tests/chart_*.rs`) and the end-to-end test see it:
//! where its files are, and its manifests rendered by `helm template` and parsed into YAML
//! documents.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde::Deserialize;
use serde_yaml::Value as Yaml;

use crate::env;
use crate::tools::{helm, run, test_env};

/// The QueueProcessor CRD.
pub const CRD_NAME: &str = "queueprocessors.queueprocessing.dev";

// ------------------------------------------------------------------------------------------------
// Files

/// The chart's directory, `charts/queue-processor`.
pub fn chart_dir() -> PathBuf {
    env::workspace_root().join("charts/queue-processor")
}

/// A file of the chart, `rel` to its directory.
pub fn chart_file(rel: &str) -> PathBuf {
    chart_dir().join(rel)
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `appVersion` of Chart.yaml: the tag of the chart's default image.
pub fn chart_app_version() -> String {
    let chart: Yaml = serde_yaml::from_str(&read(&chart_file("Chart.yaml"))).unwrap();
    chart["appVersion"].as_str().unwrap().to_string()
}

// ------------------------------------------------------------------------------------------------
// Rendering

/// `helm template` of the chart as release `release` in `namespace`, with `--set` values.
pub fn render_result(release: &str, namespace: &str, sets: &[&str]) -> Output {
    let mut cmd = helm();
    cmd.arg("template")
        .arg(release)
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    if let Some(version) = test_env().try_get("QP_K8S_VERSION") {
        cmd.args(["--kube-version", &version]);
    }
    for set in sets {
        cmd.args(["--set", set]);
    }
    run(&mut cmd, None)
}

/// `helm template` that must succeed: the rendered manifests.
pub fn render(release: &str, namespace: &str, sets: &[&str]) -> String {
    let out = render_result(release, namespace, sets);
    assert!(
        out.status.success(),
        "helm template {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The YAML documents of a multi-document stream, without empty ones.
pub fn documents(yaml: &str) -> Vec<Yaml> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Yaml::deserialize(doc).expect("valid YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}
