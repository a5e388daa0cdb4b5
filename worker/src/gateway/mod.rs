//! `qp-worker gateway`: the intake and poll API of the first source article, done properly.
//!
//! ```text
//! POST /v1/requests            body = the request; Content-Type: application/json, text/plain
//!                              or application/octet-stream; optional Idempotency-Key header
//!   -> 202 {"id", "status": "pending", "statusUrl"}
//! GET  /v1/requests/{id}[?wait=<seconds>]
//!   -> 200 {"status": "done", "result"} | 200 {"status": "failed", "error"}
//!    | 202 {"status": "pending"|"processing"} | 404
//! ```
//!
//! Submitting writes the `pending` state first, with a short *reservation* TTL, then queues the
//! message, then extends the state to the result TTL. If queueing fails the state is deleted and
//! the client gets 503; if the gateway dies in between, the reservation expires. Either way no
//! client is left polling a request that will never run.
//!
//! An `Idempotency-Key` header becomes the request id: while a request with that id exists
//! (until its result expires), submitting it again queues nothing and answers `202` with the
//! existing state and `"duplicate": true`.
//!
//! One size limit applies to a body (`--max-request-bytes`, the worker's `--max-message-bytes`):
//! the gateway answers 413 naming it before anything is queued, and makes its Kafka producer
//! accept that body with its headers. A body the gateway accepts is one the worker processes.
//! If the topic itself refuses it (a broker `max.message.bytes` below the limit), that is a 413
//! too, saying so, not a 503 the client would retry forever.
//!
//! Long polls do not poll while notifications are up: a worker announces a finished id that a
//! long poll is watching, and one subscription per gateway wakes exactly its waiters (see
//! `notify`). The gateway is ready as soon as it can reach Redis and its queue; notifications
//! are not a condition, since submit and poll work without them.

mod auth;
mod notify;
mod producer;

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Span, info, instrument, warn};

use crate::metrics::Metrics;
use crate::results::{RequestState, ResultStore};
use crate::server::{self, Readiness};
use crate::source::redis_list::Envelope;
use crate::source::valid_id;
use crate::{Error, Result};
use auth::{Auth, Caller, owns};
use notify::{FALLBACK_POLL, Notifications};
use qp_protocol::keys::Keys;
use qp_protocol::observability;
use qp_protocol::redis_conn::Conn;
use qp_protocol::settings::{GatewayArgs, SourceKind};

/// How long a `pending` state lives before the message is known to be queued.
const RESERVATION: Duration = Duration::from_secs(30);

/// Content types the gateway accepts.
const ACCEPTED_TYPES: [&str; 3] = ["application/json", "text/plain", "application/octet-stream"];

/// Where submitted requests go.
enum Queue {
    Kafka {
        producer: producer::Producer,
        topic: String,
    },
    RedisList {
        key: String,
    },
    RedisStream {
        key: String,
    },
}

struct Gateway {
    keys: Keys,
    conn: Conn,
    store: ResultStore,
    queue: Queue,
    result_ttl: Duration,
    max_wait: Duration,
    max_backlog: u64,
    /// Last measured backlog (messages waiting), refreshed in the background.
    backlog: Mutex<Option<u64>>,
    notes: Arc<Notifications>,
    metrics: Metrics,
    claim: redis::Script,
    /// The largest accepted body.
    max_request_bytes: usize,
    /// Process shutdown: long polls answer with the current state instead of holding up the
    /// graceful shutdown.
    stop: CancellationToken,
}

type Shared = Arc<Gateway>;

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<f64>,
}

