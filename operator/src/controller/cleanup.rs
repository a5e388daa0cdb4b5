//! Deleting a QueueProcessor: stop its pods, then remove its Redis keys.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use qp_protocol::keys::Keys;
use tracing::{info, warn};

use super::events::publish;
use super::{Context, secrets};
use crate::builder;
use crate::crd::QueueProcessor;
use crate::error::{Error, Result};
use crate::scaler;
use crate::workload::Component;

/// Before the finalizer removes any key: delete the Deployments and wait until their pods are
/// gone. A worker that is still draining releases its leases and returns unfinished messages
/// through those keys, and a running worker would write its heartbeat and lease keys back after
/// they were removed (left behind for good). Deleting the Deployments here rather than leaving
/// them to garbage collection (which only starts once the QueueProcessor is gone) puts the
/// steps in that order. Returns how long to wait before looking again, or `None` when no pod is
/// left or the wait has lasted the pods' grace period plus a margin; then a Warning says that
/// keys are removed under running pods (a node that stopped reporting keeps pods "Terminating"
/// forever, and deletion must not hang on it).
pub(super) async fn stop_pods(qp: &QueueProcessor, ctx: &Context) -> Result<Option<Duration>> {
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

/// How long ago the QueueProcessor was deleted (zero if it is not being deleted).
fn since_deletion(qp: &QueueProcessor) -> Duration {
    qp.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| Duration::from_secs(Timestamp::now().duration_since(t.0).as_secs().max(0) as u64))
        .unwrap_or_default()
}

/// How long past the pods' grace period deletion waits for them before removing keys anyway.
pub(super) const STOP_MARGIN_SECONDS: u64 = 30;

/// Finalizer: remove the QueueProcessor's token and counter keys; results expire on their own.
/// Runs once [`stop_pods`] saw no pod left.
pub(super) async fn cleanup(qp: &QueueProcessor, ctx: &Context) -> Result<Action> {
    let ns = qp.namespace_or_default();
    let name = qp.name_any();
    let secrets = secrets::read(&ctx.client, &ns, &qp.spec.secret_refs()).await;
    let keys = Keys::new(&ns, &name);
    let removed = match secrets.and_then(|s| scaler::redis_settings(&qp.spec.redis, &s)) {
        Ok(redis) => scaler::delete_keys(&ctx.probes, &redis, &keys).await,
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => {
            info!("removed token and counter keys from Redis");
            publish(
                ctx,
                qp,
                EventType::Normal,
                "Deleted",
                "Cleanup",
                "Redis keys removed".into(),
            )
            .await;
        }
        // Redis may come back: try again until the timeout. Without its Secret (deleted
        // first, say) it cannot be reached at all: give up at once.
        Err(e)
            if !matches!(e, Error::SecretRef(_) | Error::InvalidSpec(_))
                && since_deletion(qp) < ctx.cleanup_timeout =>
        {
            warn!(error = %e, "cannot remove Redis keys yet; trying again");
            return Err(e);
        }
        // Give up: the keys stay (leases expire by TTL, counters stay), deletion finishes.
        Err(e) => {
            let left = keys.lifetime_keys().join(", ");
            warn!(error = %e, keys = %left, "giving up on removing Redis keys");
            publish(
                ctx,
                qp,
                EventType::Warning,
                "KeysLeftBehind",
                "Cleanup",
                format!(
                    "could not remove Redis keys within {}s of deletion ({e}); left behind: {left}",
                    ctx.cleanup_timeout.as_secs()
                ),
            )
            .await;
        }
    }
    ctx.forget(qp);
    ctx.metrics.forget(&ns, &name);
    Ok(Action::await_change())
}
