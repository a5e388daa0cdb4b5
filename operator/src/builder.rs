//! The Kubernetes objects of a QueueProcessor, built purely from its spec (no API calls), so
//! every rule here is unit-tested from YAML fixtures:
//!
//! - `<name>-worker` Deployment running `qp-worker run`;
//! - with `spec.gateway.enabled`, a `<name>-gateway` Deployment and Service.
//!
//! Pods are locked down by default (non-root, read-only root filesystem, no privilege
//! escalation, all capabilities dropped, RuntimeDefault seccomp, no service account token:
//! workers never talk to the API server). Credentials reach them only as `secretKeyRef`s and
//! Secret volumes; the operator never copies a secret value into a spec.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::crd::{QueueProcessor, SecretKeyRef};
use crate::workload::{API_TLS_PORT, Component, EnvValue, PORT, ProcessConfig};

/// The field manager of every server-side apply by the operator.
pub const FIELD_MANAGER: &str = "qp-operator";

/// Where Secret files (TLS material) are mounted in worker containers.
const SECRET_MOUNT_ROOT: &str = "/var/run/secrets/queueprocessing.dev";

/// Settings of the operator that shape what it builds.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Image used when `spec.worker.image` is empty (the operator's own release).
    pub default_image: String,
}

pub fn object_name(qp: &QueueProcessor, component: Component) -> String {
    format!(
        "{}-{}",
        qp.metadata.name.as_deref().unwrap_or_default(),
        component.as_str()
    )
}

/// Labels that select a component's pods (stable: never change them on a live Deployment).
pub fn selector_labels(qp: &QueueProcessor, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            match component {
                Component::Worker => "qp-worker",
                Component::Gateway => "qp-gateway",
            }
            .to_owned(),
        ),
        (
            "app.kubernetes.io/instance".to_owned(),
            qp.metadata.name.clone().unwrap_or_default(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            component.as_str().to_owned(),
        ),
    ])
}

fn labels(qp: &QueueProcessor, component: Component) -> BTreeMap<String, String> {
    let mut l = selector_labels(qp, component);
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l.insert("app.kubernetes.io/part-of".into(), "queue-processor".into());
    l
}

fn owner(qp: &QueueProcessor) -> OwnerReference {
    qp.controller_owner_ref(&())
        .expect("a QueueProcessor from the API server has a name and uid")
}

