//! Can the pods of a QueueProcessor's Deployments run? Pure diagnosis, no API calls.
//!
//! Measuring the source and Redis says nothing about the pods: with a mistyped image, a
//! handler that exits at start or a Secret key that is missing, the backlog is measured fine,
//! the policy asks for replicas, and the Deployment never gets them. The `Ready` condition
//! would say `Processing` while nothing processes. So when a Deployment has fewer ready,
//! available or up-to-date replicas than it wants ([`needs_pods`]), the controller lists that
//! component's pods and [`diagnose`] turns the kubelet's and the Deployment controller's own
//! words into one [`Problem`] for `Ready=False`:
//!
//! - `ImagePullFailed`: a container waits in `ErrImagePull`, `ImagePullBackOff`,
//!   `InvalidImageName` or `ErrImageNeverPull`;
//! - `ContainerConfigInvalid`: a container waits in `CreateContainerConfigError` (a missing
//!   Secret or key), `CreateContainerError` or `RunContainerError`;
//! - `CrashLooping`: a container waits in `CrashLoopBackOff`, or is not ready after
//!   [`CRASH_LOOP_RESTARTS`] restarts with a non-zero last exit;
//! - `Unschedulable`: the pod condition `PodScheduled` is `False` with reason `Unschedulable`;
//! - `ReplicaFailure`: the Deployment condition `ReplicaFailure` is `True` (quota, admission:
//!   there is no pod to look at);
//! - `ProgressDeadlineExceeded`: the Deployment condition `Progressing` is `False` with that
//!   reason.
//!
//! A pod that is merely starting (pulling, creating, waiting for the scheduler to get to it) is
//! not a problem: scaling up always looks like that for a few seconds. Only a reason the kubelet,
//! scheduler or Deployment controller gives for *not* making progress counts. An unschedulable
//! pod is reported at once, even when a cluster autoscaler is about to add a node: that is what
//! the scheduler says at that moment, and `Ready` comes back as soon as the pod runs.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};

use crate::workload::Component;

/// Restarts after which a container that is not ready and last exited non-zero counts as crash
/// looping even while the kubelet is not backing off: between two back-offs it shows `Running`
/// (or `Terminated`), and a poll can land there. Fewer restarts may be a one-off (a dependency
/// restarting), which the kubelet's own `CrashLoopBackOff` would still catch.
pub const CRASH_LOOP_RESTARTS: i32 = 3;

/// Longest piece of kubelet or Deployment-controller text quoted in a message, in bytes. Pull
/// errors quote the image reference two or three times; this keeps the useful start and keeps
/// the whole message well under the 1 kB limit of an event note.
pub const MAX_QUOTED: usize = 240;

/// Longest whole message, in bytes (an events.k8s.io note holds at most 1 kB).
pub const MAX_MESSAGE: usize = 1000;

/// Why pods cannot run, as the `Ready` condition's reason (and the STATUS column of
/// `kubectl get qp`). Declared from most to least specific: when pods fail for different
/// reasons, the earliest is reported, as it is the one a user can act on first (a bad image
/// or config is a spec mistake; a crash loop may be a consequence; scheduling is capacity;
/// the Deployment conditions only summarize what the pods show).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The image cannot be pulled or its reference is invalid.
    ImagePullFailed,
    /// The kubelet cannot create or start the container from its spec (a missing Secret or
    /// key, a command that does not exist).
    ContainerConfigInvalid,
    /// The container keeps exiting.
    CrashLooping,
    /// The scheduler finds no node for the pod.
    Unschedulable,
    /// The ReplicaSet cannot create pods (quota, admission webhook, pod security).
    ReplicaFailure,
    /// The rollout made no progress within `progressDeadlineSeconds`.
    ProgressDeadlineExceeded,
}

impl Reason {
    /// The CamelCase condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ImagePullFailed => "ImagePullFailed",
            Reason::ContainerConfigInvalid => "ContainerConfigInvalid",
            Reason::CrashLooping => "CrashLooping",
            Reason::Unschedulable => "Unschedulable",
            Reason::ReplicaFailure => "ReplicaFailure",
            Reason::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
        }
    }
}

/// Why one component's pods cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub component: Component,
    pub reason: Reason,
    /// Which component, pod and container, and why, quoting the kubelet (truncated), e.g.
    /// `worker: 0/2 pods ready; pod orders-worker-…: container qp-worker cannot pull image
    /// "ghcr.io/acme/qp:9.9.9" (ImagePullBackOff): Back-off pulling image …`.
    pub message: String,
}

