//! The QueueProcessor operator: the custom resource API, the pure scaling policy and Deployment
//! builder, and the two backends that apply decisions (a Kubernetes controller, local processes).
//!
//! - [`crd`]: the `QueueProcessor` API
//! - [`policy`], [`rates`]: pure decision code; [`health`]: why pods cannot run (pure)
//! - [`workload`], [`builder`]: what a worker is told, and its Kubernetes objects (pure)
//! - [`measure`] (with [`kafka`], lag of every group in one round per cluster), [`scaler`]:
//!   readings -> one decision; [`tick`]: measure -> decide -> apply ->
//!   tokens -> metrics, the one loop body both backends run
//! - [`controller`], [`leader`], [`run`]: the cluster backend; [`local`]: the process backend

pub mod builder;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod kafka;
pub mod leader;
pub mod local;
pub mod measure;
pub mod metrics;
pub mod policy;
pub mod rates;
pub mod run;
pub mod scaler;
pub mod signals;
pub mod tick;
pub mod workload;
