//! The SPIFFE Workload API on a Unix socket, callers attested by the kernel.
//!
//! Existing SPIFFE clients (go-spiffe, py-spiffe, the Rust `spiffe` crate, spiffe-helper) talk
//! to it unchanged: gRPC without TLS, service `SpiffeWorkloadAPI` from a proto with no package,
//! the `workload.spiffe.io: true` header on every request.
//!
//! # Layout
//!
//! - [`proto`]: the messages, server and client generated from `proto/workload.proto`.
//! - [`service`]: the gRPC service (header, rate, attestation, streams).
//! - [`jwt`]: the JWT-SVID calls (fetch, bundles, validate) and their messages.
//! - [`sds`]: Envoy's Secret Discovery Service (SDS v3) on the same socket.
//! - [`metrics`]: calls, refusals and open streams of the three APIs.
//! - [`peer`]: the caller's kernel credentials and `/proc` facts (all `nix`/`/proc` calls).
//! - [`selection`]: which SVIDs a caller receives (pure).
//! - [`cgroup`]: the pod UID and container ID in a caller's `/proc/<pid>/cgroup` (pure).
//! - [`response`]: the messages built from a snapshot (pure).
//! - [`limits`]: connection caps (in all and per uid), idle timeout, per-uid rate limit.
//! - [`socket`]: socket files (stale socket replacement, modes), shared with the admin socket.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::jwt::Tokens;

pub mod cgroup;
pub mod jwt;
pub mod limits;
pub mod metrics;
pub mod peer;
pub mod response;
pub mod sds;
pub mod selection;
pub mod service;
pub mod socket;

/// The Workload API messages, server and client, generated from `proto/workload.proto`
/// (no proto package: method paths are `/SpiffeWorkloadAPI/<Method>`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    unreachable_pub
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));

    /// The protobuf well-known types the Workload API uses (`Struct`).
    pub mod google {
        /// `google.protobuf`.
        pub mod protobuf {
            include!(concat!(env!("OUT_DIR"), "/google.protobuf.rs"));
        }
    }
}

/// Connections one uid may hold at once unless configured (`workloadConnectionsPerUid`).
pub const DEFAULT_CONNECTIONS_PER_UID: usize = 256;

/// How long open connections get to close once the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the Workload API server failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The socket could not be bound.
    #[error("cannot bind the workload socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The socket file could not be set up (not a socket, in use, folder or mode).
    #[error("workload socket: {0}")]
    Socket(#[from] socket::SocketError),
    /// The gRPC server stopped with an error.
    #[error("the workload API server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Where and how the Workload API listens, and its limits.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// The socket path (`SPIFFE_ENDPOINT_SOCKET` without `unix://`).
    pub socket: PathBuf,
    /// The socket file's mode (world-connectable by default: callers are authorised by their
    /// kernel credentials).
    pub mode: u32,
    /// Connections served at once; a connection over the cap is closed at once (clients see
    /// `Unavailable` and retry).
    pub max_connections: usize,
    /// Connections one uid may hold at once (below `max_connections`, so that one uid cannot
    /// keep the others out).
    pub max_connections_per_uid: usize,
    /// Streams (`FetchX509SVID`, `FetchX509Bundles`) open at once over all connections; over
    /// it a call gets `ResourceExhausted`.
    pub max_streams: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Calls a second one uid may start, on average.
    pub rate_per_uid: f64,
    /// Calls one uid may start in a burst.
    pub burst_per_uid: u32,
    /// A connection with no open call and no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 keepalive ping interval (finds dead peers of long-lived streams); keep it above
    /// `idle_timeout` so pings do not keep idle connections alive.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// On Kubernetes: the kubelet that attests callers' pods (`k8s:` selectors).
    pub kubelet: Option<std::sync::Arc<crate::kubelet::Kubelet>>,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/meshcert/workload.sock"),
            mode: 0o666,
            max_connections: 1024,
            max_connections_per_uid: DEFAULT_CONNECTIONS_PER_UID,
            max_streams: 4096,
            max_streams_per_connection: 128,
            rate_per_uid: 20.0,
            burst_per_uid: 100,
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(90),
            keepalive_timeout: Duration::from_secs(20),
            kubelet: None,
        }
    }
}

/// Binds the workload socket: parent folder created, a stale socket replaced, mode set.
pub fn bind(config: &WorkloadConfig) -> Result<UnixListener, WorkloadError> {
    Ok(socket::bind(&config.socket, config.mode)?)
}

/// Serves the Workload API until `shutdown` completes; open streams then end with
/// `Unavailable` so clients reconnect to the next agent.
pub async fn serve(
    listener: UnixListener,
    config: WorkloadConfig,
    cache: Cache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkloadError> {
    serve_with(listener, config, cache, Extras::default(), shutdown).await
}

/// What the daemon adds to the Workload API beyond X.509-SVIDs and SDS.
#[derive(Debug, Default)]
pub struct Extras {
    /// JWT-SVIDs and JWT bundles (without: the JWT calls answer `Unimplemented`).
    pub jwt: Option<Arc<Tokens>>,
    /// Where calls, refusals and open streams are counted.
    pub metrics: Option<metrics::ApiMetrics>,
}

/// [`serve`], with `extras`.
pub async fn serve_with(
    listener: UnixListener,
    config: WorkloadConfig,
    cache: Cache,
    extras: Extras,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkloadError> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut service = service::WorkloadService::new(
        cache,
        limits::RateLimiter::new(config.rate_per_uid, config.burst_per_uid),
        config.max_streams,
        stop.clone(),
    )
    .with_kubelet(config.kubelet.clone());
    if let Some(tokens) = extras.jwt {
        service = service.with_jwt(tokens);
    }
    if let Some(metrics) = extras.metrics {
        service = service.with_metrics(metrics);
    }
    let (incoming, acceptor) = limits::incoming(
        listener,
        limits::Caps {
            total: config.max_connections,
            per_uid: config.max_connections_per_uid,
        },
        config.idle_timeout,
        stop.clone(),
    );
    tracing::info!(socket = %config.socket.display(), "workload API listening");
    let mut stopped = stop.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(config.max_streams_per_connection)
        .add_service(
            envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer::new(
                sds::SdsService::new(service.clone()),
            )
            .max_decoding_message_size(64 * 1024),
        )
        .add_service(
            proto::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(service)
                .max_decoding_message_size(64 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
    // Graceful shutdown waits for every connection to close; a client that never reads could
    // hold it forever, so after a grace period the remaining connections are dropped.
    let mut grace = stop;
    let served = tokio::select! {
        served = server => served.map_err(WorkloadError::Serve),
        () = async {
            service::stopped(&mut grace).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("workload connections still open after the grace period; dropping them");
            Ok(())
        }
    };
    // The listener closes with the acceptor: only then may the next agent take the socket.
    let _ = acceptor.await;
    tracing::info!(socket = %config.socket.display(), "workload API stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::proto::spiffe_workload_api_server::SERVICE_NAME;

    #[test]
    fn method_paths_have_no_package() {
        assert_eq!(SERVICE_NAME, "SpiffeWorkloadAPI");
        let generated = include_str!(concat!(env!("OUT_DIR"), "/_.rs"));
        for method in [
            "FetchX509SVID",
            "FetchX509Bundles",
            "FetchJWTSVID",
            "FetchJWTBundles",
            "ValidateJWTSVID",
            "FetchWITSVID",
            "FetchWITBundles",
        ] {
            let path = format!("\"/SpiffeWorkloadAPI/{method}\"");
            assert!(generated.contains(&path), "{path} is not served");
        }
    }
}
