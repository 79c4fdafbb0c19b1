//! Prometheus metrics of the agent (`prometheus-client`, OpenMetrics text), served at
//! `GET /metrics` on the admin socket and, when `metricsListen` is set, on a plaintext TCP
//! listener (off by default). The same style as the holder's `holder.metricsListen`. Read-only
//! and nothing secret: times, counts, versions.
//!
//! - `meshcert_agent_svid_expiry_seconds{spiffe_id,entry_id}`: seconds until the installed SVID
//!   expires (negative once expired; absent while none is installed).
//! - `meshcert_agent_rotations_total{spiffe_id,entry_id}`: new SVIDs installed since start (the
//!   first issuance included; one found on disk at start is not counted).
//! - `meshcert_agent_rotation_failures_total{spiffe_id,entry_id}`: failed attempts to obtain or
//!   install an SVID.
//! - `meshcert_agent_identities{state}`: identities per state (`ISSUED`, `FAILED`, ...).
//! - `meshcert_agent_signing_duration_seconds`: how long the holder takes to answer one signing
//!   request (a batch of CSRs), as the agent sees it, failures included (histogram).
//! - `meshcert_agent_node_svid_expiry_seconds`: seconds until the node SVID expires (0 before
//!   the join).
//! - `meshcert_agent_bundle_version`: the trust bundle version held.
//! - `meshcert_agent_ca_connected`: 1 when the last call to the holder succeeded, else 0.
//! - `meshcert_agent_workload_*`: the workload socket's calls, refusals and open streams
//!   ([`crate::workload::metrics`]).
//! - `meshcert_agent_ca_unreachable_since_seconds`: since when (Unix seconds) the holder cannot
//!   serve; 0 while it answers.
//! - `meshcert_agent_svid_expired_while_ca_unreachable{spiffe_id}`: 1 for each identity whose
//!   SVID expired during that outage (none while the holder answers).
//!
//! Rotations and failures are counted by watching the published [`AgentStatus`] (a new serial
//! is a rotation, a growing `attempts` a failure), so the rotator needs no metrics code.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use meshcert_daemon::serve::{Connection, Limits, Pools};
use meshcert_protocol::NodeReport;
use meshcert_protocol::api::{
    AttestRequest, KubernetesAttestRequest, NodeSvidResponse, RenewRequest, SignRequest,
    SignResponse, SyncResponse,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cache::{AgentStatus, Cache};
use crate::issuer::{Issuer, IssuerError};
use crate::keys::PrivateKey;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// What was last seen of one identity: its serial and its failed attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    serial: Option<Arc<str>>,
    attempts: u32,
    /// The round of [`Metrics::observe`] that last saw it.
    round: bool,
}

/// Per entry id, what the last observed status held; updated in place, as statuses come
/// after every batch of rotations.
#[derive(Debug, Default)]
struct Observed {
    entries: BTreeMap<Arc<str>, Seen>,
    round: bool,
}

