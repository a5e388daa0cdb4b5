//! The Kubernetes backend: a kube-runtime `Controller` for QueueProcessors.
//!
//! Each reconcile is fetch -> validate -> build -> apply -> status:
//! 1. validate the spec and resolve every Secret it references; on a problem, say so in the
//!    `Ready` condition and an event and apply *nothing* (no half-applied workloads);
//! 2. measure the source and the workers' counters ([`crate::measure`]) and take one scaling
//!    decision ([`crate::scaler`], the same code local mode runs);
//! 3. server-side-apply the worker Deployment (and the gateway Deployment and Service) with one
//!    field manager and an owner reference, so deletion is garbage collection;
//! 4. when a Deployment has fewer ready, available or up-to-date replicas than it wants, list its
//!    pods and ask [`crate::health`] why (bad image, crash loop, unschedulable, config error,
//!    Deployment failure), so `Ready` says so instead of only what measurement saw;
//! 5. write the token limit into Redis, patch the status, emit events for scale decisions,
//!    error classes and pod problems (one per transition), update metrics;
//! 6. requeue after `pollIntervalSeconds`: the decision loop is the reconcile loop.
//!
//! Deleting a QueueProcessor first deletes its Deployments and waits for their pods to stop
//! (they drain through the token keys), then runs the finalizer: its token and counter keys are
//! removed from Redis (results expire by TTL).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use qp_protocol::keys::Keys;
use serde_json::json;
use tracing::{info, instrument, warn};

use crate::builder::{self, BuildOptions, FIELD_MANAGER};
use crate::crd::{
    API_VERSION, CONDITION_READY, ConditionStatus, KIND, QueueProcessor, QueueProcessorStatus,
    SecretKeyRef,
};
use crate::error::{Error, Result};
use crate::health::{self, Problem};
use crate::measure::Probes;
use crate::metrics::Metrics;
use crate::scaler::{self, Scaler};
use crate::tick::{self, Replicas, Resolved, Tick};
use crate::workload::Component;

pub const FINALIZER: &str = "queueprocessing.dev/cleanup";

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub probes: Probes,
    pub build: BuildOptions,
    /// Decision memory per QueueProcessor (`namespace/name`).
    scalers: Mutex<HashMap<String, Scaler>>,
    /// Last error class reported per QueueProcessor, so an event is emitted per transition
    /// rather than per poll.
    last_error: Mutex<HashMap<String, &'static str>>,
    /// Last pod problem reported per QueueProcessor (component and reason), for the same
    /// reason. Kept apart from `last_error` so a source error and a pod problem at the same
    /// time do not take turns emitting events.
    last_health: Mutex<HashMap<String, (Component, health::Reason)>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, build: BuildOptions, identity: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_owned()),
            },
        );
        Context {
            client,
            recorder,
            metrics,
            probes: Probes::default(),
            build,
            scalers: Mutex::default(),
            last_error: Mutex::default(),
            last_health: Mutex::default(),
        }
    }
}