pub async fn run(args: GatewayArgs, stop: CancellationToken) -> Result<()> {
    if args.max_connections == 0 {
        return Err(Error::config(
            "--max-connections must be at least 1 (every request needs a connection)",
        ));
    }
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let auth = Arc::new(Auth::new(
        args.tokens_file.as_deref(),
        args.no_auth,
        args.client_ca_file.is_some(),
        args.rate_limit_per_client,
    )?);
    // Read now: a missing or broken certificate stops the gateway at start, naming the file.
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::Reloading::new(&crate::tls::TlsFiles {
                cert,
                key,
                client_ca: args.client_ca_file.as_deref(),
            })?;
            tokio::spawn(tls.clone().watch(stop.clone()));
            Some(tls)
        }
        _ => None,
    };
    if let Some(path) = &args.tokens_file {
        tokio::spawn(auth::reload(auth.clone(), path.clone(), stop.clone()));
    }
    let keys = args.common.keys();
    let redis = args.common.redis()?;
    // Serve at once: probes answer (alive, not ready) while Redis is away or refuses the
    // Secret's credentials, and the API answers 503 until it is there (see `late_api`).
    let probes = {
        let metrics = metrics.clone();
        observability::router(move || metrics.render(), Some(ready.clone()))
    };
    let api_slot = Arc::new(OnceLock::new());
    let late = Router::new().fallback_service(LateApi(api_slot.clone()));
    // Without TLS the API shares the probes' port; with TLS it has its own, and the kubelet
    // and Prometheus keep plain HTTP without a client certificate.
    let mut servers = Vec::new();
    let addr = match tls {
        None => {
            let (addr, http) = server::serve_with(
                args.common.listen,
                probes.merge(late),
                None,
                args.max_connections,
                stop.clone(),
            )
            .await?;
            servers.push(http);
            addr
        }
        Some(tls) => {
            let (_, http) = server::serve(args.common.listen, probes, stop.clone()).await?;
            servers.push(http);
            let (addr, https) = server::serve_with(
                args.api_listen,
                late,
                Some(tls),
                args.max_connections,
                stop.clone(),
            )
            .await?;
            servers.push(https);
            addr
        }
    };
    let Some(conn) = redis.connect_patiently(&stop).await else {
        for http in servers {
            let _ = http.await;
        }
        return Ok(());
    };
    let result_ttl = Duration::from_secs(args.result_ttl_seconds);
    let mut follower = None;
    let queue = match args.source {
        SourceKind::Kafka => {
            if args.max_backlog > 0 && args.kafka.kafka_group.is_none() {
                return Err(Error::config(
                    "--max-backlog with --source kafka needs --kafka-group (QP_KAFKA_GROUP): \
                     the backlog is the consumer group's lag",
                ));
            }
            let (producer, health) =
                producer::producer(&args.kafka, args.max_request_bytes, &metrics)?;
            follower = Some((producer.clone(), health, args.kafka.bootstrap()?.to_owned()));
            Queue::Kafka {
                producer,
                topic: args.kafka.topic()?.to_owned(),
            }
        }
        SourceKind::RedisStream => Queue::RedisStream {
            key: args.stream_key.clone().ok_or_else(|| {
                Error::config("--stream-key (QP_STREAM_KEY) is required for --source redis-stream")
            })?,
        },
        SourceKind::RedisList => Queue::RedisList {
            key: args.list_key.clone().ok_or_else(|| {
                Error::config("--list-key (QP_LIST_KEY) is required for --source redis-list")
            })?,
        },
    };
    let notes = Arc::new(Notifications::new(&metrics)?);
    let gw = Arc::new(Gateway {
        store: ResultStore::start(keys.clone(), conn.clone(), result_ttl, &redis),
        keys,
        conn,
        queue,
        result_ttl,
        max_wait: Duration::from_secs(args.max_wait_seconds),
        max_backlog: args.max_backlog,
        backlog: Mutex::new(None),
        notes: notes.clone(),
        metrics: metrics.clone(),
        claim: qp_protocol::scripts::CLAIM.clone(),
        max_request_bytes: args.max_request_bytes,
        stop: stop.clone(),
    });
    tokio::spawn(wake_on_stop(notes.clone(), stop.clone()));
    tokio::spawn(notify::listen(
        redis.clone(),
        gw.keys.done_channel(),
        notes,
        stop.clone(),
    ));
    if gw.max_backlog > 0 {
        tokio::spawn(sample_backlog(gw.clone(), args.clone(), stop.clone()));
    }

    let _ = api_slot.set(api(gw.clone(), auth, args.max_request_bytes));
    match follower {
        Some((producer, health, bootstrap)) => {
            tokio::spawn(producer::follow(
                producer,
                health,
                bootstrap,
                metrics.clone(),
                ready.clone(),
                stop.clone(),
            ));
        }
        None => ready.set(true),
    }
    info!(%addr, keys = %gw.keys.prefix(), "gateway serving");
    for http in servers {
        let _ = http.await;
    }
    Ok(())
}

