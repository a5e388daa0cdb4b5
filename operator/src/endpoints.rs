//! One shared Redis connection per endpoint (address, credentials, TLS), each behind its own
//! lock and with its own memory of failure, so a Redis that hangs or refuses costs only the
//! QueueProcessors that use it.
//!
//! Before, one lock guarded every endpoint and was held across a 5 s connect, and a failure
//! was not remembered: a QueueProcessor whose Redis was black-holed took the lock for 5 s at
//! every poll, and every other QueueProcessor's decision waited behind it. Now a failed connect
//! is remembered with a backoff (1 s, doubling to 30 s): calls inside it get the same error at
//! once. An established connection reconnects on its own (the `redis` crate's manager).
//!
//! QueueProcessors register the endpoint they use ([`Endpoints::use_for`]); an endpoint no
//! QueueProcessor uses any more (deleted, or edited to another Redis or a rotated password) is
//! dropped with its connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qp_protocol::redis_conn::{Conn, RedisSettings, is_refusal};

use crate::error::{Error, Result};

/// How long a connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

enum State {
    Idle,
    Connected(Conn),
    Failed {
        retry_at: Instant,
        backoff: Duration,
        why: String,
        /// Redis refused the settings (credentials, certificate), rather than being away.
        refused: bool,
    },
}

struct Endpoint {
    settings: RedisSettings,
    state: tokio::sync::Mutex<State>,
}

impl Endpoint {
    async fn connect(&self) -> Result<Conn> {
        let mut state = self.state.lock().await;
        let previous = match &*state {
            State::Connected(c) => return Ok(c.clone()),
            State::Failed {
                retry_at,
                backoff,
                why,
                refused,
            } => {
                let now = Instant::now();
                if now < *retry_at {
                    let why = format!("{why} (next attempt in {:.0?})", *retry_at - now);
                    return Err(if *refused {
                        Error::RedisRefused(why)
                    } else {
                        Error::Redis(why)
                    });
                }
                Some(*backoff)
            }
            State::Idle => None,
        };
        let (why, refused) = match tokio::time::timeout(CONNECT_TIMEOUT, self.settings.connect())
            .await
        {
            Ok(Ok(conn)) => {
                *state = State::Connected(conn.clone());
                return Ok(conn);
            }
            // The connection manager retries a refused password like a network error;
            // one attempt without retries says which it is.
            failed => match (self.settings.diagnose().await, failed) {
                (Some(e), _) | (None, Ok(Err(e))) => (format!("connecting: {e}"), is_refusal(&e)),
                (None, _) => (
                    format!("connecting timed out after {CONNECT_TIMEOUT:?}"),
                    false,
                ),
            },
        };
        let backoff = previous.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
        *state = State::Failed {
            retry_at: Instant::now() + backoff,
            backoff,
            why: why.clone(),
            refused,
        };
        Err(if refused {
            Error::RedisRefused(why)
        } else {
            Error::Redis(why)
        })
    }
}

/// The Redis endpoints of every QueueProcessor.
#[derive(Default)]
pub struct Endpoints {
    endpoints: Mutex<Vec<Arc<Endpoint>>>,
    /// Per QueueProcessor: its Redis, then the other Redis its scaling signals read.
    by_qp: Mutex<HashMap<String, Vec<RedisSettings>>>,
}

impl Endpoints {
    /// The shared connection to `settings`, connecting if needed (or the remembered error).
    pub async fn get(&self, settings: &RedisSettings) -> Result<Conn> {
        let endpoint = {
            let mut endpoints = self.endpoints.lock().expect("endpoints lock");
            match endpoints.iter().find(|e| &e.settings == settings) {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(Endpoint {
                        settings: settings.clone(),
                        state: tokio::sync::Mutex::new(State::Idle),
                    });
                    endpoints.push(e.clone());
                    e
                }
            }
        };
        endpoint.connect().await
    }

    /// Record that QueueProcessor `qp` (`namespace/name`) uses `settings` now.
    pub fn use_for(&self, qp: &str, settings: &[RedisSettings]) {
        let mut by_qp = self.by_qp.lock().expect("endpoints lock");
        if by_qp.get(qp).map(Vec::as_slice) != Some(settings) {
            by_qp.insert(qp.to_owned(), settings.to_vec());
            self.prune(&by_qp);
        }
    }

    /// QueueProcessor `qp` is gone.
    pub fn forget(&self, qp: &str) {
        let mut by_qp = self.by_qp.lock().expect("endpoints lock");
        by_qp.remove(qp);
        self.prune(&by_qp);
    }

    /// Drop endpoints no QueueProcessor uses.
    fn prune(&self, by_qp: &HashMap<String, Vec<RedisSettings>>) {
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .retain(|e| by_qp.values().flatten().any(|s| s == &e.settings));
    }

    /// Endpoints held now.
    pub fn len(&self) -> usize {
        self.endpoints.lock().expect("endpoints lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