/// Run the controller until the process is asked to stop.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (qps, deployments, services) = match &namespace {
        Some(ns) => (
            Api::<QueueProcessor>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<QueueProcessor>::all(client.clone()),
            Api::<Deployment>::all(client.clone()),
            Api::<Service>::all(client.clone()),
        ),
    };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=qp-operator");
    Controller::new(qps, watcher::Config::default().any_semantic())
        .owns(deployments, owned.clone())
        .owns(services, owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn key(qp: &QueueProcessor) -> String {
    format!("{}/{}", qp.namespace_or_default(), qp.name_any())
}

/// One reconcile; its span names the QueueProcessor, so every log line under it does too.
/// (The field is `qp`, not `name`: JSON logs put the span's own `name` beside its fields.)
#[instrument(skip_all, fields(qp = %key(&qp)))]
async fn reconcile(qp: Arc<QueueProcessor>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let api: Api<QueueProcessor> = Api::namespaced(ctx.client.clone(), &qp.namespace_or_default());
    if qp.metadata.deletion_timestamp.is_some()
        && qp.finalizers().iter().any(|f| f == FINALIZER)
        && let Some(wait) = stop_pods(&qp, &ctx).await?
    {
        return Ok(Action::requeue(wait));
    }
    let res = finalizer(&api, FINALIZER, qp, |event| async {
        match event {
            Finalizer::Apply(qp) => apply(&qp, &ctx).await,
            Finalizer::Cleanup(qp) => cleanup(&qp, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .with_label_values(&[if res.is_ok() { "ok" } else { "error" }])
        .inc();
    res
}

fn error_policy(_qp: Arc<QueueProcessor>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.kind()])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// Secret values the operator itself needs (Redis password, Kafka credentials), by reference.
/// Every reference must resolve, or nothing is applied.
async fn resolve_secrets(
    client: &Client,
    namespace: &str,
    refs: &[&SecretKeyRef],
) -> Result<HashMap<(String, String), String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut out = HashMap::new();
    let mut cache: HashMap<String, Secret> = HashMap::new();
    for r in refs {
        if !cache.contains_key(&r.name) {
            let s = api.get_opt(&r.name).await?.ok_or_else(|| {
                Error::SecretRef(format!("Secret {namespace}/{} does not exist", r.name))
            })?;
            cache.insert(r.name.clone(), s);
        }
        let secret = &cache[&r.name];
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .cloned()
            })
            .ok_or_else(|| {
                Error::SecretRef(format!(
                    "Secret {namespace}/{} has no key {:?}",
                    r.name, r.key
                ))
            })?;
        out.insert((r.name.clone(), r.key.clone()), value);
    }
    Ok(out)
}

async fn apply(qp: &QueueProcessor, ctx: &Context) -> Result<Action> {
    // Validate everything before touching anything.
    let resolved = match resolve(qp, ctx).await {
        Ok(r) => r,
        Err(e @ (Error::InvalidSpec(_) | Error::SecretRef(_))) => {
            report_invalid(qp, ctx, &e).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Err(e) => return Err(e),
    };

    let mut deployment = DeploymentReplicas {
        qp,
        ctx,
        resolved: &resolved,
        api: Api::namespaced(ctx.client.clone(), &resolved.namespace),
        name: builder::object_name(qp, Component::Worker),
        existing: None,
        applied: None,
        gateway: None,
    };
    // The decision memory leaves the map for the tick (no lock across awaits); kube-runtime
    // never reconciles one object twice at once, so nobody else wants it meanwhile.
    let mut scaler = ctx
        .scalers
        .lock()
        .expect("scalers lock")
        .remove(&key(qp))
        .unwrap_or_default();
    let tick = tick::run(
        &resolved,
        &ctx.probes,
        &mut scaler,
        &mut deployment,
        &ctx.metrics,
    )
    .await;
    ctx.scalers
        .lock()
        .expect("scalers lock")
        .insert(key(qp), scaler);
    let mut tick = tick?;
    // The replica count is applied: say so before anything else can fail. The next tick sees
    // the new count as current and would never announce this change.
    publish_events(qp, ctx, &tick.observed, &tick.step, tick.current).await;
    publish_health_events(qp, ctx, tick.problem.as_ref()).await;
    // A token limit that could not be written fails the reconcile (retried in 5 s), as before
    // the status is written.
    std::mem::replace(&mut tick.tokens, Ok(()))?;

    write_status(qp, ctx, &tick).await?;
    Ok(Action::requeue(resolved.poll))
}

/// Validate the spec and resolve every Secret it references.
async fn resolve(qp: &QueueProcessor, ctx: &Context) -> Result<Resolved> {
    qp.spec
        .validate()
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let secrets = resolve_secrets(
        &ctx.client,
        &qp.namespace_or_default(),
        &qp.spec.secret_refs(),
    )
    .await?;
    Resolved::new(qp, &secrets)
}

/// The worker Deployment as the place replicas run: read once per tick, server-side applied
/// with the decided count (then the gateway's objects), and diagnosed when short of ready pods.
struct DeploymentReplicas<'a> {
    qp: &'a QueueProcessor,
    ctx: &'a Context,
    resolved: &'a Resolved,
    api: Api<Deployment>,
    name: String,
    existing: Option<Deployment>,
    applied: Option<Deployment>,
    gateway: Option<Deployment>,
}

impl Replicas for DeploymentReplicas<'_> {
    async fn current(&mut self) -> Result<Option<u32>> {
        self.existing = self.api.get_opt(&self.name).await?;
        Ok(self
            .existing
            .as_ref()
            .and_then(|d| d.spec.as_ref()?.replicas)
            .map(|r| r.max(0) as u32))
    }

    async fn ready(&mut self) -> Result<u32> {
        Ok(self
            .existing
            .as_ref()
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0)
            .max(0) as u32)
    }

    async fn apply(&mut self, replicas: u32) -> Result<()> {
        let dep = builder::deployment(
            self.qp,
            &self.resolved.worker,
            replicas as i32,
            &self.ctx.build,
        );
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.applied = Some(self.api.patch(&self.name, &pp, &Patch::Apply(&dep)).await?);
        // The gateway after the workers: a gateway that cannot be applied must not stop the
        // workers from scaling.
        self.gateway = apply_gateway(self.qp, self.ctx, self.resolved, &pp).await?;
        Ok(())
    }

    async fn health(&mut self) -> Option<Problem> {
        let worker = self.applied.as_ref()?;
        diagnose_pods(self.qp, self.ctx, worker, self.gateway.as_ref()).await
    }
}

