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
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{instrument, warn};

use crate::builder::{self, BuildOptions, FIELD_MANAGER};
use crate::crd::QueueProcessor;
use crate::error::{Error, Result};
use crate::health;
use crate::measure::Probes;
use crate::metrics::Metrics;
use crate::scaler::Scaler;
use crate::tick::{self, Resolved};
use crate::workload::Component;

mod cleanup;
mod events;
mod objects;
mod recorder;
mod secrets;
mod slim;
mod status;

use cleanup::{cleanup, stop_pods};
use events::{publish, publish_events, publish_health_events, remember_failure};
use objects::DeploymentReplicas;
use recorder::Recorder;
use status::{report_failure, write_status};

pub const FINALIZER: &str = "queueprocessing.dev/cleanup";

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    recorder: Recorder,
    pub metrics: Metrics,
    pub probes: Probes,
    pub build: BuildOptions,
    /// How long after deletion the finalizer tries to remove Redis keys ([`cleanup`]).
    cleanup_timeout: Duration,
    /// The Deployments and Services this operator manages, as its watches last saw them: a
    /// tick reads these instead of asking the API server, so a steady workload costs no
    /// request per poll.
    deployments: Store<Deployment>,
    services: Store<Service>,
    /// Set once both stores have listed ([`Context::caches_ready`]).
    caches_ready: tokio::sync::OnceCell<()>,
    /// The writers of those stores, taken by [`run`].
    writers: Mutex<Option<(Writer<Deployment>, Writer<Service>)>>,
    /// What one QueueProcessor's ticks remember (`namespace/name`).
    memory: Mutex<HashMap<String, Memory>>,
    /// Last error class reported per QueueProcessor, so an event is emitted per transition
    /// rather than per poll.
    last_error: Mutex<HashMap<String, &'static str>>,
    /// Last failure to validate, apply or write the token limit per QueueProcessor, kept apart
    /// from measurement errors so the two do not take turns emitting events.
    last_failure: Mutex<HashMap<String, &'static str>>,
    /// Last pod problem reported per QueueProcessor (component and reason), for the same
    /// reason. Kept apart from `last_error` so a source error and a pod problem at the same
    /// time do not take turns emitting events.
    last_health: Mutex<HashMap<String, (Component, health::Reason)>>,
}

/// What a QueueProcessor's ticks carry from one to the next.
#[derive(Default)]
pub(super) struct Memory {
    /// The object this memory belongs to.
    uid: Option<String>,
    /// The decision memory (rates, windows, capacity).
    scaler: Scaler,
    /// The objects as the API server returned them from our last apply: fresher than the
    /// watch cache right after a write.
    applied: objects::Applied,
    /// The status as last written.
    status: status::Written,
    /// Failures to apply or write the token limit in a row (for the retry backoff).
    failures: u32,
    /// Secret values, re-read once they are [`secrets::MAX_AGE`] old or the spec changed.
    secrets: Option<secrets::Cached>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        build: BuildOptions,
        identity: &str,
        cleanup_timeout: Duration,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_owned()),
            },
        );
        let (deployments, deployment_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        Context {
            client,
            recorder,
            metrics,
            probes: Probes::default(),
            build,
            cleanup_timeout,
            deployments,
            services,
            caches_ready: tokio::sync::OnceCell::new(),
            writers: Mutex::new(Some((deployment_writer, service_writer))),
            memory: Mutex::default(),
            last_error: Mutex::default(),
            last_failure: Mutex::default(),
            last_health: Mutex::default(),
        }
    }

    /// Take a QueueProcessor's memory out for one reconcile (no lock across awaits);
    /// kube-runtime never reconciles one object twice at once, so nobody else wants it
    /// meanwhile. Put it back with [`Context::put_memory`].
    fn take_memory(&self, qp: &QueueProcessor) -> Memory {
        let memory = self.memory.lock().expect("memory lock").remove(&key(qp));
        match memory {
            // The same object: go on from where it was.
            Some(m) if m.uid == qp.metadata.uid => m,
            // New to this process (it just became the leader, or the object is new), or made
            // again under the same name (its finalizer removed by hand, say): nothing of an old
            // object's memory applies, but what the status remembers does (a previous leader
            // wrote it for this object).
            _ => Memory {
                uid: qp.metadata.uid.clone(),
                scaler: Scaler::resume(
                    qp.status.as_ref(),
                    jiff::Timestamp::now(),
                    crate::tick::monotonic_ms(),
                ),
                ..Memory::default()
            },
        }
    }

    fn put_memory(&self, qp: &QueueProcessor, memory: Memory) {
        self.memory
            .lock()
            .expect("memory lock")
            .insert(key(qp), memory);
    }

    /// Wait until the watch caches have listed once, or a missing Deployment would read as
    /// "none yet". Only one task waits on the stores themselves: kube's `Store::wait_until_ready`
    /// keeps the waker of one waiter only, and the first reconciles, started together, hung
    /// there for good. The others wait on this `OnceCell`. (A store's wait fails only when its
    /// writer is gone, that is when the controller is stopping.)
    async fn caches_ready(&self) {
        self.caches_ready
            .get_or_init(|| async {
                let _ = self.deployments.wait_until_ready().await;
                let _ = self.services.wait_until_ready().await;
            })
            .await;
    }

    /// Forget a deleted QueueProcessor.
    fn forget(&self, qp: &QueueProcessor) {
        let k = key(qp);
        self.probes.forget(&k);
        self.memory.lock().expect("memory lock").remove(&k);
        self.last_error.lock().expect("last_error lock").remove(&k);
        self.last_failure
            .lock()
            .expect("last_failure lock")
            .remove(&k);
        self.last_health
            .lock()
            .expect("last_health lock")
            .remove(&k);
    }
}

