//! Benchmarks behind `make bench` (driver: `src/bin/qp-bench.rs`). Each group measures one part
//! of the system against real services and returns its figures as `(name, value, unit)`;
//! `BENCHMARKS.md` explains every figure and records a run.
//!
//! Adding a group: a module with `pub async fn run(env: &Env) -> Vec<Figure>`, an entry in
//! [`GROUPS`] and an arm in [`run_group`].

pub mod chaos;
pub mod fleet;
pub mod gateway;
pub mod gateway_load;
pub mod goals;
pub mod operator;
pub mod private_redis;
pub mod worker;

use std::time::Duration;

use crate::env::Env;

/// One measured figure: name (`group.what`), value, unit.
pub type Figure = (String, f64, String);

/// A benchmark setting from the environment, or its default when unset or unparsable.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The groups in the order they run, each with the time it may take at most.
pub const GROUPS: &[(&str, Duration)] = &[
    ("worker", Duration::from_secs(300)),
    ("gateway", Duration::from_secs(300)),
    ("operator", Duration::from_secs(900)),
    ("chaos", Duration::from_secs(480)),
];

/// Run one group by name; `None` for an unknown name.
pub async fn run_group(name: &str, env: &Env) -> Option<Vec<Figure>> {
    Some(match name {
        "worker" => worker::run(env).await,
        "gateway" => gateway::run(env).await,
        "operator" => operator::run(env).await,
        "chaos" => chaos::run(env).await,
        _ => return None,
    })
}
