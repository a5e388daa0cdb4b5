//! What the operator keeps of the objects it watches: what it decides and compares with, not
//! the whole object. At a thousand QueueProcessors, full copies (pod templates, managed-field
//! trees) were most of the operator's memory, kept twice (the watch cache and the copy of the
//! last apply).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::ResourceExt;
use serde_json::json;

use crate::crd::QueueProcessor;

/// A worker or gateway Deployment without its pod template (a change is detected by the
/// applied-hash annotation, never by comparing templates) and with only the managed-field
/// entries that own `spec.replicas`, each reduced to that field: all that
/// [`super::objects::replicas_owner`] reads.
pub fn deployment(d: &mut Deployment) {
    if let Some(spec) = &mut d.spec {
        spec.template = Default::default();
    }
    if let Some(fields) = &mut d.metadata.managed_fields {
        fields.retain(|m| owns_replicas(m.fields_v1.as_ref()));
        for m in fields.iter_mut() {
            m.fields_v1 = Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}})));
        }
    }
}

fn owns_replicas(fields: Option<&FieldsV1>) -> bool {
    fields
        .and_then(|f| f.0.get("f:spec")?.get("f:replicas"))
        .is_some()
}

/// A gateway Service without managed fields (nothing reads them).
pub fn service(s: &mut Service) {
    s.managed_fields_mut().clear();
}

/// A QueueProcessor without managed fields (nothing reads them).
pub fn queue_processor(qp: &mut QueueProcessor) {
    qp.managed_fields_mut().clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::FIELD_MANAGER;

    #[test]
    fn a_slim_deployment_still_names_who_else_set_the_replicas() {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {
                "name": "orders-worker",
                "annotations": {"queueprocessing.dev/applied-hash": "abc"},
                "managedFields": [
                    {"manager": FIELD_MANAGER, "operation": "Apply", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {}}}}},
                    {"manager": "kube-controller-manager", "operation": "Update",
                     "subresource": "status", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:status": {"f:replicas": {}}}},
                    {"manager": "kubectl", "operation": "Update", "subresource": "scale",
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
                ]
            },
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "x"}},
                "template": {"spec": {"containers": [{"name": "qp-worker", "image": "qp:1"}]}}
            },
            "status": {"readyReplicas": 2}
        }))
        .unwrap();
        let owner = super::super::objects::replicas_owner(&d);
        deployment(&mut d);
        assert_eq!(super::super::objects::replicas_owner(&d), owner);
        assert_eq!(owner, Some(("kubectl".into(), Some(3))));
        assert!(d.spec.as_ref().unwrap().template.spec.is_none());
        assert_eq!(d.metadata.managed_fields.as_ref().unwrap().len(), 2);
        assert_eq!(d.status.unwrap().ready_replicas, Some(2));
        assert_eq!(d.metadata.annotations.unwrap().len(), 1);
    }
}
