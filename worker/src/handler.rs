//! The user's code: what a worker runs for each message.
//!
//! Three kinds, chosen by the QueueProcessor's `worker.handler`:
//! - `http`: POST the message body to a URL (typically a sidecar container in the same pod);
//!   the response body is the result. 5xx answers, timeouts and connection errors are retried;
//!   4xx answers mean the message itself is bad and go straight to the dead letter.
//! - `exec`: run a command with the message on stdin; its stdout is the result; a non-zero exit
//!   is retried. One process per message: simple and isolated, not fast.
//! - built-ins for tests and benchmarks: `echo`, `sleep:<ms>`, `fail:<pattern>`,
//!   `panic:<pattern>` (a handler bug) and `probe:<ms>` (records how many handlers run at once,
//!   in Redis, to prove the token cap).
//!
//! Retries and backoff live in the engine, the same for every kind; a handler only says whether
//! a failure is worth retrying.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use qp_protocol::redis_conn::Conn;
pub use qp_protocol::settings::HandlerSpec;
use tracing::warn;

/// Why a handler call failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Transient (timeout, 5xx, crashed process): retried with backoff.
    Retryable(String),
    /// The message cannot succeed (4xx, rejected input): dead-lettered at once.
    Permanent(String),
}

impl HandlerError {
    pub fn reason(&self) -> &str {
        match self {
            HandlerError::Retryable(r) | HandlerError::Permanent(r) => r,
        }
    }
}

/// What the handler sees of a message.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub id: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a Bytes,
}

/// A ready-to-call handler.
#[derive(Clone)]
pub struct Handler {
    spec: HandlerSpec,
    timeout: Duration,
    max_result_bytes: usize,
    http: reqwest::Client,
    /// Redis connection and key prefix for the `probe` built-in.
    probe: Option<(Conn, String)>,
    /// Variables of the worker's environment an exec handler sees, besides [`EXEC_BASE_ENV`].
    exec_env: Vec<String>,
    /// Headers an HTTP handler sends with every message (credentials from a Secret).
    headers: reqwest::header::HeaderMap,
}

/// What every exec handler sees of the worker's environment. The rest (the Redis and Kafka
/// passwords among it) is cleared: a handler is the user's code, and may log its environment.
pub const EXEC_BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// How much of an exec handler's stderr is kept for the failure reason; the rest is read and
/// dropped, so a chatty child never blocks on a full pipe.
const EXEC_STDERR_KEPT: u64 = 4096;

impl Handler {
    pub fn new(
        spec: HandlerSpec,
        timeout: Duration,
        max_result_bytes: usize,
        probe: Option<(Conn, String)>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .build()
            .expect("static reqwest configuration is valid");
        Handler {
            spec,
            timeout,
            max_result_bytes,
            http,
            probe,
            exec_env: Vec::new(),
            headers: reqwest::header::HeaderMap::new(),
        }
    }

    /// Send these headers with every HTTP handler call.
    pub fn with_headers(mut self, headers: reqwest::header::HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Pass these variables of the worker's environment to exec handlers too.
    pub fn with_exec_env(mut self, names: Vec<String>) -> Self {
        self.exec_env = names;
        self
    }

    pub fn spec(&self) -> &HandlerSpec {
        &self.spec
    }

    /// Run the handler once for one message.
    pub async fn call(&self, req: &Request<'_>) -> Result<Bytes, HandlerError> {
        let out = match &self.spec {
            HandlerSpec::Echo => Ok(req.body.clone()),
            HandlerSpec::Sleep { millis } => {
                tokio::time::sleep(Duration::from_millis(*millis)).await;
                Ok(req.body.clone())
            }
            HandlerSpec::Fail { pattern } => {
                if contains(req.body, pattern.as_bytes()) {
                    Err(HandlerError::Retryable(format!(
                        "built-in fail handler: message matches '{pattern}'"
                    )))
                } else {
                    Ok(req.body.clone())
                }
            }
            HandlerSpec::Panic { pattern } => {
                if contains(req.body, pattern.as_bytes()) {
                    panic!("built-in panic handler: message matches '{pattern}'");
                }
                Ok(req.body.clone())
            }
            HandlerSpec::Probe { millis } => self.probe(*millis, req).await,
            HandlerSpec::Http { url } => self.http(url, req).await,
            HandlerSpec::Exec { command } => self.exec(command, req).await,
        }?;
        if out.len() > self.max_result_bytes {
            return Err(HandlerError::Permanent(format!(
                "result of {} bytes exceeds the limit of {} bytes",
                out.len(),
                self.max_result_bytes
            )));
        }
        Ok(out)
    }

    async fn probe(&self, millis: u64, req: &Request<'_>) -> Result<Bytes, HandlerError> {
        let (conn, prefix) = self
            .probe
            .as_ref()
            .ok_or_else(|| HandlerError::Permanent("probe handler without Redis".into()))?;
        let mut conn = conn.clone();
        let current = format!("{prefix}:probe:current");
        let max = format!("{prefix}:probe:max");
        let runs = format!("{prefix}:probe:runs");
        let _: i64 = qp_protocol::scripts::PROBE_ENTER
            .key(&current)
            .key(&max)
            .key(&runs)
            .arg(req.id)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| HandlerError::Retryable(format!("probe: {e}")))?;
        tokio::time::sleep(Duration::from_millis(millis)).await;
        let _: i64 = redis::cmd("DECR")
            .arg(&current)
            .query_async(&mut conn)
            .await
            .map_err(|e| HandlerError::Retryable(format!("probe: {e}")))?;
        Ok(req.body.clone())
    }

