//! The Kubernetes objects a QueueProcessor owns: the worker Deployment as the place replicas
//! run, the gateway's Deployment and Service, and the pod diagnosis.
//!
//! Reads come from the controller's watch caches, and an object is applied only when what we
//! would apply differs from what is there (a hash of the applied object travels in an
//! annotation): a steady workload costs no API request per poll. Only objects this
//! QueueProcessor controls (owner reference with its uid) are ever deleted.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use super::Context;
use crate::builder::{self, FIELD_MANAGER};
use crate::crd::QueueProcessor;
use crate::error::{Error, Result};
use crate::health::{self, Problem};
use crate::tick::{Replicas, Resolved};
use crate::workload::Component;

/// Annotation carrying a hash of the object as the operator last applied it.
pub(super) const APPLIED_HASH: &str = "queueprocessing.dev/applied-hash";

/// The objects as the API server returned them from our last apply. Right after a write the
/// watch cache may not have the new version yet; this copy then says what is there.
#[derive(Default)]
pub(super) struct Applied {
    worker: Option<Deployment>,
}

/// Put a hash of `obj` into its [`APPLIED_HASH`] annotation and return it.
///
/// `DefaultHasher::new()` is deterministic within a build; a new operator version may hash
/// differently, which costs one re-apply per object, nothing more.
fn stamp<K: Resource + Serialize>(obj: &mut K) -> Result<String> {
    let mut h = DefaultHasher::new();
    serde_json::to_string(obj)?.hash(&mut h);
    let hash = format!("{:016x}", h.finish());
    obj.annotations_mut()
        .insert(APPLIED_HASH.into(), hash.clone());
    Ok(hash)
}

fn stamped<K: Resource>(obj: &K, hash: &str) -> bool {
    obj.annotations().get(APPLIED_HASH).map(String::as_str) == Some(hash)
}

/// Whether `obj` is controlled by `qp` (a controller owner reference with its uid).
pub(super) fn controlled_by<K: Resource>(obj: &K, qp: &QueueProcessor) -> bool {
    let Some(uid) = qp.metadata.uid.as_deref() else {
        return false;
    };
    obj.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// The cached copy of `name` in `qp`'s namespace.
fn cached<K>(store: &Store<K>, qp: &QueueProcessor, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(&qp.namespace_or_default()))
}

/// Server-side apply `desired` unless `live` already is what we would apply (`same` adds
/// checks the hash cannot make, such as a replica count someone else changed). Returns the
/// object as it now is.
async fn apply_if_changed<K>(
    api: &Api<K>,
    mut desired: K,
    live: Option<K>,
    same: impl Fn(&K) -> bool,
) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let hash = stamp(&mut desired)?;
    if let Some(live) = live
        && stamped(&live, &hash)
        && same(&live)
    {
        return Ok(live);
    }
    let name = desired.name_any();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &pp, &Patch::Apply(&desired))
        .await
        .map_err(|e| Error::Apply(format!("applying {name}: {e}")))
}

/// Who else set the Deployment's `spec.replicas`, if anyone: a field manager other than ours
/// that owns the field (an HPA through the scale subresource, `kubectl scale`, a GitOps tool
/// applying a manifest with `replicas`). Our forced apply takes the field back, so this sees
/// each write of theirs once, at the next tick.
pub(super) fn replicas_owner(live: &Deployment) -> Option<(String, Option<i32>)> {
    let fields = live.metadata.managed_fields.as_ref()?;
    fields
        .iter()
        .filter(|m| m.manager.as_deref() != Some(FIELD_MANAGER))
        .find(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec")?.get("f:replicas"))
                .is_some()
        })
        .map(|m| {
            (
                m.manager.clone().unwrap_or_else(|| "(unnamed)".into()),
                live.spec.as_ref().and_then(|s| s.replicas),
            )
        })
}

/// The newer of two copies of one object (by generation; the cache's copy wins a tie, as its
/// status is at least as fresh).
fn newest(cached: Option<Arc<Deployment>>, applied: Option<&Deployment>) -> Option<Deployment> {
    let generation = |d: &Deployment| d.metadata.generation.unwrap_or(0);
    match (cached, applied) {
        (Some(c), Some(a)) if generation(a) > generation(&c) => Some(a.clone()),
        (Some(c), _) => Some((*c).clone()),
        (None, a) => a.cloned(),
    }
}

