//! Writing the status subresource.

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::events::{publish, remember_failure};
use super::{Context, now_time};
use crate::builder::FIELD_MANAGER;
use crate::crd::{
    API_VERSION, CONDITION_READY, CONDITION_SCALING, ConditionStatus, KIND, QueueProcessor,
    QueueProcessorStatus,
};
use crate::error::{Error, Result};
use crate::scaler;
use crate::tick::Tick;
use kube::runtime::events::EventType;

/// Server-side apply of the status subresource with our field manager.
pub(super) async fn patch_status(
    qp: &QueueProcessor,
    ctx: &Context,
    status: &QueueProcessorStatus,
) -> Result<()> {
    let api: Api<QueueProcessor> = Api::namespaced(ctx.client.clone(), &qp.namespace_or_default());
    let body = json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    ctx.metrics.status_writes.inc();
    api.patch_status(
        &qp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// The status as this process last wrote it, and when.
///
/// The base of the next status is this copy rather than the QueueProcessor handed to the
/// reconcile: a reconcile started by a change of an owned Deployment (our own apply, a moment
/// earlier) can run before the watch delivers our status write, and building on the older copy
/// would drop what that write said (a server-side apply of the whole status removes the fields
/// it omits). The operator is the status's only writer; a new leader starts from the object.
#[derive(Default)]
pub(super) struct Written {
    status: Option<QueueProcessorStatus>,
    at: Option<Instant>,
}

impl Written {
    fn base(&self, qp: &QueueProcessor) -> Option<QueueProcessorStatus> {
        self.status.clone().or_else(|| qp.status.clone())
    }

    async fn write(
        &mut self,
        qp: &QueueProcessor,
        ctx: &Context,
        status: QueueProcessorStatus,
    ) -> Result<()> {
        patch_status(qp, ctx, &status).await?;
        self.status = Some(status);
        self.at = Some(Instant::now());
        Ok(())
    }
}

/// Say that something stops this QueueProcessor from being applied or scaled: `Ready` False
/// with the error's kind as reason, and a Warning event when the kind changes. `action` names
/// the step in the event (`Validate`, `Apply`).
pub(super) async fn report_failure(
    qp: &QueueProcessor,
    ctx: &Context,
    err: &Error,
    action: &str,
    written: &mut Written,
) -> Result<()> {
    let mut status = written.base(qp).unwrap_or_default();
    status.observed_generation = qp.metadata.generation;
    set_failed(&mut status, qp, err);
    status.refresh_summary(&qp.spec);
    written.write(qp, ctx, status).await?;
    if remember_failure(ctx, qp, Some(err.kind())) {
        publish(
            ctx,
            qp,
            EventType::Warning,
            err.kind(),
            action,
            err.to_string(),
        )
        .await;
    }
    warn!(error = %err, action, "QueueProcessor not applied");
    Ok(())
}

fn set_failed(status: &mut QueueProcessorStatus, qp: &QueueProcessor, err: &Error) {
    status.set_condition(
        CONDITION_READY,
        ConditionStatus::False,
        err.kind(),
        err.to_string(),
        qp.metadata.generation,
        now_time(),
    );
}

/// Live numbers (backlog, rates, tokens in use, condition messages quoting them) are
/// refreshed in the status at most this often; every other change is written at once.
/// Prometheus has the live values; the status is for `kubectl get` and for reasons.
pub(super) const LIVE_NUMBERS_REFRESH: Duration = Duration::from_secs(30);

/// What the controller found beyond the tick, for the status.
pub(super) struct Notes<'a> {
    /// Makes `Ready` False whatever the tick found (the token limit could not be written).
    pub failure: Option<&'a Error>,
    /// Another field manager set the replica count: `Scaling` says so.
    pub contested: Option<&'a str>,
}

/// Write the status a tick computed, when [`QueueProcessorStatus::write_due`] says so.
pub(super) async fn write_status(
    qp: &QueueProcessor,
    ctx: &Context,
    tick: &Tick,
    notes: Notes<'_>,
    written: &mut Written,
) -> Result<()> {
    let old = written.base(qp);
    let mut status = old.clone().unwrap_or_default();
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
    if let Some(e) = notes.failure {
        set_failed(&mut status, qp, e);
    }
    if let Some(note) = notes.contested {
        status.set_condition(
            CONDITION_SCALING,
            ConditionStatus::True,
            "ReplicasContested",
            note,
            generation,
            now_time(),
        );
    }
    status.refresh_summary(&qp.spec);
    let since = written.at.map(|t| t.elapsed());
    if !status.write_due(old.as_ref(), since, LIVE_NUMBERS_REFRESH) {
        return Ok(());
    }
    written.write(qp, ctx, status).await
}
