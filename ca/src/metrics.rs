//! Prometheus metrics of the holder (`prometheus-client`, OpenMetrics text) and the optional
//! plaintext listener that serves them at `GET /metrics` (`holder.metricsListen`; off by
//! default). Read-only and nothing secret: counts, latencies, versions.
//!
//! - `meshcert_ca_csrs_signed_total`: workload CSRs signed by this process.
//! - `meshcert_ca_csrs_refused_total{code}`: workload CSRs refused, by API error code.
//! - `meshcert_ca_signing_duration_seconds`: time to check and sign one CSR (histogram).
//! - `meshcert_ca_svids_issued`: certificates recorded in the datastore (node and workload).
//! - `meshcert_ca_nodes_reporting` / `meshcert_ca_nodes_stale`: non-banned nodes that report
//!   within three heartbeats / that are silent for longer.
//! - `meshcert_ca_bundle_version`: the current bundle version.
//! - `meshcert_ca_server_certificate_expiry_timestamp_seconds`: when the HTTPS API's server
//!   certificate expires (Unix seconds); it is renewed at half-life, so alert when it is less
//!   than a third of its lifetime (30 days) away.

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use meshcert_daemon::serve::{Connection, Limits, Pools};
use meshcert_protocol::api::ErrorCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::status::node_statuses;
use crate::store::Store;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// The holder's metrics.
pub struct Metrics {
    registry: Registry,
    signed: Counter,
    refused: Family<Labels, Counter>,
    latency: Histogram,
    svids_issued: Gauge,
    nodes_reporting: Gauge,
    nodes_stale: Gauge,
    bundle_version: Gauge,
    server_cert_expiry: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("signed", &self.signed.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let signed = Counter::default();
        let refused = Family::<Labels, Counter>::default();
        // 0.5 ms to about 4 s: RSA-4096 signing under load stays inside.
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let svids_issued = Gauge::default();
        let nodes_reporting = Gauge::default();
        let nodes_stale = Gauge::default();
        let bundle_version = Gauge::default();
        let server_cert_expiry = Gauge::default();
        registry.register(
            "meshcert_ca_server_certificate_expiry_timestamp_seconds",
            "When the HTTPS API's server certificate expires (Unix seconds)",
            server_cert_expiry.clone(),
        );
        registry.register(
            "meshcert_ca_csrs_signed",
            "Workload CSRs signed",
            signed.clone(),
        );
        registry.register(
            "meshcert_ca_csrs_refused",
            "Workload CSRs refused, by error code",
            refused.clone(),
        );
        registry.register(
            "meshcert_ca_signing_duration_seconds",
            "Time to check and sign one CSR",
            latency.clone(),
        );
        registry.register(
            "meshcert_ca_svids_issued",
            "Certificates recorded in the datastore (node and workload SVIDs)",
            svids_issued.clone(),
        );
        registry.register(
            "meshcert_ca_nodes_reporting",
            "Non-banned nodes that reported within three heartbeats",
            nodes_reporting.clone(),
        );
        registry.register(
            "meshcert_ca_nodes_stale",
            "Non-banned nodes silent for more than three heartbeats",
            nodes_stale.clone(),
        );
        registry.register(
            "meshcert_ca_bundle_version",
            "The current trust bundle version",
            bundle_version.clone(),
        );
        Self {
            registry,
            signed,
            refused,
            latency,
            svids_issued,
            nodes_reporting,
            nodes_stale,
            bundle_version,
            server_cert_expiry,
        }
    }

    /// The server certificate in use expires at `not_after`.
    pub fn set_server_cert_expiry(&self, not_after: SystemTime) {
        let secs = crate::authority::unix(not_after);
        self.server_cert_expiry
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// One CSR signed, after `took`.
    pub fn signed(&self, took: Duration) {
        self.signed.inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// One CSR refused with `code`.
    pub fn refused(&self, code: ErrorCode) {
        self.refused
            .get_or_create(&vec![("code".to_owned(), code.to_string())])
            .inc();
    }

    /// The current bundle version.
    pub fn set_bundle_version(&self, version: u64) {
        self.bundle_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// The exposition, with the gauges read from `store` at `now` (a node is stale after
    /// three `heartbeat`s of silence).
    pub fn render(&self, store: &dyn Store, heartbeat: Duration, now: SystemTime) -> String {
        if let (Ok(nodes), Ok(reports)) = (store.nodes(), store.reports()) {
            let statuses = node_statuses(&nodes, &reports, now, heartbeat);
            let live: Vec<_> = statuses.iter().filter(|n| !n.banned).collect();
            let stale = live.iter().filter(|n| n.stale).count();
            let reporting = live
                .iter()
                .filter(|n| !n.stale && n.last_report.is_some())
                .count();
            self.nodes_stale
                .set(i64::try_from(stale).unwrap_or(i64::MAX));
            self.nodes_reporting
                .set(i64::try_from(reporting).unwrap_or(i64::MAX));
        }
        if let Ok(n) = store.issuance_count() {
            self.svids_issued.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// The plaintext listener's bounds (a scraper polls; a few connections are plenty).
const LIMITS: Limits = Limits {
    max_connections: 16,
    header_read_timeout: Duration::from_secs(10),
    lifetime: Duration::from_secs(60),
    keep_alive: true,
};

/// Serves `GET /metrics` in plaintext on `listener` until `shutdown` resolves; `render`
/// produces the exposition at each scrape.
pub async fn serve<R>(
    listener: TcpListener,
    render: R,
    shutdown: impl std::future::Future<Output = ()>,
) where
    R: Fn() -> String + Clone + Send + Sync + 'static,
{
    let handle = move |connection: Connection<TcpStream, _>| {
        let render = render.clone();
        async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let answer = answer(&render, req.method(), req.uri().path());
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

fn answer(render: &impl Fn() -> String, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (method, path) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics here\n".to_owned(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_latency_appear_in_the_exposition() {
        let m = Metrics::new();
        m.signed(Duration::from_millis(3));
        m.signed(Duration::from_millis(1));
        m.refused(ErrorCode::PolicyDenied);
        m.set_bundle_version(4);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        assert!(out.contains("meshcert_ca_csrs_signed_total 2"), "{out}");
        assert!(
            out.contains("meshcert_ca_csrs_refused_total{code=\"policy_denied\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("meshcert_ca_signing_duration_seconds_count 2"),
            "{out}"
        );
        assert!(out.contains("meshcert_ca_bundle_version 4"), "{out}");
    }
}