/// The worker Deployment as the place replicas run: read from the watch cache, applied with
/// the decided count only when something changed (then the gateway's objects), and diagnosed
/// when short of ready pods.
pub(super) struct DeploymentReplicas<'a> {
    qp: &'a QueueProcessor,
    ctx: &'a Context,
    resolved: &'a Resolved,
    applied: &'a mut Applied,
    api: Api<Deployment>,
    name: String,
    /// The worker Deployment as it is now (read, then applied).
    worker: Option<Deployment>,
    gateway: Option<Deployment>,
    /// Another field manager had set the replica count ([`replicas_owner`]) before this
    /// tick's apply took it back: who, and to what.
    pub(super) contested: Option<(String, Option<i32>)>,
}

impl<'a> DeploymentReplicas<'a> {
    pub(super) fn new(
        qp: &'a QueueProcessor,
        ctx: &'a Context,
        resolved: &'a Resolved,
        applied: &'a mut Applied,
    ) -> Self {
        DeploymentReplicas {
            qp,
            ctx,
            resolved,
            applied,
            api: Api::namespaced(ctx.client.clone(), &resolved.namespace),
            name: builder::object_name(qp, Component::Worker),
            worker: None,
            gateway: None,
            contested: None,
        }
    }
}

impl Replicas for DeploymentReplicas<'_> {
    async fn current(&mut self) -> Result<Option<u32>> {
        let cached = cached(&self.ctx.deployments, self.qp, &self.name);
        // Forget an applied copy of a Deployment that is gone (deleted by hand): the cache
        // must not be outvoted by a ghost.
        if cached.is_none() {
            self.applied.worker = None;
        }
        self.worker = newest(cached, self.applied.worker.as_ref());
        Ok(self
            .worker
            .as_ref()
            .and_then(|d| d.spec.as_ref()?.replicas)
            .map(|r| r.max(0) as u32))
    }

    async fn ready(&mut self) -> Result<u32> {
        Ok(self
            .worker
            .as_ref()
            .and_then(|d| d.status.as_ref()?.ready_replicas)
            .unwrap_or(0)
            .max(0) as u32)
    }

    async fn apply(&mut self, replicas: u32) -> Result<()> {
        let desired = builder::deployment(
            self.qp,
            &self.resolved.worker,
            replicas as i32,
            &self.ctx.build,
        );
        let want = Some(replicas as i32);
        self.contested = self.worker.as_ref().and_then(replicas_owner);
        // Contested: apply even if the count matches, to own the field again.
        let contested = self.contested.is_some();
        let mut now = apply_if_changed(&self.api, desired, self.worker.take(), |live| {
            !contested && live.spec.as_ref().and_then(|s| s.replicas) == want
        })
        .await?;
        super::slim::deployment(&mut now);
        self.applied.worker = Some(now.clone());
        self.worker = Some(now);
        // The gateway after the workers: a gateway that cannot be applied must not stop the
        // workers from scaling.
        self.gateway = apply_gateway(self.qp, self.ctx, self.resolved).await?;
        Ok(())
    }

    async fn health(&mut self) -> Option<Problem> {
        let worker = self.worker.as_ref()?;
        diagnose_pods(self.qp, self.ctx, worker, self.gateway.as_ref()).await
    }
}

/// Apply the gateway's Deployment and Service when enabled (returning its Deployment), delete
/// them otherwise, but only if this QueueProcessor controls them: a `<name>-gateway` the user
/// made is not ours to remove.
async fn apply_gateway(
    qp: &QueueProcessor,
    ctx: &Context,
    resolved: &Resolved,
) -> Result<Option<Deployment>> {
    let ns = qp.namespace_or_default();
    let name = builder::object_name(qp, Component::Gateway);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let live_deployment = cached(&ctx.deployments, qp, &name);
    let live_service = cached(&ctx.services, qp, &name);
    let Some(cfg) = &resolved.gateway else {
        if live_deployment.is_some_and(|d| controlled_by(&*d, qp)) {
            delete_if_present(&deployments, &name).await?;
        }
        if live_service.is_some_and(|s| controlled_by(&*s, qp)) {
            delete_if_present(&services, &name).await?;
        }
        return Ok(None);
    };
    let desired = builder::deployment(qp, cfg, qp.spec.gateway.replicas, &ctx.build);
    let deployment = apply_if_changed(
        &deployments,
        desired,
        live_deployment.map(|d| (*d).clone()),
        |_| true,
    )
    .await?;
    apply_if_changed(
        &services,
        builder::gateway_service(qp),
        live_service.map(|s| (*s).clone()),
        |_| true,
    )
    .await?;
    Ok(Some(deployment))
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
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