/// The API once it exists: until then a 503 that says the gateway is starting (Kubernetes sends
/// no traffic to an unready pod, but a client that reaches it directly gets an answer). A
/// service rather than a handler: a handler's future would hold the request and the API's
/// whole future in one more box, for every parked long poll.
#[derive(Clone)]
struct LateApi(Arc<OnceLock<Router>>);

impl tower::Service<axum::extract::Request> for LateApi {
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::Either<
        std::future::Ready<std::result::Result<Response, Infallible>>,
        axum::routing::future::RouteFuture<Infallible>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        use futures::future::Either;
        match self.0.get().cloned() {
            Some(mut api) => Either::Right(tower::Service::call(&mut api, request)),
            None => Either::Left(std::future::ready(Ok(unavailable(
                "the gateway is starting (waiting for Redis)",
            )))),
        }
    }
}

/// The API routes, behind authentication and the rate limit (checked before a body is read),
/// with the request body limit (larger bodies get 413).
fn api(gw: Shared, auth: Arc<Auth>, max_request_bytes: usize) -> Router {
    Router::new()
        .route("/v1/requests", post(submit))
        .route("/v1/requests/{id}", get(status))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(auth::AuthLayer(auth))
        .with_state(gw)
}

/// The authenticated client, if authentication is on.
fn client_of(caller: &Option<Extension<Caller>>) -> Option<&str> {
    caller.as_ref().map(|Extension(c)| c.0.as_str())
}

fn problem(code: StatusCode, msg: &str) -> Response {
    (code, axum::Json(json!({ "error": msg }))).into_response()
}

/// 503 with `Retry-After`: the request may succeed in a moment, and clients should know when to
/// try again rather than hammer.
fn unavailable(msg: &str) -> Response {
    let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn observe(gw: &Gateway, route: &str, started: Instant, resp: &Response) {
    gw.metrics
        .http_requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    gw.metrics
        .http_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
}

async fn submit(
    State(gw): State<Shared>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let resp = match body {
        Ok(body) => submit_inner(&gw, client_of(&caller), &headers, body).await,
        // Too large (413, naming the limit) or cut off: answered in the API's JSON shape.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "body is larger than the limit of {} bytes",
                gw.max_request_bytes
            ),
        ),
        Err(e) => problem(e.status(), &e.body_text()),
    };
    observe(&gw, "submit", started, &resp);
    resp
}

