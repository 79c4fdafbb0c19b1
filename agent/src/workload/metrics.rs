//! Metrics of the workload socket's three APIs (X.509 Workload API, JWT Workload API, Envoy
//! SDS), registered with the agent's other metrics ([`crate::metrics::Metrics`]):
//!
//! - `meshcert_agent_workload_calls_total{api,rpc}`: calls started.
//! - `meshcert_agent_workload_refusals_total{api,rpc,code}`: calls answered with an error
//!   (`code`: the gRPC code, e.g. `PermissionDenied`).
//! - `meshcert_agent_workload_open_streams{api}`: streams open now.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::Status;

type Labels = Vec<(&'static str, String)>;

/// The API an RPC belongs to: `x509`, `jwt`, `sds` (or `other`).
pub fn api_of(rpc: &str) -> &'static str {
    match rpc {
        "FetchX509SVID" | "FetchX509Bundles" => "x509",
        "FetchJWTSVID" | "FetchJWTBundles" | "ValidateJWTSVID" => "jwt",
        "StreamSecrets" | "FetchSecrets" | "DeltaSecrets" => "sds",
        _ => "other",
    }
}

/// The counters and gauges; clones share them.
#[derive(Debug, Clone, Default)]
pub struct ApiMetrics {
    calls: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    open_streams: Family<Labels, Gauge>,
}

/// Marks a stream open until dropped.
#[derive(Debug)]
pub struct OpenStream {
    gauge: Gauge,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl ApiMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshcert_agent_workload_calls",
            "Calls started on the workload socket, per API and RPC",
            self.calls.clone(),
        );
        registry.register(
            "meshcert_agent_workload_refusals",
            "Calls on the workload socket answered with an error, per API, RPC and gRPC code",
            self.refusals.clone(),
        );
        registry.register(
            "meshcert_agent_workload_open_streams",
            "Streams open on the workload socket, per API",
            self.open_streams.clone(),
        );
    }

    /// Counts a call of `rpc` and, if `result` is an error, its refusal; passes it through.
    pub fn record<T>(&self, rpc: &'static str, result: Result<T, Status>) -> Result<T, Status> {
        let api = api_of(rpc);
        self.calls
            .get_or_create(&vec![("api", api.to_owned()), ("rpc", rpc.to_owned())])
            .inc();
        if let Err(status) = &result {
            self.refusals
                .get_or_create(&vec![
                    ("api", api.to_owned()),
                    ("rpc", rpc.to_owned()),
                    ("code", format!("{:?}", status.code())),
                ])
                .inc();
        }
        result
    }

    /// A stream of `rpc` opens: counted until the returned mark is dropped.
    pub fn stream_opened(&self, rpc: &'static str) -> OpenStream {
        let gauge = self
            .open_streams
            .get_or_create(&vec![("api", api_of(rpc).to_owned())])
            .clone();
        gauge.inc();
        OpenStream { gauge }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_refusals_and_streams_are_counted() {
        let m = ApiMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let _ = m.record(
            "FetchJWTSVID",
            Err::<(), _>(Status::permission_denied("no")),
        );
        let _ = m.record("FetchSecrets", Ok(()));
        let open = m.stream_opened("StreamSecrets");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"meshcert_agent_workload_calls_total{api="jwt",rpc="FetchJWTSVID"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"meshcert_agent_workload_refusals_total{api="jwt",rpc="FetchJWTSVID",code="PermissionDenied"} 1"#), "{text}");
        assert!(
            text.contains(r#"meshcert_agent_workload_open_streams{api="sds"} 1"#),
            "{text}"
        );
        drop(open);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"meshcert_agent_workload_open_streams{api="sds"} 0"#),
            "{text}"
        );
    }
}
