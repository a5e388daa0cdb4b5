//! The Helm chart against the real kube-apiserver: a server-side dry run of `helm template`, then
//! `helm install`, `kubectl auth can-i` for everything the operator does (allowed) and a list of
//! things it must not do (denied), and `helm uninstall` keeping the CRD.
//!
//! The tools and addresses come from the env file written by `hack/env.sh` ([`qp_tests::env`]).

use qp_tests::chart::{CRD_NAME, chart_dir, documents, render};
use qp_tests::tools::{Release, TestNamespace, can_i, helm, kubectl, run_ok, unique};

// ------------------------------------------------------------------------------------------------
// The real API server

#[tokio::test]
async fn rendered_chart_passes_a_server_side_dry_run() {
    let ns = TestNamespace::create("qp-chart-dry");
    let watched = TestNamespace::create("qp-chart-watched");
    let watch_set = format!("operator.watchNamespace={}", watched.0);
    let variants: Vec<Vec<&str>> = vec![
        vec!["grafanaDashboard.enabled=true"],
        vec![watch_set.as_str(), "operator.replicas=2"],
        vec![watch_set.as_str(), "networkPolicy.enabled=true"],
        vec![
            "crds.install=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "metrics.service.enabled=false",
            "operator.leaderElection.enabled=false",
        ],
    ];
    for sets in &variants {
        let manifests = render("qp-dry", &ns.0, sets);
        let out = run_ok(
            kubectl().args(["apply", "--dry-run=server", "-f", "-"]),
            Some(manifests.as_bytes()),
        );
        let applied = out.lines().count();
        assert_eq!(
            applied,
            documents(&manifests).len(),
            "every rendered object is accepted ({sets:?}):\n{out}"
        );
    }
}