/// The agent's metrics: one handle, shared by the status watcher, the signing timer and the
/// two places that serve `/metrics`.
pub struct Metrics {
    registry: Registry,
    expiry: Family<Labels, Gauge>,
    rotations: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    identities: Family<Labels, Gauge>,
    signing: Histogram,
    node_expiry: Gauge,
    bundle_version: Gauge,
    ca_connected: Gauge,
    /// The workload socket's calls, refusals and open streams (`crate::workload::metrics`).
    pub workload: crate::workload::metrics::ApiMetrics,
    ca_unreachable_since: Gauge,
    expired_while_unreachable: Family<Labels, Gauge>,
    /// Per entry id, what the last observed status held; also serialises renders.
    seen: Mutex<Observed>,
    address: Mutex<Option<SocketAddr>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("address", &self.address())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(spiffe_id: &str, entry_id: &str) -> Labels {
    vec![
        ("spiffe_id".to_owned(), spiffe_id.to_owned()),
        ("entry_id".to_owned(), entry_id.to_owned()),
    ]
}

fn gauge_value(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

impl Metrics {
    /// Every metric at zero, registered.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let workload = crate::workload::metrics::ApiMetrics::default();
        workload.register(&mut r);
        let ca_unreachable_since = registered(
            &mut r,
            "meshcert_agent_ca_unreachable_since_seconds",
            "Since when (Unix seconds) the CA holder cannot serve; 0 while it answers",
            Gauge::default(),
        );
        let expired_while_unreachable = registered(
            &mut r,
            "meshcert_agent_svid_expired_while_ca_unreachable",
            "1 for each identity whose SVID expired while the CA holder could not serve (this outage)",
            Family::<Labels, Gauge>::default(),
        );
        let (expiry, rotations, failures, identities, signing) = svid_metrics(&mut r);
        let node_expiry = registered(
            &mut r,
            "meshcert_agent_node_svid_expiry_seconds",
            "Seconds until the node SVID expires (negative once expired)",
            Gauge::default(),
        );
        let bundle_version = registered(
            &mut r,
            "meshcert_agent_bundle_version",
            "The trust bundle version held",
            Gauge::default(),
        );
        let ca_connected = registered(
            &mut r,
            "meshcert_agent_ca_connected",
            "1 when the last call to the CA holder succeeded, else 0",
            Gauge::default(),
        );
        Self {
            registry: r,
            expiry,
            rotations,
            failures,
            identities,
            signing,
            node_expiry,
            bundle_version,
            ca_connected,
            workload,
            ca_unreachable_since,
            expired_while_unreachable,
            seen: Mutex::new(Observed::default()),
            address: Mutex::new(None),
        }
    }

    /// Counts what changed since the last observed status: a new serial is a rotation (an
    /// identity seen for the first time with a serial was found on disk, not rotated), a
    /// growing number of attempts is that many failures (attempts restart from 0 on success).
    pub fn observe(&self, status: &AgentStatus) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = &mut *seen;
        seen.round = !seen.round;
        let round = seen.round;
        for i in status.identities.iter() {
            let labels = || labels(&i.spiffe_id.to_string(), &i.entry_id);
            let before = seen.entries.get_mut(&i.entry_id);
            let before_attempts = before.as_ref().map_or(0, |b| b.attempts);
            let failed = if i.attempts >= before_attempts {
                i.attempts - before_attempts
            } else {
                i.attempts
            };
            if failed > 0 {
                self.failures
                    .get_or_create(&labels())
                    .inc_by(u64::from(failed));
            }
            match before {
                Some(before) => {
                    if i.serial.is_some() && i.serial != before.serial {
                        self.rotations.get_or_create(&labels()).inc();
                        before.serial = i.serial.clone();
                    }
                    before.attempts = i.attempts;
                    before.round = round;
                }
                None => {
                    let now = Seen {
                        serial: i.serial.clone(),
                        attempts: i.attempts,
                        round,
                    };
                    seen.entries.insert(i.entry_id.clone(), now);
                }
            }
        }
        seen.entries.retain(|_, s| s.round == round);
    }

    /// One signing request answered (or failed) after `took`.
    pub fn signed(&self, took: Duration) {
        self.signing.observe(took.as_secs_f64());
    }

    /// Records the address the plaintext metrics listener is bound to.
    pub fn set_address(&self, address: SocketAddr) {
        *self.address.lock().unwrap_or_else(PoisonError::into_inner) = Some(address);
    }

