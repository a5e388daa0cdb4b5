//! Kubernetes events: one per scale decision, one per transition of an error or pod problem.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::{info, warn};

use super::{Context, key};
use crate::crd::QueueProcessor;
use crate::error::Error;
use crate::health::Problem;
use crate::scaler;

/// Record the current value of one transition memory for a QueueProcessor. Returns the previous
/// value when it changed (worth an event), `None` when it did not: events mark transitions
/// rather than repeat every poll.
pub(super) fn remember<T: Copy + PartialEq>(
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

/// Record the current failure to validate, apply or write the token limit (`None` once all
/// went well); true when it changed (worth an event, when there is a failure).
pub(super) fn remember_failure(
    ctx: &Context,
    qp: &QueueProcessor,
    kind: Option<&'static str>,
) -> bool {
    remember(&ctx.last_failure, qp, kind).is_some()
}

/// Record the current error class; true when it changed (worth an event).
pub(super) fn remember_error(
    ctx: &Context,
    qp: &QueueProcessor,
    kind: Option<&'static str>,
) -> bool {
    remember(&ctx.last_error, qp, kind).is_some()
}

pub(super) async fn publish(
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

pub(super) async fn publish_events(
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
    let error = observed.error();
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
pub(super) async fn publish_health_events(
    qp: &QueueProcessor,
    ctx: &Context,
    problem: Option<&Problem>,
) {
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