    /// POST the message. Failure reasons name the kind of failure only (they are stored for
    /// clients and in dead letters); the URL (credentials redacted), the error and an excerpt of
    /// the answer go to the worker's log.
    async fn http(&self, url: &str, req: &Request<'_>) -> Result<Bytes, HandlerError> {
        let failed = |public: HandlerError, detail: &dyn std::fmt::Display| {
            warn!(id = %req.id, url = %redact_url(url), %detail, reason = %public.reason(), "http handler failed");
            public
        };
        let resp = self
            .http
            .post(url)
            .headers(self.headers.clone())
            .header(
                "content-type",
                req.content_type.unwrap_or("application/octet-stream"),
            )
            .header("qp-id", req.id)
            .body(req.body.clone())
            .send()
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    format!("timed out after {:?}", self.timeout)
                } else if e.is_connect() {
                    "could not connect".to_owned()
                } else {
                    "request failed".to_owned()
                };
                // reqwest's message names the URL: left out, the log has the redacted one.
                failed(
                    HandlerError::Retryable(format!("http handler: {what}")),
                    &e.without_url(),
                )
            })?;
        let status = resp.status();
        // Read at most one byte past the limit: a handler that answers with gigabytes (or
        // streams without end) must not be read to the end first (it was, into memory).
        let limit = self.max_result_bytes;
        if resp.content_length().is_some_and(|n| n > limit as u64) && status.is_success() {
            return Err(too_large("http handler", limit));
        }
        let mut resp = resp;
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            failed(
                HandlerError::Retryable("http handler: reading the answer failed".into()),
                &e.without_url(),
            )
        })? {
            let room = (limit + 1).saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() > limit {
                break;
            }
        }
        let body = body.freeze();
        if status.is_success() && body.len() > limit {
            return Err(too_large("http handler", limit));
        }
        if status.is_success() {
            Ok(body)
        } else {
            // The answer's body may carry anything (tokens, stack traces): the log only.
            let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            let reason = format!("http handler answered {status}");
            let public =
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    HandlerError::Retryable(reason)
                } else {
                    HandlerError::Permanent(reason)
                };
            Err(failed(public, &format!("answer: {excerpt}")))
        }
    }

    async fn exec(&self, command: &[String], req: &Request<'_>) -> Result<Bytes, HandlerError> {
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..]).env_clear();
        for name in EXEC_BASE_ENV
            .iter()
            .copied()
            .chain(self.exec_env.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        // Its own process group, so that everything it started can be killed with it: a
        // grandchild holding the pipes kept a killed child's output open.
        cmd.process_group(0);
        let mut child = cmd
            .env("QP_MESSAGE_ID", req.id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                warn!(id = %req.id, program = %command[0], error = %e, "exec handler did not start");
                HandlerError::Retryable(format!("exec handler could not start: {}", e.kind()))
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let limit = self.max_result_bytes as u64 + 1;
        let run = async {
            let body = req.body.clone();
            let writer = async move {
                // A program that does not read its input is fine: ignore a broken pipe.
                let _ = stdin.write_all(&body).await;
                drop(stdin);
            };
            let mut out = Vec::new();
            let mut err = Vec::new();
            // Both pipes at once: a child that fills stderr while we wait on stdout (or the
            // other way round) would block until the timeout.
            let read_out = async {
                (&mut stdout).take(limit).read_to_end(&mut out).await?;
                if out.len() as u64 >= limit {
                    // Too big: no point reading (or waiting for) the rest.
                    kill_group(&child);
                }
                Ok::<_, std::io::Error>(())
            };
            let read_err = async {
                (&mut stderr)
                    .take(EXEC_STDERR_KEPT)
                    .read_to_end(&mut err)
                    .await?;
                tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await?;
                Ok::<_, std::io::Error>(())
            };
            let (_, out_read, err_read) = tokio::join!(writer, read_out, read_err);
            out_read?;
            err_read?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let finished = tokio::time::timeout(self.timeout, run).await;
        // Timed out, or cut short for an oversized result: nothing it started runs on. (A
        // child already waited for has no id any more, so no other process is hit.)
        kill_group(&child);
        let (status, out, err) = finished
            .map_err(|_| {
                HandlerError::Retryable(format!("exec handler: timed out after {:?}", self.timeout))
            })?
            .map_err(|e| HandlerError::Retryable(format!("exec handler: {}", e.kind())))?;
        if out.len() > self.max_result_bytes {
            return Err(too_large("exec handler", self.max_result_bytes));
        }
        if status.success() {
            Ok(Bytes::from(out))
        } else {
            // stderr may carry anything the program printed (tokens, paths): the log only.
            let err = String::from_utf8_lossy(&err);
            let public = HandlerError::Retryable(format!("exec handler {status}"));
            warn!(id = %req.id, program = %command[0], stderr = %err.trim(), reason = %public.reason(), "exec handler failed");
            Err(public)
        }
    }
}

/// The handler headers named in `names`, each value from `QP_HANDLER_HEADER_<n>` (see
/// `--handler-header-names`). Values are marked sensitive and never appear in errors.
pub fn headers_from_env(names: &[String]) -> Result<reqwest::header::HeaderMap, String> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut headers = reqwest::header::HeaderMap::new();
    for (n, name) in names.iter().enumerate() {
        let var = qp_protocol::settings::handler_header_env(n);
        let header = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("handler header {name:?} is not a valid header name"))?;
        let value =
            std::env::var(&var).map_err(|_| format!("handler header {name}: {var} is not set"))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            format!("handler header {name}: the value in {var} is not a valid header value")
        })?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}