    /// The address the plaintext metrics listener is bound to, when there is one.
    pub fn address(&self) -> Option<SocketAddr> {
        *self.address.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exposition, with the gauges read from `status` at `now_unix` (Unix seconds).
    pub fn render(&self, status: &AgentStatus, now_unix: u64) -> String {
        // Held while the gauge families are rebuilt, so two scrapes never see half of it.
        let _seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let until = |t: u64| gauge_value(i128::from(t) - i128::from(now_unix));
        self.expiry.clear();
        self.identities.clear();
        let mut states: BTreeMap<&str, i64> = BTreeMap::new();
        for i in status.identities.iter() {
            if let Some(t) = i.not_after {
                self.expiry
                    .get_or_create(&labels(&i.spiffe_id.to_string(), &i.entry_id))
                    .set(until(t));
            }
            *states.entry(i.state.as_str()).or_default() += 1;
        }
        for (state, n) in states {
            self.identities
                .get_or_create(&vec![("state".to_owned(), state.to_owned())])
                .set(n);
        }
        self.node_expiry
            .set(status.node_svid_not_after.map_or(0, until));
        self.bundle_version
            .set(gauge_value(i128::from(status.bundle_version)));
        self.ca_connected.set(i64::from(status.ca_connected));
        self.ca_unreachable_since.set(gauge_value(i128::from(
            status.ca_unreachable_since.unwrap_or(0),
        )));
        self.expired_while_unreachable.clear();
        for id in &status.expired_while_unreachable {
            self.expired_while_unreachable
                .get_or_create(&vec![("spiffe_id".to_owned(), id.to_string())])
                .set(1);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    /// The `/metrics` answer for `status` at `now_unix`.
    pub fn response(&self, status: &AgentStatus, now_unix: u64) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(self.render(status, now_unix))));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(CONTENT_TYPE),
        );
        r
    }
}

/// Counts rotations and failures from every status the rotator publishes, until `shutdown`.
pub async fn watch_status(
    metrics: Arc<Metrics>,
    mut status: watch::Receiver<Arc<AgentStatus>>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let current = status.borrow_and_update().clone();
        metrics.observe(&current);
        tokio::select! {
            () = &mut shutdown => break,
            changed = status.changed() => if changed.is_err() { break },
        }
    }
}

/// An [`Issuer`] that times every signing request into [`Metrics`] and passes everything else
/// through unchanged.
#[derive(Debug)]
pub struct TimedIssuer<I> {
    inner: I,
    metrics: Arc<Metrics>,
}

impl<I: Issuer> TimedIssuer<I> {
    /// Wraps `inner`.
    pub fn new(inner: I, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    /// The wrapped issuer.
    pub fn inner(&self) -> &I {
        &self.inner
    }
}

impl<I: Issuer> Issuer for TimedIssuer<I> {
    fn attest(
        &self,
        request: AttestRequest,
    ) -> impl Future<Output = Result<NodeSvidResponse, IssuerError>> + Send {
        self.inner.attest(request)
    }

    fn attest_kubernetes(
        &self,
        request: KubernetesAttestRequest,
    ) -> impl Future<Output = Result<NodeSvidResponse, IssuerError>> + Send {
        self.inner.attest_kubernetes(request)
    }

    fn renew(
        &self,
        request: RenewRequest,
    ) -> impl Future<Output = Result<NodeSvidResponse, IssuerError>> + Send {
        self.inner.renew(request)
    }

    fn sync(&self) -> impl Future<Output = Result<SyncResponse, IssuerError>> + Send {
        self.inner.sync()
    }

    async fn sign(&self, request: SignRequest) -> Result<SignResponse, IssuerError> {
        let started = Instant::now();
        let answer = self.inner.sign(request).await;
        self.metrics.signed(started.elapsed());
        answer
    }

    fn report(&self, report: NodeReport) -> impl Future<Output = Result<(), IssuerError>> + Send {
        self.inner.report(report)
    }

    fn probe(&self) -> impl Future<Output = Result<(), IssuerError>> + Send {
        self.inner.probe()
    }

