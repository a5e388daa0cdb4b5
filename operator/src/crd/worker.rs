//! `spec.worker`: the worker pod template and the handler (`http`, `exec` or `builtin`) it runs
//! for each message.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;
use super::schema::{
    MAX_HANDLER_HEADERS, MAX_SLEEP_MILLIS, MAX_TIMEOUT_SECONDS, builtin_rules, handler_rules,
    http_handler_rules, http_header_rules, tidy_docs,
};

/// The worker pods. The operator builds a Deployment from these settings (or, in local mode,
/// runs worker processes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct WorkerSpec {
    /// Container image of the worker. Omit to use the worker image the operator was installed
    /// with (Helm value `worker.image`), which matches the operator's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,

    /// Image pull policy of the worker container: `Always`, `IfNotPresent` or `Never`. Omit for
    /// the Kubernetes default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// What the worker does with each message: exactly one of `http`, `exec` or `builtin`.
    pub handler: HandlerSpec,

    /// Seconds a worker gets on shutdown (SIGTERM) to finish the messages it holds before it
    /// commits, releases its tokens and exits; unfinished messages are redelivered.
    #[serde(default = "default_shutdown_timeout_seconds")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub shutdown_timeout_seconds: i32,

    /// CPU and memory requests and limits of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables of the worker container (use `valueFrom.secretKeyRef` for
    /// anything secret).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Additional containers in each worker pod, for example a handler sidecar that the `http`
    /// handler calls on `http://127.0.0.1:<port>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_containers: Vec<Container>,

    /// Node labels a worker pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Service account of the worker pods. Omit for the namespace's `default` account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,

    /// Secrets used to pull the worker and extra container images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Extra labels on the worker pods (the operator's own labels take precedence).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// Extra annotations on the worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
}

fn default_shutdown_timeout_seconds() -> i32 {
    30
}

/// When the kubelet pulls a container image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// What a worker does with each message. Set exactly one of `http`, `exec` or `builtin`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = handler_rules)]
#[schemars(transform = tidy_docs)]
pub struct HandlerSpec {
    /// POST each message body to a URL; a 2xx response body is the result, anything else (or a
    /// timeout) is a failure that is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHandler>,

    /// Run a command per message with the body on stdin; exit status 0 means success and
    /// stdout is the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecHandler>,

    /// A handler built into the worker, for tests, demos and benchmarks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinHandler>,
}

/// Call an HTTP endpoint for each message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = http_handler_rules)]
#[schemars(transform = tidy_docs)]
pub struct HttpHandler {
    /// The `http://` or `https://` URL that receives each message as a POST body. It must not
    /// carry credentials (`user:password@`): send them as `headers` from a Secret.
    #[schemars(length(min = 1, max = 2048), pattern(r"^https?://"))]
    pub url: String,

    /// Headers sent with every message, such as `Authorization` from a Secret. Failure reasons
    /// that clients read never show them, nor the URL or the answer's body.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_HANDLER_HEADERS))]
    pub headers: Vec<HttpHeader>,

    /// Seconds to wait for the response before the attempt counts as failed.
    #[serde(default = "default_handler_timeout_seconds")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: i32,
}

/// One header of an HTTP handler: a literal `value` or a `secretKeyRef` (exactly one).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = http_header_rules)]
#[schemars(transform = tidy_docs)]
pub struct HttpHeader {
    /// The header's name, for example `Authorization`.
    #[schemars(length(min = 1, max = 256), pattern(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,

    /// A literal value (not for credentials: it is visible in the pod spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub value: Option<String>,

    /// The value from a Secret key (an environment variable of the worker from a
    /// `secretKeyRef`; never written into the pod spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

fn default_handler_timeout_seconds() -> i32 {
    30
}

/// Run a command for each message: the body on stdin, the result on stdout (stderr is kept for
/// the failure reason). The command sees `PATH`, `HOME`, `LANG`, `LC_ALL`, `TZ`, `TMPDIR`,
/// `QP_MESSAGE_ID` and the variables of `worker.env`; nothing else of the worker's environment
/// (its Redis and Kafka passwords). A result over the size limit fails the message for good.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = tidy_docs)]
pub struct ExecHandler {
    /// The program and its arguments (no shell), for example `["/app/handle", "--json"]`.
    #[schemars(length(min = 1, max = 256), inner(length(min = 1)))]
    pub command: Vec<String>,

    /// Seconds the command may run before it is killed and the attempt counts as failed.
    #[serde(default = "default_handler_timeout_seconds")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: i32,
}

/// A handler built into the worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = builtin_rules)]
#[schemars(transform = tidy_docs)]
pub struct BuiltinHandler {
    /// Which built-in handler: `echo` returns the message as the result; `sleep` waits
    /// `sleepMillis` and then echoes (a stand-in for a slow downstream); `fail` fails every
    /// message, or only those containing `failPattern`.
    pub name: BuiltinName,

    /// For `sleep`: milliseconds each message takes. Defaults to 100 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SLEEP_MILLIS))]
    pub sleep_millis: Option<i64>,

    /// For `fail`: only messages whose body contains this text fail (the others are echoed).
    /// Omit to fail every message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub fail_pattern: Option<String>,
}

impl BuiltinHandler {
    /// Milliseconds a `sleep` handler takes per message when `sleepMillis` is omitted.
    pub const DEFAULT_SLEEP_MILLIS: i64 = 100;

    /// The effective sleep of a `sleep` handler.
    pub fn sleep_millis(&self) -> i64 {
        self.sleep_millis.unwrap_or(Self::DEFAULT_SLEEP_MILLIS)
    }
}

/// The built-in handlers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinName {
    /// Return the message body as the result.
    Echo,
    /// Wait, then echo.
    Sleep,
    /// Fail (all messages, or those matching `failPattern`).
    Fail,
}

impl BuiltinName {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinName::Echo => "echo",
            BuiltinName::Sleep => "sleep",
            BuiltinName::Fail => "fail",
        }
    }
}

/// The configured handler, as an enum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Handler<'a> {
    /// `http`.
    Http(&'a HttpHandler),
    /// `exec`.
    Exec(&'a ExecHandler),
    /// `builtin`.
    Builtin(&'a BuiltinHandler),
}

impl HandlerSpec {
    /// The one configured handler; `None` when zero or several are set.
    pub fn get(&self) -> Option<Handler<'_>> {
        match (&self.http, &self.exec, &self.builtin) {
            (Some(h), None, None) => Some(Handler::Http(h)),
            (None, Some(e), None) => Some(Handler::Exec(e)),
            (None, None, Some(b)) => Some(Handler::Builtin(b)),
            _ => None,
        }
    }
}
