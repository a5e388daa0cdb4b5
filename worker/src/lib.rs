//! `qp-worker`: the data plane of a QueueProcessor.
//!
//! - [`keeper`]: this worker's local stock of leases from the global token pool
//!   (`qp_protocol::tokens`)
//! - [`source`]: Kafka consumer group or Redis list, with at-least-once acknowledgement
//! - [`engine`]: slot -> token -> handler -> result -> acknowledgement
//! - [`results`]: request state and results in Redis, written once, in batches
//! - [`group_commit`]: the batching loop of the result writer and the Redis acknowledgers
//! - [`handler`]: http, exec and built-in handlers
//! - [`run`]: wiring for `qp-worker run`; [`gateway`]: `qp-worker gateway`; [`replay`]:
//!   `qp-worker replay` (dead letters back onto the source)

pub mod cli;
pub mod deadletter;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod group_commit;
pub mod handler;
pub mod heartbeat;
pub mod keeper;
pub mod metrics;
pub mod offsets;
pub mod replay;
pub mod results;
pub mod retry;
pub mod run;
pub mod server;
pub mod source;
pub mod tls;

pub use error::{Error, Result};