/// Its span gets the request id once it is known (after the checks that need none). With
/// authentication on, ids are `<client>:<key or uuid>`: one client's idempotency keys never
/// meet another's, and [`status_inner`] serves a client only its own ids.
#[instrument(name = "request", skip_all, fields(id = Empty))]
async fn submit_inner(
    gw: &Gateway,
    client: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let media = media_type(headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()));
    if !ACCEPTED_TYPES.contains(&media.as_str()) {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("content type must be one of {}", ACCEPTED_TYPES.join(", ")),
        );
    }
    if media == "application/json"
        && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
    {
        return problem(StatusCode::BAD_REQUEST, "body is not valid JSON");
    }
    let key = headers.get("idempotency-key").map(|v| v.as_bytes());
    let id = match request_id(client, key) {
        Ok(id) => id,
        Err(msg) => return problem(StatusCode::BAD_REQUEST, &msg),
    };
    Span::current().record("id", id.as_str());
    if gw.max_backlog > 0 {
        let backlog = *gw.backlog.lock().expect("backlog lock");
        if let Some(b) = backlog.filter(|b| *b > gw.max_backlog) {
            let mut r = problem(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "backlog of {b} messages is above {}; retry later",
                    gw.max_backlog
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    }

    let key = gw.keys.result(&id);
    let claimed: redis::RedisResult<String> = gw
        .claim
        .key(&key)
        .arg(RESERVATION.as_millis() as u64)
        .invoke_async(&mut gw.conn.clone())
        .await;
    match claimed {
        Err(e) => {
            warn!(error = %e, "redis unavailable on submit");
            return unavailable("result store (Redis) is unavailable");
        }
        Ok(existing) if !existing.is_empty() => {
            // Same idempotency key again: the first submission stands.
            return accepted(&id, &existing, false);
        }
        Ok(_) => {}
    }

    if let Err(e) = gw.enqueue(&id, &media, &body).await {
        warn!(error = %e, %id, "queueing failed; withdrawing the pending state");
        let _: redis::RedisResult<i64> = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut gw.conn.clone())
            .await;
        if let Error::MessageTooLarge(detail) = &e {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the queue refused a body of {} bytes as too large ({detail}); the Kafka \
                     topic's max.message.bytes must allow {} bytes and headers",
                    body.len(),
                    gw.max_request_bytes
                ),
            );
        }
        let what = match gw.queue {
            Queue::Kafka { .. } => "queue (Kafka) is unavailable",
            Queue::RedisList { .. } | Queue::RedisStream { .. } => "queue (Redis) is unavailable",
        };
        return unavailable(what);
    }
    // Queued: the request now lives as long as its result will.
    let _: redis::RedisResult<i64> = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(gw.result_ttl.as_millis() as u64)
        .query_async(&mut gw.conn.clone())
        .await;
    accepted(&id, "pending", true)
}

/// The media type of a `Content-Type` header, lower-cased without parameters; a missing (or
/// non-text) header is `application/octet-stream`.
fn media_type(content_type: Option<&[u8]>) -> String {
    let Some(raw) = content_type else {
        return "application/octet-stream".to_owned();
    };
    std::str::from_utf8(raw)
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The request id: the `Idempotency-Key` if given and valid, else a fresh UUIDv7; under
/// authentication prefixed with `<client>:`. `Err` is the 400's message.
fn request_id(client: Option<&str>, key: Option<&[u8]>) -> std::result::Result<String, String> {
    let scope = client.map_or(String::new(), |c| format!("{c}:"));
    match key {
        Some(k) => match std::str::from_utf8(k) {
            Ok(k) if valid_id(k) && valid_id(&format!("{scope}{k}")) => Ok(format!("{scope}{k}")),
            _ => Err(format!(
                "Idempotency-Key must be 1-{} characters of [A-Za-z0-9._:-]",
                128 - scope.len()
            )),
        },
        None => Ok(format!("{scope}{}", uuid::Uuid::now_v7())),
    }
}

fn accepted(id: &str, state: &str, new: bool) -> Response {
    let url = format!("/v1/requests/{id}");
    let mut r = (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "id": id, "status": state, "statusUrl": url, "duplicate": !new })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

impl Gateway {
    async fn enqueue(&self, id: &str, content_type: &str, body: &[u8]) -> Result<()> {
        match &self.queue {
            Queue::Kafka { producer, topic } => {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "qp-id",
                        value: Some(id.as_bytes()),
                    })
                    .insert(Header {
                        key: "content-type",
                        value: Some(content_type.as_bytes()),
                    });
                producer
                    .send(
                        FutureRecord::to(topic)
                            .key(id)
                            .payload(body)
                            .headers(headers),
                        Duration::from_secs(5),
                    )
                    .await
                    .map_err(|(e, _)| match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                            Error::MessageTooLarge(e.to_string())
                        }
                        _ => Error::Kafka(e.to_string()),
                    })?;
                Ok(())
            }
            Queue::RedisStream { key } => {
                crate::source::redis_stream::add(
                    &mut self.conn.clone(),
                    key,
                    id,
                    Some(content_type),
                    body,
                )
                .await?;
                Ok(())
            }
            Queue::RedisList { key } => {
                let env = Envelope::new(id, Some(content_type), body);
                let _: i64 = redis::cmd("LPUSH")
                    .arg(key)
                    .arg(env.to_bytes())
                    .query_async(&mut self.conn.clone())
                    .await?;
                Ok(())
            }
        }
    }
}

