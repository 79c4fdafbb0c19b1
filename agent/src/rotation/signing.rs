//! Key generation and one batched signing call: the work of the executor's signing tasks.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt as _;
use meshcert_protocol::Entry;
use meshcert_protocol::api::{CsrRequest, SignRequest};
use tokio::sync::Semaphore;

use super::core::SignedBatch;
use crate::csr;
use crate::issuer::{Issuer, IssuerError};
use crate::keys::{KeyAlgorithm, KeyError, PrivateKey};

/// Blocking tasks one batch of keys is split into (RSA keys take a while: two cores).
const KEYGEN_TASKS: usize = 2;

/// Generates a key (RSA keys off the async threads: they take a while).
pub async fn generate_key(algorithm: KeyAlgorithm) -> Result<PrivateKey, KeyError> {
    let mut keys = generate_keys(algorithm, 1).await?;
    keys.pop()
        .map_or_else(|| PrivateKey::generate(algorithm), Ok)
}

/// Generates `count` keys: ECDSA keys at once, RSA keys (slow) off the async threads in at
/// most [`KEYGEN_TASKS`] blocking tasks (not one per key), so that a batch of 256 rotations
/// does not spread over a large blocking pool, each thread of which keeps its own malloc arena.
pub async fn generate_keys(
    algorithm: KeyAlgorithm,
    count: usize,
) -> Result<Vec<PrivateKey>, KeyError> {
    let some = move |n: usize| {
        (0..n)
            .map(|_| PrivateKey::generate(algorithm))
            .collect::<Result<Vec<_>, _>>()
    };
    if matches!(algorithm, KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384) {
        // Tens of µs each: made on this thread, the keys (which live as long as their SVID)
        // stay in this thread's malloc arena instead of pinning one per blocking thread.
        return some(count);
    }
    let per_task = count.div_ceil(KEYGEN_TASKS).max(1);
    let mut tasks = Vec::with_capacity(KEYGEN_TASKS);
    let mut left = count;
    while left > 0 {
        let n = left.min(per_task);
        left -= n;
        tasks.push((n, tokio::task::spawn_blocking(move || some(n))));
    }
    let mut keys = Vec::with_capacity(count);
    for (n, task) in tasks {
        keys.extend(match task.await {
            Ok(result) => result?,
            Err(_) => some(n)?,
        });
    }
    Ok(keys)
}

/// Runs a background task's `work`; a panic inside it (a bug) becomes
/// [`IssuerError::Internal`], so the task still reports an outcome and nothing it carried
/// stays in flight.
pub async fn unless_panicked<T>(work: impl Future<Output = T>) -> Result<T, IssuerError> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".to_owned());
            IssuerError::Internal(message)
        })
}

/// Generates the keys and CSRs of one batch (`jobs`: the entries, and whether each is
/// agent-local) and has the holder sign them, once a permit of `semaphore` is held.
pub async fn sign_batch<I: Issuer>(
    issuer: &I,
    semaphore: &Semaphore,
    algorithm: KeyAlgorithm,
    jobs: Vec<(Arc<Entry>, bool)>,
) -> SignedBatch {
    // The permit first: only the batches being signed hold their fresh keys, CSRs and
    // bodies in memory, not every due entry at once.
    let _permit = semaphore
        .acquire()
        .await
        .map_err(|_| IssuerError::Setup("signing closed".into()))?;
    let mut keys = Vec::with_capacity(jobs.len());
    let mut csrs = Vec::with_capacity(jobs.len());
    let generated = generate_keys(algorithm, jobs.len())
        .await
        .map_err(|e| IssuerError::Setup(e.to_string()))?;
    for ((entry, local), key) in jobs.into_iter().zip(generated) {
        let der = csr::build(&key, Some(&entry.spiffe_id))
            .map_err(|e| IssuerError::Setup(e.to_string()))?;
        csrs.push(CsrRequest {
            entry_id: entry.id.clone(),
            csr: der.into(),
            local: local.then(|| (*entry).clone()),
        });
        keys.push((entry.id.clone(), key));
    }
    // Boxed: a batch waiting for its permit stays a small task, not one the size of a whole
    // HTTPS exchange.
    let response = Box::pin(issuer.sign(SignRequest { csrs })).await?;
    let mut keys: BTreeMap<String, PrivateKey> = keys.into_iter().collect();
    let results = response
        .results
        .into_iter()
        .filter_map(|r| keys.remove(&r.entry_id).map(|k| (r.entry_id, k, r.outcome)))
        .collect();
    Ok((results, response.bundles))
}