/// Volume name for a Secret (DNS label, unique per Secret).
fn volume_name(secret: &str) -> String {
    let mut n: String = format!("secret-{secret}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    n.truncate(63);
    n.trim_end_matches('-').to_owned()
}

fn secret_file_path(r: &SecretKeyRef) -> String {
    format!("{SECRET_MOUNT_ROOT}/{}/{}", r.name, r.key)
}

fn env_var(name: &str, value: &EnvValue) -> EnvVar {
    let (value, value_from) = match value {
        EnvValue::Value(s) => (Some(s.clone()), None),
        EnvValue::SecretFile(r) => (Some(secret_file_path(r)), None),
        EnvValue::Secret(r) => (
            None,
            Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        ),
        EnvValue::PodName => (
            None,
            Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    };
    EnvVar {
        name: name.to_owned(),
        value,
        value_from,
    }
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A component's Deployment with `replicas`.
pub fn deployment(
    qp: &QueueProcessor,
    config: &ProcessConfig,
    replicas: i32,
    opts: &BuildOptions,
) -> Deployment {
    let component = config.component;
    let spec = &qp.spec;
    let container_name = match component {
        Component::Worker => "qp-worker",
        Component::Gateway => "qp-gateway",
    };

    // Secret files: one volume per Secret, only the referenced keys.
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, value) in &config.env {
        if let EnvValue::SecretFile(r) = value {
            files.entry(r.name.clone()).or_default().push(r.key.clone());
        }
    }
    let volumes: Vec<Volume> = files
        .iter()
        .map(|(secret, keys)| Volume {
            name: volume_name(secret),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                items: Some(
                    keys.iter()
                        .map(|k| KeyToPath {
                            key: k.clone(),
                            path: k.clone(),
                            mode: Some(0o400),
                        })
                        .collect(),
                ),
                default_mode: Some(0o400),
                optional: Some(false),
            }),
            ..Default::default()
        })
        .collect();
    let mounts: Vec<VolumeMount> = files
        .keys()
        .map(|secret| VolumeMount {
            name: volume_name(secret),
            mount_path: format!("{SECRET_MOUNT_ROOT}/{secret}"),
            read_only: Some(true),
            ..Default::default()
        })
        .collect();

    let mut env: Vec<EnvVar> = config.env.iter().map(|(n, v)| env_var(n, v)).collect();
    if component == Component::Worker {
        // The user's env comes last so it can add to (not silently replace) ours.
        env.extend(spec.worker.env.iter().cloned());
    }

    let main = Container {
        name: container_name.into(),
        image: Some(
            spec.worker
                .image
                .clone()
                .unwrap_or_else(|| opts.default_image.clone()),
        ),
        image_pull_policy: spec.worker.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec!["qp-worker".into()]),
        args: Some(config.args.clone()),
        env: Some(env),
        ports: Some(container_ports(qp, component)),
        liveness_probe: Some(http_probe("/healthz", 10)),
        readiness_probe: Some(http_probe("/readyz", 2)),
        resources: if component == Component::Worker {
            spec.worker.resources.clone()
        } else {
            None
        },
        security_context: Some(restricted_container_security()),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    let mut containers = vec![main];
    if component == Component::Worker {
        containers.extend(spec.worker.extra_containers.iter().cloned());
    }

    let mut pod_labels = labels(qp, component);
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    if component == Component::Worker {
        for (k, v) in &spec.worker.pod_labels {
            pod_labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        annotations.extend(spec.worker.pod_annotations.clone());
    }

    let grace = i64::from(spec.worker.shutdown_timeout_seconds) + 10;
    Deployment {
        metadata: ObjectMeta {
            name: Some(object_name(qp, component)),
            namespace: qp.metadata.namespace.clone(),
            labels: Some(labels(qp, component)),
            owner_references: Some(vec![owner(qp)]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(qp, component)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    // Never fewer consumers during a roll; tokens bound the surge's effect.
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::String("25%".into())),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    automount_service_account_token: Some(false),
                    service_account_name: if component == Component::Worker {
                        spec.worker.service_account_name.clone()
                    } else {
                        None
                    },
                    image_pull_secrets: (!spec.worker.image_pull_secrets.is_empty())
                        .then(|| spec.worker.image_pull_secrets.clone()),
                    node_selector: (!spec.worker.node_selector.is_empty())
                        .then(|| spec.worker.node_selector.clone()),
                    tolerations: (!spec.worker.tolerations.is_empty())
                        .then(|| spec.worker.tolerations.clone()),
                    termination_grace_period_seconds: Some(grace),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether the gateway serves its API over TLS, on a port of its own.
fn gateway_tls(qp: &QueueProcessor) -> bool {
    qp.spec.gateway.auth.mtls.is_some()
}

/// `metrics` (metrics, probes and, without TLS, the gateway's API), and `https` for a gateway
/// with TLS.
fn container_ports(qp: &QueueProcessor, component: Component) -> Vec<ContainerPort> {
    let port = |name: &str, number: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![port("metrics", PORT)];
    if component == Component::Gateway && gateway_tls(qp) {
        ports.push(port("https", API_TLS_PORT));
    }
    ports
}

/// The gateway's Service: port 80 to the gateway's HTTP port, or 443 to its TLS port.
pub fn gateway_service(qp: &QueueProcessor) -> Service {
    let (name, number, target) = if gateway_tls(qp) {
        ("https", 443, "https")
    } else {
        ("http", 80, "metrics")
    };
    Service {
        metadata: ObjectMeta {
            name: Some(object_name(qp, Component::Gateway)),
            namespace: qp.metadata.namespace.clone(),
            labels: Some(labels(qp, Component::Gateway)),
            owner_references: Some(vec![owner(qp)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(qp, Component::Gateway)),
            ports: Some(vec![ServicePort {
                name: Some(name.into()),
                port: number,
                target_port: Some(IntOrString::String(target.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::process;

    fn fixture(name: &str) -> QueueProcessor {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut qp: QueueProcessor = serde_yaml::from_str(&text).unwrap();
        qp.metadata.uid = Some("0000-test-uid".into());
        qp
    }

    fn opts() -> BuildOptions {
        BuildOptions {
            default_image: "example.org/qp:1".into(),
        }
    }

    fn build(qp: &QueueProcessor, replicas: i32) -> Deployment {
        deployment(
            qp,
            &process(qp, Component::Worker).unwrap(),
            replicas,
            &opts(),
        )
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn worker_deployment_shape() {
        let qp = fixture("kafka-sasl-tls.yaml");
        let d = build(&qp, 3);
        assert_eq!(d.metadata.name.as_deref(), Some("orders-worker"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "QueueProcessor");
        assert_eq!(owner.name, "orders");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
        let p = pod(&d);
        assert_eq!(p.automount_service_account_token, Some(false));
        let c = &p.containers[0];
        assert_eq!(c.image.as_deref(), Some("example.org/qp:1"));
        assert_eq!(c.args.as_deref(), Some(&["run".to_owned()][..]));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    /// An exec handler sees the user's variables (passed by name), never the worker's own.
    #[test]
    fn the_users_env_names_are_passed_to_exec_handlers() {
        let mut qp = fixture("kafka-sasl-tls.yaml");
        qp.spec.worker.env = ["API_TOKEN", "GREETING"]
            .into_iter()
            .map(|n| EnvVar {
                name: n.into(),
                value: Some("x".into()),
                ..Default::default()
            })
            .collect();
        let d = build(&qp, 1);
        let env = pod(&d).containers[0].env.clone().unwrap();
        let pass = env.iter().find(|e| e.name == "QP_EXEC_PASS_ENV").unwrap();
        assert_eq!(pass.value.as_deref(), Some("API_TOKEN,GREETING"));
    }

    #[test]
    fn secrets_are_references_never_values() {
        let qp = fixture("kafka-sasl-tls.yaml");
        let d = build(&qp, 1);
        let yaml = serde_yaml::to_string(&d).unwrap();
        // The fixture's Secret *names* appear; no secret value can, since we never read them.
        let env = pod(&d).containers[0].env.as_ref().unwrap();
        let pw = env.iter().find(|e| e.name == "QP_KAFKA_PASSWORD").unwrap();
        assert!(pw.value.is_none());
        let sel = pw
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (sel.name.as_str(), sel.key.as_str()),
            ("kafka-creds", "password")
        );
        // TLS material is a read-only Secret volume, referenced by path.
        let ca = env.iter().find(|e| e.name == "QP_KAFKA_CA_FILE").unwrap();
        assert_eq!(
            ca.value.as_deref(),
            Some("/var/run/secrets/queueprocessing.dev/kafka-tls/ca.crt")
        );
        let vols = pod(&d).volumes.as_ref().unwrap();
        assert_eq!(vols.len(), 1);
        assert_eq!(
            vols[0].secret.as_ref().unwrap().secret_name.as_deref(),
            Some("kafka-tls")
        );
        assert!(!yaml.contains("hunter2"));
    }

    #[test]
    fn user_overrides_are_applied() {
        let qp = fixture("redis-list-overrides.yaml");
        let d = build(&qp, 2);
        let p = pod(&d);
        assert_eq!(p.containers.len(), 2, "the handler sidecar is added");
        assert_eq!(p.containers[1].name, "handler");
        assert_eq!(p.node_selector.as_ref().unwrap()["pool"], "workers");
        assert_eq!(p.tolerations.as_ref().unwrap().len(), 1);
        let c = &p.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/qp:dev"));
        assert!(c.resources.as_ref().unwrap().limits.is_some());
        let env = c.env.as_ref().unwrap();
        assert_eq!(env.last().unwrap().name, "EXTRA_SETTING");
        assert!(env.iter().any(|e| e.name == "QP_LIST_KEY"));
        let labels = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(labels["team"], "payments");
        // Selector labels cannot be overridden by pod labels.
        assert_eq!(labels["app.kubernetes.io/name"], "qp-worker");
    }

    #[test]
    fn gateway_objects() {
        let qp = fixture("kafka-sasl-tls.yaml");
        let g = deployment(&qp, &process(&qp, Component::Gateway).unwrap(), 2, &opts());
        assert_eq!(g.metadata.name.as_deref(), Some("orders-gateway"));
        assert_eq!(
            pod(&g).containers[0].args.as_deref(),
            Some(&["gateway".to_owned()][..])
        );
        let s = gateway_service(&qp);
        let spec = s.spec.unwrap();
        assert_eq!(
            spec.selector.unwrap()["app.kubernetes.io/name"],
            "qp-gateway"
        );
        assert_eq!(spec.ports.unwrap()[0].port, 80);
    }

    #[test]
    fn a_gateway_with_mtls_serves_its_api_on_a_tls_port_of_its_own() {
        use crate::crd::{GatewayMtlsSpec, SecretKeyRef};
        let mut qp = fixture("kafka-sasl-tls.yaml");
        let key = |k: &str| SecretKeyRef {
            name: "gw-tls".into(),
            key: k.into(),
        };
        qp.spec.gateway.auth.mtls = Some(GatewayMtlsSpec {
            cert_secret_ref: key("tls.crt"),
            key_secret_ref: key("tls.key"),
            client_ca_secret_ref: key("ca.crt"),
        });
        let g = deployment(&qp, &process(&qp, Component::Gateway).unwrap(), 1, &opts());
        let c = &pod(&g).containers[0];
        let ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [("metrics".into(), 9090), ("https".into(), 8443)],
            "probes stay on the plain port"
        );
        let env = |n: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            env("QP_GATEWAY_CLIENT_CA_FILE").as_deref(),
            Some("/var/run/secrets/queueprocessing.dev/gw-tls/ca.crt")
        );
        assert_eq!(
            env("QP_GATEWAY_API_LISTEN").as_deref(),
            Some("0.0.0.0:8443")
        );
        let mounted: Vec<_> = pod(&g)
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
            .collect();
        assert!(mounted.contains(&"gw-tls".to_owned()), "{mounted:?}");
        let port = &gateway_service(&qp).spec.unwrap().ports.unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (443, Some(IntOrString::String("https".into())))
        );
    }

    #[test]
    fn volume_names_are_dns_labels() {
        assert_eq!(volume_name("kafka.tls"), "secret-kafka-tls");
        assert!(volume_name(&"x".repeat(100)).len() <= 63);
    }
}