/// A URL for the log: user and password replaced, so a credential put there by mistake is not
/// written out (the worker refuses such URLs at start; this is the second line).
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("redacted");
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// A result over the limit: the message's own fault, so not worth retrying.
fn too_large(what: &str, limit: usize) -> HandlerError {
    HandlerError::Permanent(format!(
        "{what}: result larger than the limit of {limit} bytes"
    ))
}

/// SIGKILL an exec handler's process group (the child and whatever it started). A group that
/// is already gone is fine.
fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(spec: &str) -> Handler {
        Handler::new(spec.parse().unwrap(), Duration::from_secs(5), 1024, None)
    }

    fn req(body: &'static str) -> (String, Bytes) {
        ("id-1".to_owned(), Bytes::from_static(body.as_bytes()))
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!("echo".parse(), Ok(HandlerSpec::Echo));
        assert_eq!("sleep:25".parse(), Ok(HandlerSpec::Sleep { millis: 25 }));
        assert_eq!("probe:5".parse(), Ok(HandlerSpec::Probe { millis: 5 }));
        assert_eq!(
            "fail:poison".parse(),
            Ok(HandlerSpec::Fail {
                pattern: "poison".into()
            })
        );
        assert_eq!(
            "exec:/bin/tr a-z A-Z".parse(),
            Ok(HandlerSpec::Exec {
                command: vec!["/bin/tr".into(), "a-z".into(), "A-Z".into()]
            })
        );
        assert_eq!(
            "http://127.0.0.1:8080/work".parse(),
            Ok(HandlerSpec::Http {
                url: "http://127.0.0.1:8080/work".into()
            })
        );
        for bad in ["", "sleep:x", "fail:", "exec:", "nope", "echo:1"] {
            assert!(
                bad.parse::<HandlerSpec>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[tokio::test]
    async fn echo_and_fail() {
        let (id, body) = req("hello");
        let r = Request {
            id: &id,
            content_type: None,
            body: &body,
        };
        assert_eq!(handler("echo").call(&r).await.unwrap(), body);
        assert_eq!(handler("fail:zzz").call(&r).await.unwrap(), body);
        assert!(matches!(
            handler("fail:ell").call(&r).await,
            Err(HandlerError::Retryable(_))
        ));
    }

    #[tokio::test]
    async fn exec_uses_stdin_and_stdout() {
        let (id, body) = req("shout");
        let r = Request {
            id: &id,
            content_type: None,
            body: &body,
        };
        let out = handler("exec:tr a-z A-Z").call(&r).await.unwrap();
        assert_eq!(&out[..], b"SHOUT");
        let err = handler("exec:false").call(&r).await.unwrap_err();
        assert_eq!(err.reason(), "exec handler exit status: 1");
    }

    /// What a client reads of a failure names its kind, never what the program printed.
    #[tokio::test]
    async fn exec_failures_keep_stderr_out_of_the_reason() {
        let h = exec_handler("echo SECRET-TOKEN >&2; exit 3", Duration::from_secs(5));
        let err = call(&h, "m", b"x").await.unwrap_err();
        assert_eq!(err.reason(), "exec handler exit status: 3");
    }

    #[test]
    fn urls_are_logged_without_credentials() {
        assert_eq!(
            redact_url("http://user:S3CRET@127.0.0.1:1/x?q=1"),
            "http://redacted@127.0.0.1:1/x?q=1"
        );
        assert_eq!(redact_url("http://h/x"), "http://h/x");
    }

    #[tokio::test]
    async fn oversized_results_are_permanent_failures() {
        let body = Bytes::from(vec![b'x'; 2048]);
        let r = Request {
            id: "id",
            content_type: None,
            body: &body,
        };
        let err = handler("echo").call(&r).await.unwrap_err();
        assert!(matches!(err, HandlerError::Permanent(_)), "{err:?}");
    }

    fn request<'a>(id: &'a str, body: &'a Bytes) -> Request<'a> {
        Request {
            id,
            content_type: None,
            body,
        }
    }

    async fn call(h: &Handler, id: &str, body: &'static [u8]) -> Result<Bytes, HandlerError> {
        h.call(&request(id, &Bytes::from_static(body))).await
    }

    fn exec_handler(command: &str, timeout: Duration) -> Handler {
        let spec = format!("exec:{}", serde_json::json!(["sh", "-c", command]));
        Handler::new(spec.parse().unwrap(), timeout, 1024, None)
    }

    /// A child that writes more to stderr than a pipe holds (64 KiB) before its result used
    /// to block until the timeout: stdout was read to the end before stderr.
    #[tokio::test]
    async fn exec_reads_a_chatty_stderr_while_waiting_for_stdout() {
        let h = exec_handler(
            "head -c 200000 /dev/zero >&2; echo done",
            Duration::from_secs(5),
        );
        let started = std::time::Instant::now();
        assert_eq!(&call(&h, "id", b"").await.unwrap()[..], b"done\n");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    /// An oversized result is the message's fault: permanent, at once. It used to read as a
    /// retryable timeout (the child blocked on a full stdout nobody read any more).
    #[tokio::test]
    async fn an_oversized_exec_result_fails_for_good_at_once() {
        let h = exec_handler("head -c 100000 /dev/zero", Duration::from_secs(5));
        let started = std::time::Instant::now();
        let err = call(&h, "id", b"").await.unwrap_err();
        assert!(matches!(err, HandlerError::Permanent(_)), "{err:?}");
        assert!(err.reason().contains("limit of 1024 bytes"), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    /// The worker's environment (Redis and Kafka passwords) does not reach the child; PATH
    /// and the names passed explicitly do. `cargo test` sets CARGO_MANIFEST_DIR for this
    /// process.
    #[tokio::test]
    async fn exec_sees_only_the_allowed_environment() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let print = r#"echo "${CARGO_MANIFEST_DIR:-unset} $QP_MESSAGE_ID""#;
        let out = exec_handler(print, Duration::from_secs(5))
            .call(&request("m-7", &Bytes::from_static(b"")))
            .await
            .unwrap();
        assert_eq!(&out[..], b"unset m-7\n");
        let out = exec_handler(print, Duration::from_secs(5))
            .with_exec_env(vec!["CARGO_MANIFEST_DIR".into()])
            .call(&request("m-7", &Bytes::from_static(b"")))
            .await
            .unwrap();
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
        assert_eq!(String::from_utf8_lossy(&out), format!("{dir} m-7\n"));
    }

    /// A handler answering with a body without end (or gigabytes) was read to the end before
    /// the size check: until the timeout, all of it in memory, then a retryable failure. Now
    /// reading stops one byte past the limit and the message fails for good.
    #[tokio::test]
    async fn an_endless_http_answer_is_cut_at_the_limit() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = [b'x'; 16 * 1024];
            // Until the client hangs up.
            while socket.write_all(b"4000\r\n").await.is_ok()
                && socket.write_all(&chunk).await.is_ok()
                && socket.write_all(b"\r\n").await.is_ok()
            {}
        });
        let h = Handler::new(url.parse().unwrap(), Duration::from_secs(5), 1024, None);
        let started = std::time::Instant::now();
        let err = call(&h, "id", b"hi").await.unwrap_err();
        assert!(matches!(err, HandlerError::Permanent(_)), "{err:?}");
        assert!(err.reason().contains("limit of 1024 bytes"), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        server.abort();
    }

    #[tokio::test]
    async fn exec_times_out() {
        let h = Handler::new(
            "exec:sleep 5".parse().unwrap(),
            Duration::from_millis(100),
            1024,
            None,
        );
        let err = call(&h, "id", b"").await.unwrap_err();
        assert!(err.reason().contains("timed out"), "{err:?}");
    }
}
