//! Reading the Secret values the operator itself needs (Redis password, Kafka credentials).
//!
//! Values are kept for [`MAX_AGE`] per QueueProcessor rather than read every poll: reading
//! them is an API request per Secret per tick otherwise, the largest part of a steady
//! workload's API traffic. A rotated password is therefore picked up within a minute, and at
//! once when the QueueProcessor's spec changes. The values live only in memory and are never
//! logged (nothing here derives `Debug`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crd::{QueueProcessor, SecretKeyRef};
use crate::error::{Error, Result};
use crate::scaler::SecretValues;

/// How long read Secret values are used before they are read again.
pub(super) const MAX_AGE: Duration = Duration::from_secs(60);

/// Secret values read for one generation of a QueueProcessor.
pub(super) struct Cached {
    read_at: Instant,
    generation: Option<i64>,
    values: SecretValues,
}

/// The values every Secret reference of `qp` names: from `cache` when read for this generation
/// less than [`MAX_AGE`] ago, else read now (and cached). A missing Secret or key is an error
/// and is not cached, so fixing it takes effect at the next tick.
pub(super) async fn resolve(
    client: &Client,
    qp: &QueueProcessor,
    cache: &mut Option<Cached>,
) -> Result<SecretValues> {
    let generation = qp.metadata.generation;
    if let Some(c) = cache.as_ref()
        && c.generation == generation
        && c.read_at.elapsed() < MAX_AGE
    {
        return Ok(c.values.clone());
    }
    *cache = None;
    let values = read(client, &qp.namespace_or_default(), &qp.spec.secret_refs()).await?;
    *cache = Some(Cached {
        read_at: Instant::now(),
        generation,
        values: values.clone(),
    });
    Ok(values)
}

/// Secret values the operator itself needs (Redis password, Kafka credentials), by reference.
/// Every reference must resolve, or nothing is applied.
pub(super) async fn read(
    client: &Client,
    namespace: &str,
    refs: &[&SecretKeyRef],
) -> Result<SecretValues> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut out = HashMap::new();
    let mut cache: HashMap<String, Secret> = HashMap::new();
    for r in refs {
        if !cache.contains_key(&r.name) {
            let s = api.get_opt(&r.name).await?.ok_or_else(|| {
                Error::SecretRef(format!("Secret {namespace}/{} does not exist", r.name))
            })?;
            cache.insert(r.name.clone(), s);
        }
        let secret = &cache[&r.name];
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .cloned()
            })
            .ok_or_else(|| {
                Error::SecretRef(format!(
                    "Secret {namespace}/{} has no key {:?}",
                    r.name, r.key
                ))
            })?;
        out.insert((r.name.clone(), r.key.clone()), value);
    }
    Ok(out)
}