/// Desired, ready, available and up-to-date replicas of a Deployment.
fn counts(d: &Deployment) -> (i32, i32, i32, i32) {
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.as_ref();
    let get = |f: fn(&DeploymentStatus) -> Option<i32>| st.and_then(f).unwrap_or(0);
    (
        desired,
        get(|s| s.ready_replicas),
        get(|s| s.available_replicas),
        get(|s| s.updated_replicas),
    )
}

/// Whether the pods are worth a look: the Deployment wants replicas it does not have ready,
/// available or up to date. False for a healthy Deployment, so the healthy path costs no API
/// call; false without a Deployment (not created yet) or at zero replicas (nothing to run).
/// Up-to-date matters because the operator rolls with `maxUnavailable: 0`: a new image that
/// cannot be pulled leaves the old pods ready, and only `updatedReplicas` shows the stuck roll.
pub fn needs_pods(deployment: Option<&Deployment>) -> bool {
    let Some(d) = deployment else { return false };
    let (desired, ready, available, updated) = counts(d);
    desired > 0 && (ready < desired || available < desired || updated < desired)
}

/// Why the pods of `component` cannot run, if a pod or the Deployment says so. `pods` are the
/// component's pods (its selector labels; old and new ReplicaSets alike). `None` when the
/// Deployment is healthy ([`needs_pods`] is false) or its pods are only starting.
pub fn diagnose(
    component: Component,
    deployment: Option<&Deployment>,
    pods: &[Pod],
) -> Option<Problem> {
    let d = deployment?;
    if !needs_pods(Some(d)) {
        return None;
    }
    let (desired, ready, _, _) = counts(d);
    let prefix = format!("{}: {ready}/{desired} pods ready", component.as_str());

    let mut found: Vec<(Reason, &str, String)> = pods
        .iter()
        .filter(|p| counts_for_health(p))
        .filter_map(|p| {
            let (reason, detail) = pod_problem(p)?;
            Some((reason, p.metadata.name.as_deref().unwrap_or("?"), detail))
        })
        .collect();
    // Most specific reason first, then by name so the message does not flap between polls.
    found.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let (reason, message) = match found.first() {
        Some((reason, pod, detail)) => {
            let more = match found.len() - 1 {
                0 => String::new(),
                1 => "; 1 more pod has problems".to_owned(),
                n => format!("; {n} more pods have problems"),
            };
            (*reason, format!("{prefix}; pod {pod}: {detail}{more}"))
        }
        None => {
            let (reason, detail) = deployment_problem(d)?;
            (reason, format!("{prefix}; {detail}"))
        }
    };
    Some(Problem {
        component,
        reason,
        message: truncate(&message, MAX_MESSAGE),
    })
}

/// Pods on their way out (being deleted, or finished: evicted pods stay as `Failed`) no longer
/// decide whether the component can run; their replacements do.
fn counts_for_health(pod: &Pod) -> bool {
    let terminal = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !terminal
}

/// One pod's problem: its init containers first (a pod stuck there never starts the others),
/// then its containers, then scheduling (an unscheduled pod has no container statuses).
fn pod_problem(pod: &Pod) -> Option<(Reason, String)> {
    let status = pod.status.as_ref()?;
    let inits = status.init_container_statuses.iter().flatten();
    let mains = status.container_statuses.iter().flatten();
    inits
        .map(|c| ("init container", c))
        .chain(mains.map(|c| ("container", c)))
        .find_map(|(kind, c)| container_problem(kind, c))
        .or_else(|| {
            status.conditions.iter().flatten().find_map(|c| {
                (c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable"))
                .then(|| {
                    (
                        Reason::Unschedulable,
                        format!(
                            "cannot be scheduled: {}",
                            quote(c.message.as_deref().unwrap_or("no node fits"))
                        ),
                    )
                })
            })
        })
}

fn container_problem(kind: &str, c: &ContainerStatus) -> Option<(Reason, String)> {
    if c.ready {
        return None;
    }
    let state = c.state.as_ref();
    let waiting = state.and_then(|s| s.waiting.as_ref());
    let why = waiting.and_then(|w| w.reason.as_deref()).unwrap_or("");
    let kubelet = waiting
        .and_then(|w| w.message.as_deref())
        .filter(|m| !m.is_empty())
        .map(|m| format!(": {}", quote(m)))
        .unwrap_or_default();
    let name = &c.name;
    match why {
        "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => Some((
            Reason::ImagePullFailed,
            format!(
                "{kind} {name} cannot pull image {:?} ({why}){kubelet}",
                c.image
            ),
        )),
        "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => Some((
            Reason::ContainerConfigInvalid,
            format!("{kind} {name} cannot be started ({why}){kubelet}"),
        )),
        "CrashLoopBackOff" => Some((
            Reason::CrashLooping,
            format!(
                "{kind} {name} keeps exiting ({why}, {}){kubelet}",
                restarts_and_exit(c)
            ),
        )),
        _ => {
            // Between two back-offs: running (not ready yet) or just terminated again.
            let failed = last_exit(c).is_some_and(|t| t.exit_code != 0);
            (failed && c.restart_count >= CRASH_LOOP_RESTARTS).then(|| {
                (
                    Reason::CrashLooping,
                    format!("{kind} {name} keeps exiting ({})", restarts_and_exit(c)),
                )
            })
        }
    }
}

