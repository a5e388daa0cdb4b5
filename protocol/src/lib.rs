//! `qp-protocol`: the contract between the QueueProcessor operator and its workers, used by both
//! binaries and depending on neither.
//!
//! - [`keys`]: every Redis key of a QueueProcessor, under one hash tag
//! - [`scripts`]: the Lua scripts (in `src/lua/`), each written once: the heartbeat a worker
//!   writes and the operator reads, request states and results, the Redis list's recovery
//! - [`tokens`]: the token pool client (the lease semaphore in Redis)
//! - [`lag`]: consumer-group lag of a Kafka topic
//! - [`redis_conn`], [`kafka`]: connection settings, one builder each
//! - [`settings`]: the worker's typed settings, rendered by the operator, parsed by the worker
//! - [`observability`]: the `/metrics`, `/healthz`, `/readyz` router and the tracing init of both
//!   binaries

pub mod error;
pub mod kafka;
pub mod keys;
pub mod lag;
pub mod observability;
pub mod redis_conn;
pub mod scripts;
pub mod settings;
pub mod tokens;

pub use error::{Error, Result};
