//! `qp-worker`: the data plane of a QueueProcessor.
//!
//! - [`tokens`]: the global concurrency budget, a lease semaphore in Redis (reused by the operator)
//! - [`source`]: Kafka consumer group or Redis list, with at-least-once acknowledgement
//! - [`engine`]: slot -> token -> handler -> result -> acknowledgement
//! - [`results`]: request state and results in Redis, written once, in batches
//! - [`handler`]: http, exec and built-in handlers
//! - [`run`]: wiring for `qp-worker run`; [`gateway`]: `qp-worker gateway`

pub mod config;
pub mod deadletter;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod handler;
pub mod heartbeat;
pub mod keys;
pub mod lag;
pub mod metrics;
pub mod offsets;
pub mod redis_conn;
pub mod results;
pub mod run;
pub mod server;
pub mod source;
pub mod tokens;

pub use error::{Error, Result};
