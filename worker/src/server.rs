//! Serving the small HTTP surface every worker process has: `/metrics` for Prometheus,
//! `/healthz` (the process is alive) and `/readyz` (it is connected and taking work; false
//! while draining). The routes are [`qp_protocol::observability::router`], shared with the
//! operator; the gateway merges its API into them.
//!
//! The accept loop is written here on hyper rather than with `axum::serve`, which sets no timer
//! on hyper's connections: without one, hyper's header read timeout does not apply, and a
//! client that sends its headers a byte at a time (slowloris), or connects and says nothing,
//! holds a connection and its memory for ever. Here a request's headers must arrive within
//! [`HEADER_READ_TIMEOUT`], and at most [`MAX_CONNECTIONS`] connections are served at once (more
//! wait in the kernel's backlog; the gateway's API sets its own bound, `--max-connections`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::tls::{PeerName, Reloading};
use crate::{Error, Result};

pub use qp_protocol::observability::Readiness;

/// How long a client may take to send a request's headers, on a new connection or an idle
/// kept-alive one; then the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once by [`serve`] (metrics and probes; the gateway's API sets its own).
pub const MAX_CONNECTIONS: usize = 4096;

/// How long requests in flight may take to finish once `stop` fired (long polls answer at
/// once on stop; this bounds everything else).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bind and serve until `stop`; returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, app, None, MAX_CONNECTIONS, stop).await
}

/// [`serve`] with at most `max_connections` at once, and optionally over TLS: the handshake
/// must finish within [`HEADER_READ_TIMEOUT`], and with client certificates on, each request
/// carries the client's [`PeerName`].
pub async fn serve_with(
    addr: SocketAddr,
    app: Router,
    tls: Option<Reloading>,
    max_connections: usize,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Http(format!("binding {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Http(e.to_string()))?;
    info!(%bound, tls = tls.is_some(), "serving HTTP");
    let handle = tokio::spawn(accept_loop(listener, app, tls, max_connections, stop));
    Ok((bound, handle))
}

/// One HTTP/1.1 connection with the header read timeout.
fn connection<S, A>(stream: S, app: A) -> http1::Connection<TokioIo<S>, TowerToHyperService<A>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    A::Future: Send + 'static,
{
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
}

/// One TLS connection: the handshake, bounded like the headers (a client that never finishes
/// it holds nothing for long), then HTTP with the client certificate's name, if any, on every
/// request. `None` when the handshake failed.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    app: Router,
    tls: Reloading,
    watcher: hyper_util::server::graceful::Watcher,
) -> Option<std::result::Result<(), hyper::Error>> {
    let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.current().accept(stream)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return None;
        }
    };
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::common_name)
        .map(PeerName);
    let app = tower::ServiceBuilder::new()
        .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(p) = &peer {
                req.extensions_mut().insert(p.clone());
            }
            req
        })
        .service(app);
    Some(watcher.watch(connection(stream, app)).await)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Reloading>,
    max_connections: usize,
    stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: let connections close before trying again.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let watcher = graceful.watcher();
        let (app, tls) = (app.clone(), tls.clone());
        let task = async move {
            let result = match tls {
                None => Some(watcher.watch(connection(stream, app)).await),
                // Boxed: a TLS connection's state is several times a plain one's, and inline
                // it would make every plain connection's task as large (3,344 bytes instead
                // of 896 in a release build; a parked long poll holds its task for up to a
                // minute, and 10,000 parked polls took 148 MB instead of 123).
                Some(tls) => Box::pin(serve_tls(stream, app, tls, watcher)).await,
            };
            if let Some(Err(e)) = result {
                debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        };
        tokio::spawn(task);
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => debug!("connections still open after the grace period"),
    }
}