/// Apply the gateway's Deployment and Service when enabled (returning the applied Deployment),
/// delete them otherwise.
async fn apply_gateway(
    qp: &QueueProcessor,
    ctx: &Context,
    resolved: &Resolved,
    pp: &PatchParams,
) -> Result<Option<Deployment>> {
    let ns = qp.namespace_or_default();
    let name = builder::object_name(qp, Component::Gateway);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(cfg) = &resolved.gateway {
        let dep = builder::deployment(qp, cfg, qp.spec.gateway.replicas, &ctx.build);
        let applied = deployments.patch(&name, pp, &Patch::Apply(&dep)).await?;
        services
            .patch(&name, pp, &Patch::Apply(&builder::gateway_service(qp)))
            .await?;
        Ok(Some(applied))
    } else {
        for res in [
            deployments
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
            services
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            match res {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }
}

/// Why the worker (else the gateway) pods cannot run, if they cannot ([`health::diagnose`]).
/// Pods are listed only for a Deployment short of ready, available or up-to-date replicas, so a
/// healthy QueueProcessor costs no extra API call. The list is served from the API server's
/// cache (`resourceVersion=0`): a status a moment old is fine for a diagnosis repeated every
/// poll. A failed list (for example RBAC from an older chart without `pods: list`) is logged
/// and the diagnosis falls back to the Deployment's own conditions: explaining is best effort
/// and must never stop the reconcile.
async fn diagnose_pods(
    qp: &QueueProcessor,
    ctx: &Context,
    worker: &Deployment,
    gateway: Option<&Deployment>,
) -> Option<Problem> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &qp.namespace_or_default());
    for (component, dep) in [
        (Component::Worker, Some(worker)),
        (Component::Gateway, gateway),
    ] {
        if !health::needs_pods(dep) {
            continue;
        }
        let selector = builder::selector_labels(qp, component)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods = match api
            .list(&ListParams::default().labels(&selector).match_any())
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                warn!(component = component.as_str(), error = %e,
                    "listing pods failed; diagnosing from the Deployment alone");
                Vec::new()
            }
        };
        if let Some(p) = health::diagnose(component, dep, &pods) {
            return Some(p);
        }
    }
    None
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