async fn status(
    State(gw): State<Shared>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let resp = match query {
        // Another client's id answers exactly as an unknown one: nothing to learn from it.
        Ok(_) if client_of(&caller).is_some_and(|c| !owns(c, &id)) => render(&id, None),
        Ok(Query(q)) => status_inner(&gw, &id, q.wait).await,
        Err(e) => problem(e.status(), &e.body_text()),
    };
    observe(&gw, "status", started, &resp);
    resp
}

fn store_unavailable(id: &str, e: &Error) -> Response {
    warn!(id, error = %e, "redis unavailable on status");
    unavailable("result store (Redis) is unavailable")
}

/// No span of its own (the submit has one): a parked long poll would hold it, and its fields,
/// for up to a minute.
async fn status_inner(gw: &Gateway, id: &str, wait: Option<f64>) -> Response {
    if !valid_id(id) {
        return problem(StatusCode::BAD_REQUEST, "invalid request id");
    }
    let wait = wait
        .filter(|w| w.is_finite() && *w > 0.0)
        .map(|w| Duration::from_secs_f64(w).min(gw.max_wait));
    // The reads are boxed: the poll's future is as large as its largest state, and a Redis
    // call's future is larger than the parked state; boxed, it costs memory only while it
    // runs, not for as long as the poll is parked.
    let Some(wait) = wait else {
        return match Box::pin(gw.store.get(id)).await {
            Ok(s) => render(id, s),
            Err(e) => store_unavailable(id, &e),
        };
    };
    let waited = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    let mut woken = false;
    loop {
        // Register before reading, so a result written in between is not missed. The first
        // read also marks the request watched, so that its finish is announced.
        let mut watch = gw.notes.waiters.watch(id);
        let read = if woken {
            Box::pin(gw.store.get(id)).await
        } else {
            Box::pin(gw.store.watch(id)).await
        };
        let state = match read {
            Ok(s) => s,
            Err(e) => return store_unavailable(id, &e),
        };
        let finished = state.as_ref().is_none_or(RequestState::is_finished);
        if finished || woken && tokio::time::Instant::now() >= deadline {
            if woken {
                let ended = if finished { "result" } else { "timeout" };
                gw.metrics
                    .longpoll_seconds
                    .with_label_values(&[ended])
                    .observe(waited.elapsed().as_secs_f64());
            }
            return render(id, state);
        }
        // Stopping: answer with what we have. Checked after registering, and the gateway wakes
        // every registered poll once `stop` fired, so a poll cannot park past it.
        if gw.stop.is_cancelled() {
            return render(id, state);
        }
        // One timer, not one per reason, and no future waiting for `stop`: every parked poll
        // holds this state for up to a minute (see `wake_on_stop`).
        let wake = if gw.notes.up() {
            deadline
        } else {
            // Deaf: read again a little later.
            deadline.min(tokio::time::Instant::now() + FALLBACK_POLL)
        };
        let rx = watch.rx.as_mut().expect("fresh watch");
        tokio::select! {
            // Notified (or woken after the subscription came back): read again; woken on
            // stop: answer below.
            _ = rx => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
        if gw.stop.is_cancelled() {
            return render(id, state);
        }
        woken = true;
    }
}

/// Parked long polls answer at once when the gateway stops: each is woken, sees `stop` and
/// answers with the state it read. One task doing this instead of a future per poll that waits
/// for `stop` (72 bytes in every parked poll).
async fn wake_on_stop(notes: Arc<Notifications>, stop: CancellationToken) {
    stop.cancelled().await;
    notes.waiters.notify_all();
}

fn render(id: &str, state: Option<RequestState>) -> Response {
    match state {
        None => problem(StatusCode::NOT_FOUND, "unknown or expired request id"),
        Some(RequestState::Done(body)) => {
            let result = match serde_json::from_slice::<Value>(&body) {
                Ok(v) => json!({ "id": id, "status": "done", "result": v }),
                Err(_) => match std::str::from_utf8(&body) {
                    Ok(s) => json!({ "id": id, "status": "done", "result": s }),
                    Err(_) => {
                        json!({ "id": id, "status": "done", "resultBase64": BASE64.encode(&body) })
                    }
                },
            };
            (StatusCode::OK, axum::Json(result)).into_response()
        }
        Some(RequestState::Failed(error)) => (
            StatusCode::OK,
            axum::Json(json!({ "id": id, "status": "failed", "error": error })),
        )
            .into_response(),
        Some(s) => {
            let mut r = (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "id": id, "status": s.name() })),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// Refresh the backlog used for 429s: list length, or the consumer group's lag.
async fn sample_backlog(gw: Shared, args: GatewayArgs, stop: CancellationToken) {
    let lag = match (&gw.queue, args.kafka.kafka_group.as_deref()) {
        (Queue::Kafka { topic, .. }, Some(group)) => {
            qp_protocol::lag::LagProbe::from_args(&args.kafka, topic, group).ok()
        }
        _ => None,
    };
    let lag = lag.map(Arc::new);
    loop {
        let value = match &gw.queue {
            Queue::RedisList { key } => redis::cmd("LLEN")
                .arg(key)
                .query_async::<u64>(&mut gw.conn.clone())
                .await
                .ok(),
            // Entries in the stream: an upper bound of the backlog (acknowledged entries stay
            // until trimmed), cheap and never below it.
            Queue::RedisStream { key } => redis::cmd("XLEN")
                .arg(key)
                .query_async::<u64>(&mut gw.conn.clone())
                .await
                .ok(),
            Queue::Kafka { .. } => match &lag {
                Some(l) => {
                    let l = l.clone();
                    tokio::task::spawn_blocking(move || l.total().ok())
                        .await
                        .ok()
                        .flatten()
                }
                None => None,
            },
        };
        *gw.backlog.lock().expect("backlog lock") = value;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Properties of the parts of a request the gateway reads before anything else.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Any header bytes give a media type without parameters or surrounding space.
        #[test]
        fn media_types_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let m = media_type(Some(&raw));
            prop_assert!(!m.contains(';'));
            prop_assert_eq!(m.trim(), m.as_str());
        }

        /// An id the gateway makes is always a valid id, scoped to its client; an invalid key
        /// is refused, never passed on.
        #[test]
        fn request_ids_are_valid_and_scoped(
            client in proptest::option::of("[a-z0-9][a-z0-9-]{0,47}"),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..160)),
        ) {
            match request_id(client.as_deref(), key.as_deref()) {
                Ok(id) => {
                    prop_assert!(valid_id(&id), "{}", id);
                    if let Some(c) = &client {
                        prop_assert!(owns(c, &id));
                    }
                    if let Some(k) = &key {
                        prop_assert!(id.ends_with(std::str::from_utf8(k).unwrap()));
                    }
                }
                Err(msg) => prop_assert!(key.is_some() && msg.starts_with("Idempotency-Key")),
            }
        }

        /// Valid keys are taken as they are.
        #[test]
        fn valid_keys_are_kept(key in "[A-Za-z0-9._:-]{1,60}", client in "[a-z0-9]{1,20}") {
            prop_assert_eq!(request_id(Some(&client), Some(key.as_bytes())), Ok(format!("{client}:{key}")));
            prop_assert_eq!(request_id(None, Some(key.as_bytes())), Ok(key.clone()));
        }
    }
}
