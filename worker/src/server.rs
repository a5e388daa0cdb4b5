//! Serving the small HTTP surface every worker process has: `/metrics` for Prometheus,
//! `/healthz` (the process is alive) and `/readyz` (it is connected and taking work; false
//! while draining). The routes are [`qp_protocol::observability::router`], shared with the
//! operator; the gateway merges its API into them.

use std::net::SocketAddr;

use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{Error, Result};

pub use qp_protocol::observability::Readiness;

/// Bind and serve until `stop`; returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Http(format!("binding {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Http(e.to_string()))?;
    info!(%bound, "serving /metrics, /healthz, /readyz");
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok((bound, handle))
}