    fn set_identity(&self, chain: &[Vec<u8>], key: &PrivateKey) -> Result<(), IssuerError> {
        self.inner.set_identity(chain, key)
    }
}

/// The per-identity metrics and the signing histogram, registered.
#[allow(clippy::type_complexity)]
fn svid_metrics(
    r: &mut Registry,
) -> (
    Family<Labels, Gauge>,
    Family<Labels, Counter>,
    Family<Labels, Counter>,
    Family<Labels, Gauge>,
    Histogram,
) {
    let expiry = registered(
        r,
        "meshcert_agent_svid_expiry_seconds",
        "Seconds until the installed SVID expires (negative once expired)",
        Family::<Labels, Gauge>::default(),
    );
    let rotations = registered(
        r,
        "meshcert_agent_rotations",
        "New SVIDs installed since start, the first issuance included",
        Family::<Labels, Counter>::default(),
    );
    let failures = registered(
        r,
        "meshcert_agent_rotation_failures",
        "Failed attempts to obtain or install an SVID",
        Family::<Labels, Counter>::default(),
    );
    let identities = registered(
        r,
        "meshcert_agent_identities",
        "Identities managed by this agent, by state",
        Family::<Labels, Gauge>::default(),
    );
    // 1 ms to about 33 s: a loopback holder answers in milliseconds, a distant or busy one
    // (RSA keys, large batches) in seconds.
    let signing = registered(
        r,
        "meshcert_agent_signing_duration_seconds",
        "Time for the CA holder to answer one signing request (a batch of CSRs)",
        Histogram::new(exponential_buckets(0.001, 2.0, 16)),
    );
    (expiry, rotations, failures, identities, signing)
}

/// Registers `metric` under `name` and returns a handle to it (metrics are shared handles).
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The plaintext listener's bounds (a scraper polls; a few connections are plenty).
const LIMITS: Limits = Limits {
    max_connections: 16,
    header_read_timeout: Duration::from_secs(10),
    lifetime: Duration::from_secs(60),
    keep_alive: true,
};

/// Serves `GET /metrics` in plaintext on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cache: Cache,
    shutdown: impl Future<Output = ()>,
) {
    let handle = move |connection: Connection<TcpStream, _>| {
        let (metrics, cache) = (Arc::clone(&metrics), cache.clone());
        async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let answer = answer(&metrics, &cache, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(answer) }
            });
            connection
                .limits
                .serve_http1("metrics", connection.io, service)
                .await;
        }
    };
    let pools = Pools::single(LIMITS);
    meshcert_daemon::serve::serve("metrics", listener, pools, |_| true, handle, shutdown).await;
}