#[tokio::test]
async fn helm_install_creates_every_object_and_grants_only_what_the_operator_needs() {
    let ns = TestNamespace::create("qp-chart-install");
    let release = Release {
        name: unique("qpc"),
        namespace: ns.0.clone(),
        uninstalled: false,
    };
    let fullname = format!("{}-queue-processor", release.name);

    // --take-ownership: the CRD outlives releases (resource-policy keep), so it may already exist
    // from an earlier release or from `kubectl apply -f crds/`. --force-conflicts: another test
    // may have server-side-applied it from the Rust types, which the chart's copy must equal (see
    // crd_template_is_the_generated_crd_and_is_kept) but may lag while the types are edited.
    let mut cmd = helm();
    cmd.args(["install", &release.name])
        .arg(chart_dir())
        .args([
            "--namespace",
            &ns.0,
            "--take-ownership",
            "--force-conflicts",
        ])
        .args(["--set", "grafanaDashboard.enabled=true"]);
    let out = run_ok(&mut cmd, None);
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(
        out.contains("kubectl get qp"),
        "NOTES tell the user what to do next:\n{out}"
    );

    // Every object exists (the node is tainted and this release does not tolerate it, so the pod
    // never runs here; tests/tests/e2e.rs runs the chart on the node).
    for (kind, name, namespaced) in [
        ("deployment", fullname.clone(), true),
        ("serviceaccount", fullname.clone(), true),
        ("service", format!("{fullname}-metrics"), true),
        ("configmap", format!("{fullname}-dashboard"), true),
        ("role", format!("{fullname}-leader-election"), true),
        ("rolebinding", format!("{fullname}-leader-election"), true),
        ("clusterrole", fullname.clone(), false),
        ("clusterrolebinding", fullname.clone(), false),
        ("customresourcedefinition", CRD_NAME.to_string(), false),
    ] {
        let mut cmd = kubectl();
        cmd.args(["get", kind, &name, "-o", "name"]);
        if namespaced {
            cmd.args(["--namespace", &ns.0]);
        }
        run_ok(&mut cmd, None);
    }
    let established = run_ok(
        kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            &format!("crd/{CRD_NAME}"),
        ]),
        None,
    );
    assert!(established.contains("condition met"), "{established}");

    // What the operator does: all allowed. Cluster-wide (`None`) or in some user namespace.
    let other = "some-team";
    let lease = format!("leases.coordination.k8s.io/{fullname}");
    let allowed: Vec<(&str, &str, Option<&str>)> = vec![
        ("get", "queueprocessors.queueprocessing.dev", Some(other)),
        ("list", "queueprocessors.queueprocessing.dev", None),
        ("watch", "queueprocessors.queueprocessing.dev", None),
        ("patch", "queueprocessors.queueprocessing.dev", Some(other)),
        ("update", "queueprocessors.queueprocessing.dev", Some(other)),
        (
            "get",
            "queueprocessors.queueprocessing.dev --subresource=status",
            Some(other),
        ),
        (
            "patch",
            "queueprocessors.queueprocessing.dev --subresource=status",
            Some(other),
        ),
        (
            "update",
            "queueprocessors.queueprocessing.dev --subresource=status",
            Some(other),
        ),
        (
            "update",
            "queueprocessors.queueprocessing.dev --subresource=finalizers",
            Some(other),
        ),
        ("list", "deployments.apps", None),
        ("watch", "deployments.apps", None),
        ("get", "deployments.apps", Some(other)),
        ("create", "deployments.apps", Some(other)),
        ("patch", "deployments.apps", Some(other)),
        ("update", "deployments.apps", Some(other)),
        ("delete", "deployments.apps", Some(other)),
        ("list", "services", None),
        ("watch", "services", None),
        ("get", "services", Some(other)),
        ("create", "services", Some(other)),
        ("patch", "services", Some(other)),
        ("update", "services", Some(other)),
        ("delete", "services", Some(other)),
        ("get", "secrets", Some(other)),
        ("list", "pods", Some(other)),
        ("list", "pods", None),
        ("create", "events.events.k8s.io", Some(other)),
        ("patch", "events.events.k8s.io", Some(other)),
        ("create", "leases.coordination.k8s.io", Some(&ns.0)),
        ("get", &lease, Some(&ns.0)),
        ("update", &lease, Some(&ns.0)),
    ];
    // What it must not do: all denied.
    let denied: Vec<(&str, &str, Option<&str>)> = vec![
        // Users create and delete QueueProcessors, never the operator.
        ("create", "queueprocessors.queueprocessing.dev", Some(other)),
        ("delete", "queueprocessors.queueprocessing.dev", Some(other)),
        (
            "deletecollection",
            "queueprocessors.queueprocessing.dev",
            Some(other),
        ),
        // Secrets: read a referenced one, never enumerate, watch or change them.
        ("list", "secrets", Some(other)),
        ("watch", "secrets", Some(other)),
        ("list", "secrets", None),
        ("create", "secrets", Some(other)),
        ("update", "secrets", Some(other)),
        ("delete", "secrets", Some(other)),
        // Pods: listed to explain unready workers, nothing more. No nodes.
        ("get", "pods", Some(other)),
        ("watch", "pods", Some(other)),
        ("create", "pods", Some(other)),
        ("update", "pods", Some(other)),
        ("delete", "pods", Some(other)),
        ("deletecollection", "pods", Some(other)),
        ("create", "pods --subresource=exec", Some(other)),
        ("get", "pods --subresource=log", Some(other)),
        ("get", "nodes", None),
        ("list", "nodes", None),
        // Other workload and config kinds.
        ("create", "statefulsets.apps", Some(other)),
        ("create", "daemonsets.apps", Some(other)),
        ("patch", "deployments.apps --subresource=scale", Some(other)),
        ("create", "configmaps", Some(other)),
        ("create", "serviceaccounts", Some(other)),
        ("create", "serviceaccounts --subresource=token", Some(other)),
        ("deletecollection", "deployments.apps", Some(other)),
        ("deletecollection", "services", Some(other)),
        // The legacy core events API, and reading events.
        ("create", "events", Some(other)),
        ("list", "events.events.k8s.io", Some(other)),
        // No way to escalate.
        ("patch", "clusterroles.rbac.authorization.k8s.io", None),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            None,
        ),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            Some(other),
        ),
        ("bind", "clusterroles.rbac.authorization.k8s.io", None),
        ("escalate", "roles.rbac.authorization.k8s.io", Some(other)),
        ("impersonate", "serviceaccounts", Some(other)),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        (
            "delete",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        // Leases: only its own, only in its namespace, never deleted or listed.
        (
            "get",
            "leases.coordination.k8s.io/kube-controller-manager",
            Some(&ns.0),
        ),
        (
            "update",
            "leases.coordination.k8s.io/someone-else",
            Some(&ns.0),
        ),
        ("delete", &lease, Some(&ns.0)),
        ("list", "leases.coordination.k8s.io", Some(&ns.0)),
        ("create", "leases.coordination.k8s.io", Some(other)),
        ("get", "leases.coordination.k8s.io", Some("kube-system")),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, scope) in &allowed {
        if !can_i(&fullname, &ns.0, verb, resource, *scope) {
            wrong.push(format!("denied but needed: {verb} {resource} in {scope:?}"));
        }
    }
    for (verb, resource, scope) in &denied {
        if can_i(&fullname, &ns.0, verb, resource, *scope) {
            wrong.push(format!(
                "allowed but not needed: {verb} {resource} in {scope:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "RBAC of the operator:\n  {}",
        wrong.join("\n  ")
    );

    // Uninstall removes the release's objects but keeps the CRD (and with it every
    // QueueProcessor in the cluster).
    let mut release = release;
    run_ok(
        helm().args(["uninstall", &release.name, "--namespace", &ns.0]),
        None,
    );
    release.uninstalled = true;
    run_ok(kubectl().args(["get", "crd", CRD_NAME, "-o", "name"]), None);
    for (kind, namespaced) in [("deployment", true), ("clusterrole", false)] {
        let mut cmd = kubectl();
        cmd.args(["get", kind, &fullname, "--ignore-not-found", "-o", "name"]);
        if namespaced {
            cmd.args(["--namespace", &ns.0]);
        }
        let left = run_ok(&mut cmd, None);
        assert!(
            left.trim().is_empty(),
            "{kind} {fullname} removed on uninstall: {left}"
        );
    }
}