/// Which changes to a QueueProcessor start a reconcile: its spec (generation), its annotations
/// (pause) and its finalizers (the finalizer helper waits for its own patch to come back).
/// Not its status: every reconcile writes status that moves under traffic, and reacting to
/// our own write would start the next reconcile at once instead of after the poll interval.
fn qp_trigger(qp: &QueueProcessor) -> Option<u64> {
    predicates::generation
        .combine(predicates::annotations)
        .combine(predicates::finalizers)
        .hash_property(qp)
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
    let (deployment_writer, service_writer) = ctx
        .writers
        .lock()
        .expect("writers lock")
        .take()
        .expect("controller::run is called once per Context");
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=qp-operator");
    // The caches keep slim copies (slim.rs): a thousand full Deployments were most of the
    // operator's memory.
    let owned_deployments = watcher(deployments, owned.clone())
        .default_backoff()
        .modify(slim::deployment)
        .reflect(deployment_writer)
        .touched_objects();
    let owned_services = watcher(services, owned)
        .default_backoff()
        .modify(slim::service)
        .reflect(service_writer)
        .touched_objects();
    let (qp_store, qp_writer) = reflector::store();
    let triggers = watcher(qps, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(slim::queue_processor)
        .reflect(qp_writer)
        .touched_objects()
        .predicate_filter(qp_trigger, Default::default());
    Controller::for_stream(triggers, qp_store)
        .owns_stream(owned_deployments)
        .owns_stream(owned_services)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

pub(super) fn key(qp: &QueueProcessor) -> String {
    format!("{}/{}", qp.namespace_or_default(), qp.name_any())
}

/// One reconcile; its span names the QueueProcessor, so every log line under it does too.
/// (The field is `qp`, not `name`: JSON logs put the span's own `name` beside its fields.)
#[instrument(skip_all, fields(qp = %key(&qp)))]
async fn reconcile(qp: Arc<QueueProcessor>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    tracing::debug!("reconcile starts");
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

async fn apply(qp: &QueueProcessor, ctx: &Context) -> Result<Action> {
    ctx.caches_ready().await;
    let mut memory = ctx.take_memory(qp);
    let res = apply_with(qp, ctx, &mut memory).await;
    ctx.put_memory(qp, memory);
    res
}

async fn apply_with(qp: &QueueProcessor, ctx: &Context, memory: &mut Memory) -> Result<Action> {
    // Validate everything before touching anything.
    let resolved = match resolve(qp, ctx, &mut memory.secrets).await {
        Ok(r) => r,
        Err(e @ (Error::InvalidSpec(_) | Error::SecretRef(_))) => {
            report_failure(qp, ctx, &e, "Validate", &mut memory.status).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Err(e) => return Err(e),
    };
    let mut deployment = DeploymentReplicas::new(qp, ctx, &resolved, &mut memory.applied);
    let tick = tick::run(
        &resolved,
        &ctx.probes,
        &mut memory.scaler,
        &mut deployment,
        &ctx.metrics,
    )
    .await;
    let tick = match tick {
        Ok(t) => t,
        // The replica count could not be applied: say so where `kubectl get qp` shows it, and
        // try again later and later rather than every few seconds.
        Err(e) => {
            report_failure(qp, ctx, &e, "Apply", &mut memory.status).await?;
            memory.failures += 1;
            return Ok(Action::requeue(failure_backoff(memory.failures)));
        }
    };
    // The replica count is applied: say so before anything else can fail. The next tick sees
    // the new count as current and would never announce this change.
    publish_events(qp, ctx, &tick.observed, &tick.step, tick.current).await;
    publish_health_events(qp, ctx, tick.problem.as_ref()).await;
    // A token limit that could not be written makes Ready False with its own Warning: the
    // workers keep the old limit, which no longer matches the replicas.
    let failure = tick.tokens.as_ref().err();
    // Refused credentials are most likely rotated ones: read the Secrets again at the next tick
    // rather than within a minute (`secrets::MAX_AGE`), so a fixed Secret heals at once. It
    // costs a read per Secret per tick only while refused.
    let refused = [
        tick.observed.source.as_ref().err(),
        tick.observed.workers.as_ref().err(),
        failure,
    ]
    .into_iter()
    .flatten()
    .any(Error::is_refusal);
    if refused {
        memory.secrets = None;
    }
    // Someone else set the replica count (an HPA, `kubectl scale`): the apply took it back,
    // and both sides would go on fighting unseen. Say who.
    let contested = deployment.contested.take().map(|(manager, replicas)| {
        let set = replicas.map_or_else(|| "set".to_owned(), |r| format!("set to {r}"));
        format!(
            "spec.replicas of {} was {set} by field manager {manager:?}; the operator owns it \
             and set it back. Remove the HorizontalPodAutoscaler or whatever scales it, or pause \
             the QueueProcessor (annotation queueprocessing.dev/paused) to hold replicas",
            builder::object_name(qp, Component::Worker)
        )
    });
    if let Some(note) = &contested {
        warn!(%note, "replicas contested");
        publish(
            ctx,
            qp,
            EventType::Warning,
            "ReplicasContested",
            "Scale",
            note.clone(),
        )
        .await;
    }
    write_status(
        qp,
        ctx,
        &tick,
        status::Notes {
            failure,
            contested: contested.as_deref(),
        },
        &mut memory.status,
    )
    .await?;
    if remember_failure(ctx, qp, failure.map(Error::kind))
        && let Some(e) = failure
    {
        publish(
            ctx,
            qp,
            EventType::Warning,
            e.kind(),
            "SetTokenLimit",
            format!("writing the token limit failed: {e}"),
        )
        .await;
    }
    memory.failures = 0;
    Ok(Action::requeue(resolved.poll))
}

/// The first retry after a failure to apply; doubled per failure in a row, up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

fn failure_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_RETRY * 2u32.pow(doublings)).min(MAX_RETRY)
}

/// Validate the spec and resolve every Secret it references (from `cache` while fresh).
async fn resolve(
    qp: &QueueProcessor,
    ctx: &Context,
    cache: &mut Option<secrets::Cached>,
) -> Result<Resolved> {
    qp.spec
        .validate()
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let secrets = secrets::resolve(&ctx.client, qp, cache).await?;
    Resolved::new(qp, &secrets)
}

pub(super) fn now_time() -> Time {
    Time(Timestamp::now())
}
