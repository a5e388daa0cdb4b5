//! `qp-operator run`: metrics and probes, leader election, then the controller while leading.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use qp_protocol::observability::{self, Readiness};
use tracing::{info, warn};

use crate::builder::BuildOptions;
use crate::cli::RunArgs;
use crate::controller::{self, Context};
use crate::error::{Error, Result};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;

/// `/metrics`, `/healthz`, `/readyz` (ready once connected to the API server; a follower is
/// ready too: it is healthy and waiting).
pub async fn serve_probes(addr: SocketAddr, metrics: Metrics, ready: Readiness) -> Result<()> {
    let app = observability::router(move || metrics.render(), Some(ready));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Local(format!("binding {addr}: {e}")))?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

pub async fn run(args: RunArgs) -> Result<()> {
    let metrics = Metrics::new();
    let ready = Readiness::default();
    serve_probes(args.listen, metrics.clone(), ready.clone()).await?;
    let client = Client::try_default().await?;
    client.apiserver_version().await?;
    ready.set(true);

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("qp-operator-{}", std::process::id()));
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        BuildOptions {
            default_image: args.worker_image.clone(),
        },
        &identity,
        Duration::from_secs(args.cleanup_timeout_seconds),
    ));

    if !args.leader_election {
        metrics.leader.set(1);
        controller::run(ctx, args.watch_namespace.clone()).await;
        return Ok(());
    }
    let mut campaign = leader::spawn(
        client,
        LeaseConfig {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: Duration::from_secs(args.lease_duration_seconds.max(2)),
            renew_every: Duration::from_secs(args.lease_renew_seconds.max(1)),
        },
    );
    info!(%identity, lease = %args.lease_name, "waiting for leadership");
    let leading = &mut campaign.leading;
    // A follower asked to stop simply stops (the controller is not running yet).
    let signalled = crate::local::shutdown_signal()?;
    tokio::pin!(signalled);
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { return Ok(()) },
            _ = &mut signalled => return Ok(()),
        }
    }
    metrics.leader.set(1);
    info!(%identity, "leading: starting the controller");
    let controller = controller::run(ctx, args.watch_namespace.clone());
    let lost = async {
        while *leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        // Stopped by a signal: stop claiming leadership before handing the Lease over, so no
        // observer ever sees two leaders.
        _ = controller => {
            metrics.leader.set(0);
            campaign.resign().await;
            Ok(())
        }
        _ = lost => {
            metrics.leader.set(0);
            // Exiting is the safe way to stop writing at once; the Deployment restarts us as
            // a follower.
            warn!("leadership lost: exiting");
            Err(Error::Local("lost leadership".into()))
        }
    }
}
