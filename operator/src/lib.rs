//! The QueueProcessor operator: the custom resource API and the controller that scales
//! token-gated workers.

pub mod crd;