fn answer(metrics: &Metrics, cache: &Cache, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match (method, path) {
        (&Method::GET, "/metrics") => {
            return metrics.response(&cache.status(), crate::cache::unix_now_secs());
        }
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
        _ => (StatusCode::NOT_FOUND, "only /metrics here\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use meshcert_protocol::{CertState, IdentityReport, SpiffeId};

    use super::*;

    fn identity(serial: Option<&str>, attempts: u32, not_after: Option<u64>) -> IdentityReport {
        IdentityReport {
            entry_id: "web".into(),
            spiffe_id: SpiffeId::new("spiffe://a.org/web").expect("valid id"),
            state: if attempts > 0 {
                CertState::Failed
            } else {
                CertState::Issued
            },
            serial: serial.map(Into::into),
            not_after,
            next_rotation: None,
            last_error: None,
            attempts,
        }
    }

    fn status(identities: Vec<IdentityReport>) -> AgentStatus {
        AgentStatus {
            node_svid_not_after: Some(5_000),
            bundle_version: 7,
            ca_connected: true,
            identities: identities.into(),
            ..AgentStatus::default()
        }
    }

    const SERIES: &str = "{spiffe_id=\"spiffe://a.org/web\",entry_id=\"web\"}";

    fn value(out: &str, name: &str) -> Option<String> {
        let prefix = format!("{name}{SERIES} ");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
    }

    #[test]
    fn rotations_and_failures_are_counted_from_status_changes() {
        // (serial, attempts) observed in turn → (rotations, failures) afterwards.
        type Step<'a> = (Option<&'a str>, u32, Option<&'a str>, Option<&'a str>);
        let steps: &[Step] = &[
            // Found on disk at start: a baseline, not a rotation.
            (Some("01"), 0, None, None),
            (Some("01"), 0, None, None),
            // Rotated.
            (Some("02"), 0, Some("1"), None),
            // Two failures seen at once, then a third.
            (Some("02"), 2, Some("1"), Some("2")),
            (Some("02"), 3, Some("1"), Some("3")),
            // Success: attempts restart from 0, a new serial.
            (Some("03"), 0, Some("2"), Some("3")),
            // A failure after the reset counts again.
            (Some("03"), 1, Some("2"), Some("4")),
        ];
        let m = Metrics::new();
        for (serial, attempts, rotations, failures) in steps {
            m.observe(&status(vec![identity(*serial, *attempts, Some(2_000))]));
            let out = m.render(&status(vec![]), 1_000);
            assert_eq!(
                value(&out, "meshcert_agent_rotations_total").as_deref(),
                *rotations,
                "{serial:?}/{attempts}: {out}"
            );
            assert_eq!(
                value(&out, "meshcert_agent_rotation_failures_total").as_deref(),
                *failures,
                "{serial:?}/{attempts}: {out}"
            );
        }
    }

    #[test]
    fn a_first_issuance_is_a_rotation() {
        let m = Metrics::new();
        m.observe(&status(vec![identity(None, 0, None)]));
        m.observe(&status(vec![identity(Some("01"), 0, Some(2_000))]));
        let out = m.render(&status(vec![]), 1_000);
        assert_eq!(
            value(&out, "meshcert_agent_rotations_total").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn gauges_follow_the_status_at_render_time() {
        let m = Metrics::new();
        m.signed(Duration::from_millis(4));
        let out = m.render(&status(vec![identity(Some("01"), 0, Some(2_000))]), 1_000);
        assert_eq!(
            value(&out, "meshcert_agent_svid_expiry_seconds").as_deref(),
            Some("1000"),
            "{out}"
        );
        for line in [
            "meshcert_agent_node_svid_expiry_seconds 4000",
            "meshcert_agent_bundle_version 7",
            "meshcert_agent_ca_connected 1",
            "meshcert_agent_identities{state=\"ISSUED\"} 1",
            "meshcert_agent_signing_duration_seconds_count 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing `{line}` in {out}");
        }
        // Expired: negative. Gone from the status: gone from the exposition.
        let out = m.render(&status(vec![identity(Some("01"), 0, Some(2_000))]), 2_500);
        assert_eq!(
            value(&out, "meshcert_agent_svid_expiry_seconds").as_deref(),
            Some("-500")
        );
        let out = m.render(&status(vec![]), 2_500);
        assert_eq!(value(&out, "meshcert_agent_svid_expiry_seconds"), None);
        assert!(!out.contains("state=\"ISSUED\""), "{out}");
        assert!(
            out.lines()
                .any(|l| l == "meshcert_agent_ca_unreachable_since_seconds 0"),
            "{out}"
        );
        // The holder down since 2000, one identity expired meanwhile.
        let mut down = status(vec![]);
        down.ca_unreachable_since = Some(2_000);
        down.expired_while_unreachable = vec!["spiffe://a.org/web".into()];
        let out = m.render(&down, 2_500);
        for line in [
            "meshcert_agent_ca_unreachable_since_seconds 2000",
            "meshcert_agent_svid_expired_while_ca_unreachable{spiffe_id=\"spiffe://a.org/web\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing `{line}` in {out}");
        }
        // The outage over: no identity listed any more.
        let out = m.render(&status(vec![]), 2_600);
        assert!(
            !out.contains("meshcert_agent_svid_expired_while_ca_unreachable{"),
            "{out}"
        );
    }

    #[test]
    fn only_get_metrics_is_served() {
        let m = Metrics::new();
        let cache = crate::cache::CacheWriter::new().reader();
        for (method, path, want) in [
            (Method::GET, "/metrics", StatusCode::OK),
            (Method::POST, "/metrics", StatusCode::METHOD_NOT_ALLOWED),
            (Method::GET, "/", StatusCode::NOT_FOUND),
        ] {
            assert_eq!(
                answer(&m, &cache, &method, path).status(),
                want,
                "{method} {path}"
            );
        }
    }
}
