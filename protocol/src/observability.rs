//! What every process exposes about itself, written once: the `/metrics`, `/healthz` and
//! `/readyz` routes and the tracing subscriber.
//!
//! - [`router`]: `/metrics` (Prometheus text format), `/healthz` (`200 ok`: the process is
//!   alive) and, given a [`Readiness`] flag, `/readyz` (`200 ready` or `503 not ready`). Callers
//!   `.merge()` their own routes into it and serve it themselves.
//! - [`init_tracing`]: text or JSON logs on stderr, filtered by `RUST_LOG` or a default.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Readiness flag shared by a process's parts; `/readyz` answers from it.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// `/metrics` rendering `metrics()` in the Prometheus text format, `/healthz`, and `/readyz`
/// when `ready` is given (a process without a readiness notion, like local mode, has none).
pub fn router<F>(metrics: F, ready: Option<Readiness>) -> Router
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let metrics = Arc::new(metrics);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics();
                async move { ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    match ready {
        Some(ready) => app.route(
            "/readyz",
            get(move || {
                let ready = ready.get();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                    .into_response()
                }
            }),
        ),
        None => app,
    }
}

/// Install the global tracing subscriber: `format` on stderr, filtered by `RUST_LOG`, or by
/// `default_filter` (e.g. `"info"`) when `RUST_LOG` is unset or invalid. Panics if called twice.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Status line, content type and body of `GET path`, over a real socket.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (String, Option<String>, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines.next().unwrap().to_owned();
        let ct = lines
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.to_owned());
        (status, ct, body.to_owned())
    }

    async fn serve(app: Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn probes_answer_as_before() {
        let ready = Readiness::default();
        let addr = serve(router(|| "m 1\n".to_owned(), Some(ready.clone()))).await;
        let (status, ct, body) = get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert_eq!(ct.as_deref(), Some("text/plain; version=0.0.4"));
        assert_eq!(body, "m 1\n");
        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.0 200 OK", "ok"));
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.0 503 Service Unavailable", "not ready")
        );
        ready.set(true);
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.0 200 OK", "ready")
        );

        let addr = serve(router(String::new, None)).await;
        assert_eq!(get(addr, "/healthz").await.0, "HTTP/1.0 200 OK");
        assert_eq!(get(addr, "/readyz").await.0, "HTTP/1.0 404 Not Found");
    }
}