/// The most recent termination: the current state while terminated, else the last state.
fn last_exit(c: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    c.state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
}

/// `4 restarts, last exit code 1 (Error): <termination message>`.
fn restarts_and_exit(c: &ContainerStatus) -> String {
    let restarts = match c.restart_count {
        1 => "1 restart".to_owned(),
        n => format!("{n} restarts"),
    };
    match last_exit(c) {
        Some(t) => {
            let reason = t
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let said = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| format!(": {}", quote(m)))
                .unwrap_or_default();
            format!("{restarts}, last exit code {}{reason}{said}", t.exit_code)
        }
        None => restarts,
    }
}

/// What the Deployment controller says when no pod explains itself: pods that cannot be
/// created at all, then a rollout past its deadline.
fn deployment_problem(d: &Deployment) -> Option<(Reason, String)> {
    let name = d.metadata.name.as_deref().unwrap_or("?");
    let conditions: Vec<_> = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .collect();
    let said = |c: &DeploymentCondition| {
        let reason = c.reason.as_deref().unwrap_or(&c.type_);
        match c.message.as_deref().filter(|m| !m.is_empty()) {
            Some(m) => format!("({reason}): {}", quote(m)),
            None => format!("({reason})"),
        }
    };
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
    {
        return Some((
            Reason::ReplicaFailure,
            format!("Deployment {name} cannot create pods {}", said(c)),
        ));
    }
    conditions
        .iter()
        .find(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| {
            (
                Reason::ProgressDeadlineExceeded,
                format!("Deployment {name} made no progress {}", said(c)),
            )
        })
}

/// Kubelet text on one line, at most [`MAX_QUOTED`] bytes.
fn quote(s: &str) -> String {
    truncate(
        &s.split_whitespace().collect::<Vec<_>>().join(" "),
        MAX_QUOTED,
    )
}

