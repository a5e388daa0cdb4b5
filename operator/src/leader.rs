//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas are safe: only
//! the holder reconciles and writes.
//!
//! Written here (about a hundred lines) because kube-rs has no leader election of its own, and
//! the crates that add one pin other kube versions or need `patch`, which our RBAC does not
//! grant. The protocol is the client-go one: the holder renews `renewTime` every
//! `renew_every`; anyone may take the Lease over once it has seen no renewal for
//! `leaseDurationSeconds`; every write is a `replace` carrying the `resourceVersion` that was
//! read, so two candidates racing for an expired Lease cannot both win (one gets a 409
//! Conflict).
//!
//! Expiry is judged on the follower's own monotonic clock, from when it saw the Lease change,
//! not by comparing the holder's `renewTime` with the follower's wall clock: with clocks a
//! minute apart the follower took over a Lease that was renewed every second, and two replicas
//! led at once.
//!
//! A leader that cannot renew within the lease duration steps down (the watch channel says
//! `false`) and the process exits, so it never keeps writing next to a new leader.
//!
//! A leader that stops on purpose (SIGTERM: a rolling update, a drained node) resigns: it
//! stops campaigning and empties the Lease's holder, so a waiting replica takes over at its
//! next attempt (within `renew_every`) instead of after the whole lease duration.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// Outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Leading,
    /// Someone else holds it; it expires in this long (if known).
    Following(Option<Duration>),
}

struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The holder's last renewal as we read it (holder, renewTime), and when (our clock) we
    /// first saw it.
    observed: Option<((String, String), tokio::time::Instant)>,
}

impl Elector {
    fn spec(&self, now: Timestamp, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn attempt(&mut self) -> kube::Result<Attempt> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, 0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        // When did the holder last renew, by our clock: when we first saw this renewal.
        let renewal = (
            holder.to_owned(),
            spec.renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
        );
        let seen = match &self.observed {
            Some((r, at)) if *r == renewal => *at,
            _ => {
                let at = tokio::time::Instant::now();
                self.observed = Some((renewal, at));
                at
            }
        };
        let expires_in = spec
            .renew_time
            .as_ref()
            .map(|_| duration.saturating_sub(seen.elapsed()));
        let expired = expires_in.is_none_or(|d| d.is_zero());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if holder == self.cfg.identity {
            self.spec(now, transitions, spec.acquire_time.clone())
        } else if expired || holder.is_empty() {
            self.spec(now, transitions + 1, None)
        } else {
            return Ok(Attempt::Following(expires_in));
        };
        lease.spec = Some(next);
        // `replace` sends our resourceVersion: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(None)),
            Err(e) => Err(e),
        }
    }
}

/// A running campaign: [`Campaign::leading`] says whether we lead right now.
pub struct Campaign {
    pub leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl Campaign {
    /// Stop campaigning and, if we hold the Lease, give it up (holder emptied, renewal time
    /// kept), so another replica takes it at its next attempt. The caller must have stopped
    /// writing first. Best effort: if this fails, the Lease simply expires.
    pub async fn resign(self) {
        self.task.abort();
        let _ = self.task.await;
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.cfg.name, "resigned the lease"),
            Err(e) => warn!(error = %e, "resigning the lease failed; it will expire"),
        }
    }
}

/// Campaign until [`Campaign::resign`]; `leading` says whether we lead right now.
pub fn spawn(client: Client, cfg: LeaseConfig) -> Campaign {
    let (tx, rx) = watch::channel(false);
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut elector = Elector {
        api: api.clone(),
        cfg: cfg.clone(),
        observed: None,
    };
    let task = tokio::spawn(async move {
        let mut last_renewed: Option<tokio::time::Instant> = None;
        loop {
            let mut wait = elector.cfg.renew_every;
            // A renewal that hangs is a failed one: a leader must notice in time to step down.
            let attempt = tokio::time::timeout(elector.cfg.renew_every * 2, elector.attempt())
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("lease request timed out".into())));
            match attempt {
                Ok(Attempt::Leading) => {
                    if !*tx.borrow() {
                        info!(lease = %elector.cfg.name, identity = %elector.cfg.identity, "became leader");
                    }
                    last_renewed = Some(tokio::time::Instant::now());
                    let _ = tx.send(true);
                }
                Ok(Attempt::Following(expires_in)) => {
                    if *tx.borrow() {
                        warn!("lost the lease to another replica");
                    }
                    last_renewed = None;
                    let _ = tx.send(false);
                    // Try again right when the holder's lease runs out, not up to a period later.
                    if let Some(left) = expires_in {
                        wait = wait.min(left + Duration::from_millis(20));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "lease renewal failed");
                    // Keep leading only while our last renewal is still valid.
                    let valid =
                        last_renewed.is_some_and(|t| t.elapsed() < elector.cfg.lease_duration);
                    if !valid && *tx.borrow() {
                        warn!("could not renew the lease in time; stepping down");
                        let _ = tx.send(false);
                    }
                }
            }
            tokio::time::sleep(wait).await;
        }
    });
    Campaign {
        leading: rx,
        task,
        api,
        cfg,
    }
}
