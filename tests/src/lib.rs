//! Shared helpers of the black-box tests and benchmarks: the local environment, our binaries as
//! processes, Kafka and Redis conveniences. Every test runs against real services.

pub mod env;
pub mod fixture;
pub mod kafka;
pub mod procs;
