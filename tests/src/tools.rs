//! The command-line tools of the environment (helm, kubectl) as the tests run them, and objects
//! that undo themselves: a namespace deleted and a Helm release uninstalled when the test ends,
//! pass or fail.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::env;

/// The env file written by `hack/env.sh`, read once.
pub fn test_env() -> &'static env::Env {
    static ENV: OnceLock<env::Env> = OnceLock::new();
    ENV.get_or_init(env::load)
}

pub fn env_get(key: &str) -> String {
    test_env().get(key)
}

pub fn helm() -> Command {
    let mut cmd = Command::new(env_get("QP_HELM"));
    cmd.env("KUBECONFIG", env_get("KUBECONFIG"));
    cmd
}

pub fn kubectl() -> Command {
    let mut cmd = Command::new(env_get("QP_KUBECTL"));
    cmd.env("KUBECONFIG", env_get("KUBECONFIG"));
    cmd
}

pub fn promtool() -> Command {
    Command::new("promtool")
}

/// Runs `cmd`, feeding it `stdin`, and returns its output whatever the exit status.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input)
            .unwrap_or_else(|e| panic!("write stdin of {shown}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {shown}: {e}"))
}

/// Runs `cmd` and returns its stdout; panics with everything it printed when it fails.
pub fn run_ok(cmd: &mut Command, stdin: Option<&[u8]>) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd, stdin);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A namespace that is deleted when the test ends, pass or fail.
pub struct TestNamespace(pub String);

impl TestNamespace {
    pub fn create(prefix: &str) -> Self {
        let name = unique(prefix);
        run_ok(kubectl().args(["create", "namespace", &name]), None);
        TestNamespace(name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = run(
            kubectl().args(["delete", "namespace", &self.0, "--wait=false"]),
            None,
        );
    }
}

/// `kubectl auth can-i` as the operator's ServiceAccount. `namespace` None asks cluster-wide.
pub fn can_i(sa: &str, sa_ns: &str, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let (resource, subresource) = match resource.split_once(" --subresource=") {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let mut cmd = kubectl();
    cmd.args(["auth", "can-i", verb, resource])
        .arg(format!("--as=system:serviceaccount:{sa_ns}:{sa}"));
    if let Some(sub) = subresource {
        cmd.arg(format!("--subresource={sub}"));
    }
    match namespace {
        Some(ns) => cmd.args(["--namespace", ns]),
        None => cmd.arg("--all-namespaces"),
    };
    let out = run(&mut cmd, None);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {verb} {resource}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A Helm release that is uninstalled when the test ends, unless the test did it itself.
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub uninstalled: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = run(
                helm().args(["uninstall", &self.name, "--namespace", &self.namespace]),
                None,
            );
        }
    }
}
