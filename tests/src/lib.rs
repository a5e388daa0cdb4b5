//! Shared helpers of the black-box tests and benchmarks: the local environment, our binaries as
//! processes, Kafka and Redis conveniences. Every test runs against real services.

pub mod bench;
pub mod chart;
pub mod cluster;
pub mod downstream;
pub mod e2e;
pub mod e2e_secured;
pub mod e2e_stream;
pub mod env;
pub mod faults;
pub mod fixture;
pub mod kafka;
pub mod local;
pub mod operator;
pub mod pki;
pub mod procs;
pub mod proxy;
pub mod restart;
pub mod tools;
