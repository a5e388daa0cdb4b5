//! Retrying a Redis or Kafka write that must eventually succeed (results, acknowledgements,
//! dead letters), with the `backon` crate. Loops that do more than retry one operation (the
//! lease keeper's refill, the gateway's `done` subscription) and the per-message retry delay
//! (`engine::backoff`, part of the data plane's semantics) stay hand-written; each says why.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Exponential backoff from `min`, doubling up to `max`, without jitter and without giving up.
pub fn forever(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_factor(2.0)
        .with_max_delay(max)
        .without_max_times()
}