/// At most `max` bytes, cut at a character boundary, with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let ellipsis = '…';
    let mut end = max - ellipsis.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `kubectl get deploy,pods -o yaml` List from `tests/fixtures/health/`.
    fn fixture(name: &str) -> (Option<Deployment>, Vec<Pod>) {
        let path = format!(
            "{}/tests/fixtures/health/{name}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let list: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let mut deployment = None;
        let mut pods = Vec::new();
        for item in list["items"].as_sequence().unwrap() {
            match item["kind"].as_str() {
                Some("Deployment") => {
                    deployment = Some(serde_yaml::from_value(item.clone()).unwrap())
                }
                Some("Pod") => pods.push(serde_yaml::from_value(item.clone()).unwrap()),
                other => panic!("{path}: unexpected kind {other:?}"),
            }
        }
        (deployment, pods)
    }

    fn diagnose_fixture(name: &str) -> Option<Problem> {
        let (d, pods) = fixture(name);
        assert!(needs_pods(d.as_ref()), "{name}: the pods are worth a look");
        diagnose(Component::Worker, d.as_ref(), &pods)
    }

    fn problem(name: &str) -> Problem {
        diagnose_fixture(name).unwrap_or_else(|| panic!("{name}: a problem"))
    }

    fn assert_contains(message: &str, parts: &[&str]) {
        for p in parts {
            assert!(message.contains(p), "{p:?} not in {message:?}");
        }
    }

    #[test]
    fn a_healthy_deployment_needs_no_pod_list_and_has_no_problem() {
        let (d, pods) = fixture("healthy");
        assert!(!needs_pods(d.as_ref()));
        // Even a past restart in a ready pod is no problem.
        assert_eq!(diagnose(Component::Worker, d.as_ref(), &pods), None);
    }

    #[test]
    fn no_deployment_or_zero_replicas_is_not_a_problem() {
        assert!(!needs_pods(None));
        assert_eq!(diagnose(Component::Worker, None, &[]), None);
        let (d, pods) = fixture("crash-loop-backoff");
        let mut d = d.unwrap();
        d.spec.as_mut().unwrap().replicas = Some(0);
        assert!(!needs_pods(Some(&d)));
        assert_eq!(diagnose(Component::Worker, Some(&d), &pods), None);
    }

    #[test]
    fn image_pull_backoff_names_component_pod_container_image_and_kubelet_message() {
        let p = problem("image-pull-backoff");
        assert_eq!(
            (p.component, p.reason),
            (Component::Worker, Reason::ImagePullFailed)
        );
        assert_eq!(p.reason.as_str(), "ImagePullFailed");
        // The backing-off pod comes first by name; the other is counted.
        assert!(
            p.message.starts_with(
                "worker: 0/2 pods ready; pod orders-worker-7c9f8d6b5-2xk8p: container qp-worker \
                 cannot pull image \"ghcr.io/acme/qp:9.9.9\" (ImagePullBackOff): Back-off pulling \
                 image \"ghcr.io/acme/qp:9.9.9\": ErrImagePull: failed to pull"
            ),
            "{}",
            p.message
        );
        assert!(
            p.message.ends_with("; 1 more pod has problems"),
            "{}",
            p.message
        );
    }

    #[test]
    fn err_image_pull_alone_is_an_image_pull_failure() {
        let (d, pods) = fixture("image-pull-backoff");
        let p = diagnose(Component::Worker, d.as_ref(), &pods[..1]).unwrap();
        assert_eq!(p.reason, Reason::ImagePullFailed);
        assert_contains(
            &p.message,
            &[
                "pod orders-worker-7c9f8d6b5-q9zlm",
                "(ErrImagePull)",
                "not found",
            ],
        );
    }

    #[test]
    fn invalid_image_name_is_an_image_pull_failure() {
        let p = problem("invalid-image-name");
        assert_eq!(p.reason, Reason::ImagePullFailed);
        assert_contains(
            &p.message,
            &[
                "worker: 0/1 pods ready; pod orders-worker-5d8b7f9c4-h2v6r",
                "cannot pull image \"ghcr.io/Acme/QP:1.4.0\" (InvalidImageName)",
                "must be lowercase",
            ],
        );
    }

    #[test]
    fn crash_loop_backoff_reports_restarts_last_exit_and_termination_message() {
        let p = problem("crash-loop-backoff");
        assert_eq!(p.reason, Reason::CrashLooping);
        assert_eq!(p.reason.as_str(), "CrashLooping");
        assert_contains(
            &p.message,
            &[
                "pod orders-worker-6f5d4c3b2-bm4kx: container qp-worker keeps exiting \
                 (CrashLoopBackOff, 4 restarts, last exit code 1 (Error): error: --handler-url: \
                 relative URL without a base): back-off 1m20s",
                "; 1 more pod has problems",
            ],
        );
    }

    #[test]
    fn an_oom_killed_sidecar_is_crash_looping_by_name() {
        let (d, pods) = fixture("crash-loop-backoff");
        let p = diagnose(Component::Worker, d.as_ref(), &pods[..1]).unwrap();
        assert_eq!(p.reason, Reason::CrashLooping);
        assert_contains(
            &p.message,
            &[
                "pod orders-worker-6f5d4c3b2-zt7wd: container handler keeps exiting",
                "6 restarts, last exit code 137 (OOMKilled)",
            ],
        );
    }

    #[test]
    fn repeated_non_zero_exits_are_a_crash_loop_between_back_offs() {
        let p = problem("repeated-exits");
        assert_eq!(p.reason, Reason::CrashLooping);
        assert!(
            p.message.ends_with(
                "pod orders-worker-6f5d4c3b2-bm4kx: container qp-worker keeps exiting \
                 (5 restarts, last exit code 2 (Error))"
            ),
            "{}",
            p.message
        );
        // One failed run is not a crash loop.
        let (d, pods) = fixture("repeated-exits");
        assert_eq!(diagnose(Component::Worker, d.as_ref(), &pods[1..]), None);
    }

    #[test]
    fn an_unschedulable_pod_reports_the_scheduler_message() {
        let p = problem("unschedulable");
        assert_eq!(p.reason, Reason::Unschedulable);
        assert_eq!(
            p.message,
            "worker: 2/3 pods ready; pod orders-worker-7c9f8d6b5-vw5hn: cannot be scheduled: \
             0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: \
             3 No preemption victims found for incoming pod."
        );
    }

    #[test]
    fn a_missing_secret_key_is_a_container_config_error() {
        let p = problem("create-container-config-error");
        assert_eq!(p.reason, Reason::ContainerConfigInvalid);
        assert_eq!(
            p.message,
            "worker: 0/1 pods ready; pod orders-worker-7c9f8d6b5-k4t9s: container qp-worker \
             cannot be started (CreateContainerConfigError): couldn't find key password in \
             Secret apps/orders-redis"
        );
    }

    #[test]
    fn replica_failure_is_reported_when_there_are_no_pods() {
        let p = problem("replica-failure");
        assert_eq!(p.reason, Reason::ReplicaFailure);
        assert_contains(
            &p.message,
            &[
                "worker: 0/2 pods ready; Deployment orders-worker cannot create pods \
                 (FailedCreate): pods \"orders-worker-7c9f8d6b5-8wz2d\" is forbidden: exceeded \
                 quota",
            ],
        );
    }

    #[test]
    fn progress_deadline_is_reported_when_no_pod_says_more() {
        let p = problem("progress-deadline");
        assert_eq!(p.reason, Reason::ProgressDeadlineExceeded);
        assert_eq!(
            p.message,
            "worker: 0/1 pods ready; Deployment orders-worker made no progress \
             (ProgressDeadlineExceeded): ReplicaSet \"orders-worker-58d7b9c6f4\" has timed out \
             progressing."
        );
    }

    #[test]
    fn a_stuck_rollout_behind_ready_old_pods_is_reported() {
        let p = problem("stuck-rollout");
        assert_eq!(p.reason, Reason::ImagePullFailed);
        assert_contains(
            &p.message,
            &[
                "worker: 2/2 pods ready; pod orders-worker-84c6d5f7b9-tq6mz",
                "\"ghcr.io/acme/qp:1.5.0-typo\"",
            ],
        );
    }

    #[test]
    fn starting_and_terminating_pods_are_not_problems() {
        assert_eq!(diagnose_fixture("starting"), None);
    }

    #[test]
    fn the_most_specific_reason_wins_across_pods() {
        let (d, mut pods) = fixture("unschedulable");
        pods.extend(fixture("crash-loop-backoff").1);
        pods.extend(fixture("create-container-config-error").1);
        pods.extend(fixture("image-pull-backoff").1);
        let p = diagnose(Component::Worker, d.as_ref(), &pods).unwrap();
        assert_eq!(p.reason, Reason::ImagePullFailed);
        assert!(
            p.message.ends_with("; 5 more pods have problems"),
            "{}",
            p.message
        );
        // A pod problem is more precise than the Deployment's summary of it.
        let (d, pods) = fixture("progress-deadline");
        let mut crashing = fixture("repeated-exits").1;
        crashing.truncate(1);
        let p = diagnose(Component::Worker, d.as_ref(), &[pods, crashing].concat()).unwrap();
        assert_eq!(p.reason, Reason::CrashLooping);
    }

    #[test]
    fn the_gateway_is_named_as_such() {
        let (d, pods) = fixture("image-pull-backoff");
        let p = diagnose(Component::Gateway, d.as_ref(), &pods).unwrap();
        assert_eq!(p.component, Component::Gateway);
        assert!(
            p.message.starts_with("gateway: 0/2 pods ready; pod "),
            "{}",
            p.message
        );
    }

    #[test]
    fn long_kubelet_messages_are_cut_to_one_line() {
        let (d, mut pods) = fixture("image-pull-backoff");
        let long = format!(
            "rpc error: code = Unknown desc = failed to pull and unpack image\n{}",
            "ghcr.io/acme/qp:9.9.9: ünauthorized ".repeat(40)
        );
        let status = &mut pods[0]
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0];
        status
            .state
            .as_mut()
            .unwrap()
            .waiting
            .as_mut()
            .unwrap()
            .message = Some(long);
        let p = diagnose(Component::Worker, d.as_ref(), &pods[..1]).unwrap();
        assert!(!p.message.contains('\n'), "{}", p.message);
        assert!(p.message.ends_with('…'), "{}", p.message);
        assert!(p.message.len() < 400, "{} bytes", p.message.len());
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("ab€cd", 6), "ab…");
        let huge = "x".repeat(5000);
        assert_eq!(truncate(&huge, MAX_MESSAGE).len(), MAX_MESSAGE);
    }
}