/// Server-side apply of the status subresource with our field manager.
async fn patch_status(
    qp: &QueueProcessor,
    ctx: &Context,
    status: &QueueProcessorStatus,
) -> Result<()> {
    let api: Api<QueueProcessor> = Api::namespaced(ctx.client.clone(), &qp.namespace_or_default());
    let body = json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    api.patch_status(
        &qp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn report_invalid(qp: &QueueProcessor, ctx: &Context, err: &Error) -> Result<()> {
    let mut status = qp.status.clone().unwrap_or_default();
    status.observed_generation = qp.metadata.generation;
    status.set_condition(
        CONDITION_READY,
        ConditionStatus::False,
        err.kind(),
        err.to_string(),
        qp.metadata.generation,
        now_time(),
    );
    status.refresh_summary(&qp.spec);
    patch_status(qp, ctx, &status).await?;
    if remember_error(ctx, qp, Some(err.kind())) {
        publish(
            ctx,
            qp,
            EventType::Warning,
            err.kind(),
            "Validate",
            err.to_string(),
        )
        .await;
    }
    warn!(error = %err, "not applying an invalid QueueProcessor");
    Ok(())
}

/// Record the current value of one transition memory for a QueueProcessor. Returns the previous
/// value when it changed (worth an event), `None` when it did not: events mark transitions
/// rather than repeat every poll.
fn remember<T: Copy + PartialEq>(
    map: &Mutex<HashMap<String, T>>,
    qp: &QueueProcessor,
    value: Option<T>,
) -> Option<Option<T>> {
    let mut map = map.lock().expect("transition memory lock");
    let k = key(qp);
    let prev = match value {
        Some(v) => map.insert(k, v),
        None => map.remove(&k),
    };
    (prev != value).then_some(prev)
}

/// Record the current error class; true when it changed (worth an event).
fn remember_error(ctx: &Context, qp: &QueueProcessor, kind: Option<&'static str>) -> bool {
    remember(&ctx.last_error, qp, kind).is_some()
}

async fn publish(
    ctx: &Context,
    qp: &QueueProcessor,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &qp.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
}

async fn write_status(qp: &QueueProcessor, ctx: &Context, tick: &Tick) -> Result<()> {
    let mut status = qp.status.clone().unwrap_or_default();
    let generation = qp.metadata.generation;
    scaler::fill_status_with_health(
        &mut status,
        &tick.observed,
        &tick.step,
        tick.ready,
        tick.problem.as_ref(),
        generation,
        now_time(),
    );
    status.refresh_summary(&qp.spec);
    patch_status(qp, ctx, &status).await
}

async fn publish_events(
    qp: &QueueProcessor,
    ctx: &Context,
    observed: &scaler::Observed,
    step: &scaler::Step,
    current: u32,
) {
    if step.decision.changed {
        let verb = if step.decision.replicas > current {
            "ScaledUp"
        } else {
            "ScaledDown"
        };
        let note = format!(
            "replicas {current} -> {}: {}",
            step.decision.replicas, step.decision.reason
        );
        info!(%note, "scaled");
        publish(ctx, qp, EventType::Normal, verb, "Scale", note).await;
    }
    let error = observed
        .source
        .as_ref()
        .err()
        .or(observed.workers.as_ref().err());
    if remember_error(ctx, qp, error.map(Error::kind)) {
        match error {
            Some(e) => {
                publish(
                    ctx,
                    qp,
                    EventType::Warning,
                    e.kind(),
                    "Measure",
                    format!("{e}; holding {current} replicas"),
                )
                .await
            }
            None => {
                publish(
                    ctx,
                    qp,
                    EventType::Normal,
                    "SourceReachable",
                    "Measure",
                    "source and Redis measured again".into(),
                )
                .await
            }
        }
    }
}

/// A Warning event when the pods start failing or fail for another reason, a Normal one when
/// they recover: one per transition, like the measurement errors.
async fn publish_health_events(qp: &QueueProcessor, ctx: &Context, problem: Option<&Problem>) {
    let Some(before) = remember(
        &ctx.last_health,
        qp,
        problem.map(|p| (p.component, p.reason)),
    ) else {
        return;
    };
    match problem {
        Some(p) => {
            warn!(reason = p.reason.as_str(), message = %p.message,
                "pods cannot run");
            publish(
                ctx,
                qp,
                EventType::Warning,
                p.reason.as_str(),
                "CheckPods",
                p.message.clone(),
            )
            .await
        }
        None => {
            let note = match before {
                Some((component, reason)) => format!(
                    "{} pods recovered from {}",
                    component.as_str(),
                    reason.as_str()
                ),
                None => "pods recovered".to_owned(),
            };
            info!(%note, "pods recovered");
            publish(
                ctx,
                qp,
                EventType::Normal,
                "PodsRecovered",
                "CheckPods",
                note,
            )
            .await
        }
    }
}

/// Before the finalizer removes any key: delete the Deployments and wait until their pods are
/// gone. A worker that is still draining releases its leases and returns unfinished messages
/// through those keys, and a running worker would write its heartbeat and lease keys back after
/// they were removed (left behind for good). Deleting the Deployments here rather than leaving
/// them to garbage collection (which only starts once the QueueProcessor is gone) puts the
/// steps in that order. Returns how long to wait before looking again, or `None` when no pod is
/// left or the wait has lasted the pods' grace period plus a margin; then a Warning says that
/// keys are removed under running pods (a node that stopped reporting keeps pods "Terminating"
/// forever, and deletion must not hang on it).
async fn stop_pods(qp: &QueueProcessor, ctx: &Context) -> Result<Option<Duration>> {
    let ns = qp.namespace_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut running = 0;
    for component in [Component::Worker, Component::Gateway] {
        match deployments
            .delete(
                &builder::object_name(qp, component),
                &DeleteParams::background(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let selector = builder::selector_labels(qp, component)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        running += pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .len();
    }
    if running == 0 {
        return Ok(None);
    }
    let grace = qp.spec.worker.shutdown_timeout_seconds.max(0) as u64 + 10;
    let waited = qp
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| Timestamp::now().duration_since(t.0).as_secs().max(0) as u64)
        .unwrap_or(0);
    if waited < grace + STOP_MARGIN_SECONDS {
        info!(
            running,
            "waiting for pods to stop before removing Redis keys"
        );
        return Ok(Some(Duration::from_secs(2)));
    }
    publish(
        ctx,
        qp,
        EventType::Warning,
        "PodsNotStopped",
        "Cleanup",
        format!(
            "{running} pod(s) still present {waited} s after deletion; removing Redis keys anyway"
        ),
    )
    .await;
    Ok(None)
}

/// How long past the pods' grace period deletion waits for them before removing keys anyway.
const STOP_MARGIN_SECONDS: u64 = 30;

/// Finalizer: remove the QueueProcessor's token and counter keys; results expire on their own.
/// Runs once [`stop_pods`] saw no pod left.
async fn cleanup(qp: &QueueProcessor, ctx: &Context) -> Result<Action> {
    let ns = qp.namespace_or_default();
    let name = qp.name_any();
    let secrets = resolve_secrets(&ctx.client, &ns, &qp.spec.secret_refs()).await;
    match secrets.and_then(|s| scaler::redis_settings(&qp.spec.redis, &s)) {
        Ok(redis) => {
            let keys = Keys::new(&ns, &name);
            scaler::delete_keys(&ctx.probes, &redis, &keys).await?;
            info!("removed token and counter keys from Redis");
        }
        // Without its Secret the Redis cannot be reached; the keys then only expire by TTL
        // (leases) or stay (counters). Do not block deletion forever on that.
        Err(e) => warn!(error = %e, "cannot reach Redis to clean up; leaving keys"),
    }
    ctx.scalers.lock().expect("scalers lock").remove(&key(qp));
    ctx.last_error
        .lock()
        .expect("last_error lock")
        .remove(&key(qp));
    ctx.last_health
        .lock()
        .expect("last_health lock")
        .remove(&key(qp));
    ctx.metrics.forget(&ns, &name);
    publish(
        ctx,
        qp,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        "Redis keys removed".into(),
    )
    .await;
    Ok(Action::await_change())
}
