//! The `SpiffeWorkloadAPI` gRPC service: checks the security header and the caller's rate,
//! identifies the caller by its kernel credentials, and streams the SVIDs and bundles it is
//! entitled to, the full state again on every change that alters what it gets.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::limits::{CallGuard, ConnInfo, RateLimiter};
use super::metrics::{ApiMetrics, OpenStream};
use super::peer::{self, Names, PeerError, PeerInfo};
use super::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::proto::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest,
    WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use super::{response, selection};
use crate::cache::{Cache, Snapshot};
use crate::jwt::Tokens;
use crate::kubelet::Kubelet;

/// The metadata every Workload API request carries.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The answer to a request without [`SECURITY_HEADER`].
pub const HEADER_MISSING: &str = "security header missing from request";
/// The answer to a caller entitled to nothing (clients match this text).
pub const NO_IDENTITY: &str = "no identity issued";

/// How long the user and group names of a caller are reused before they are looked up again.
const NAMES_TTL: Duration = Duration::from_secs(30);

/// A message stream to one caller.
pub type Updates<T> = ReceiverStream<Result<T, Status>>;

/// The service state shared by every call.
#[derive(Debug, Clone)]
pub struct WorkloadService {
    cache: Cache,
    rate: Arc<RateLimiter>,
    streams: Arc<Semaphore>,
    names: Arc<Names>,
    stop: watch::Receiver<bool>,
    kubelet: Option<Arc<Kubelet>>,
    /// JWT-SVIDs and bundles; the JWT calls answer `Unimplemented` without it.
    jwt: Option<Arc<Tokens>>,
    metrics: ApiMetrics,
}

/// A place among the open streams, counted in the metrics while held.
pub(super) type StreamSlot = (OwnedSemaphorePermit, OpenStream);

/// An admitted caller: who it is and the open-call mark on its connection.
pub(super) struct Caller {
    pub(super) peer: PeerInfo,
    _call: CallGuard,
}

impl WorkloadService {
    /// A service reading from `cache`, limited by `rate` and `max_streams`, whose streams end
    /// with `Unavailable` when `stop` turns true.
    pub fn new(
        cache: Cache,
        rate: RateLimiter,
        max_streams: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cache,
            rate: Arc::new(rate),
            streams: Arc::new(Semaphore::new(max_streams.max(1))),
            names: Arc::new(Names::new(NAMES_TTL)),
            stop,
            kubelet: None,
            jwt: None,
            metrics: ApiMetrics::default(),
        }
    }

    /// Attests callers that run in a pod through `kubelet` (`k8s:` selectors).
    #[must_use]
    pub fn with_kubelet(mut self, kubelet: Option<Arc<Kubelet>>) -> Self {
        self.kubelet = kubelet;
        self
    }

    /// The caller's pod facts, when it runs in a pod and a kubelet is configured; a failure
    /// is kept in `pod_error` (`unix:` selectors still apply).
    async fn attest_pod(&self, peer: &mut PeerInfo) {
        let (Some(kubelet), Some(wanted)) = (&self.kubelet, &peer.pod_container) else {
            return;
        };
        match kubelet.attest(wanted).await {
            Ok(facts) => peer.pod = Some(Arc::new(facts)),
            Err(e) => {
                tracing::warn!(pid = peer.pid, pod_uid = %wanted.pod_uid, error = %e, "pod attestation failed; only unix: selectors apply to this caller");
                peer.pod_error = Some(e.to_string().into());
            }
        }
    }

    /// Counts calls, refusals and open streams in `metrics`.
    pub fn with_metrics(mut self, metrics: ApiMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The call and refusal counters.
    pub(super) fn metrics(&self) -> &ApiMetrics {
        &self.metrics
    }

    /// Serves JWT-SVIDs and JWT bundles from `tokens`.
    pub fn with_jwt(mut self, tokens: Arc<Tokens>) -> Self {
        self.jwt = Some(tokens);
        self
    }

    /// The JWT side, after the security header was checked.
    fn tokens<T>(&self, request: &Request<T>) -> Result<Arc<Tokens>, Status> {
        check_header(request)?;
        self.jwt
            .clone()
            .ok_or_else(|| Status::unimplemented("JWT-SVIDs are not served by this agent"))
    }

    /// `FetchJWTBundles`: the JWKS at once (once the holder gave them), then on every change.
    fn jwt_bundle_stream(
        &self,
        caller: Caller,
        tokens: &Tokens,
    ) -> Result<Response<Updates<JwtBundlesResponse>>, Status> {
        // Bundles go only to callers entitled to an identity, as for X.509 bundles.
        if selection::svids_for(&self.cache.current(), &caller.peer, SystemTime::now()).is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let slot = self.stream_slot("FetchJWTBundles")?;
        let mut jwks = tokens.subscribe();
        let (tx, rx) = mpsc::channel(2);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let (_slot, _caller) = (slot, caller);
            loop {
                let current = jwks.borrow_and_update().clone();
                if !current.trust_domains.is_empty() {
                    let message = super::jwt::bundles_response(&current);
                    tokio::select! {
                        sent = tx.send(Ok(message)) => if sent.is_err() { return },
                        () = stopped(&mut stop) => return,
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    () = stopped(&mut stop) => {
                        let _ = tx.try_send(Err(Status::unavailable("agent shutting down")));
                        return;
                    }
                    changed = jwks.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// The checks every call passes: security header, rate, then the caller's identity.
    async fn admit<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<Caller, Status> {
        check_header(request)?;
        self.identify(request, rpc).await
    }

    /// The checks of [`Self::admit`] but the header (Envoy's SDS calls do not send it): rate,
    /// then the caller's identity from its kernel credentials.
    pub(super) async fn identify<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
    ) -> Result<Caller, Status> {
        let conn = request
            .extensions()
            .get::<ConnInfo>()
            .ok_or_else(|| Status::unavailable("connection information missing"))?;
        let cred = conn
            .cred
            .ok_or_else(|| Status::unavailable("the kernel gave no credentials for this caller"))?;
        let call = conn.call();
        if !self.rate.allow(cred.uid, Instant::now()) {
            tracing::debug!(uid = cred.uid, pid = cred.pid, rpc, "caller over its rate");
            return Err(Status::resource_exhausted(
                "too many requests from this user; retry later",
            ));
        }
        let refused = |e: PeerError| {
            tracing::info!(uid = cred.uid, pid = cred.pid, rpc, error = %e, "caller refused");
            Status::permission_denied(e.to_string())
        };
        // The process facts are a few reads of /proc, done here; the names come from memory,
        // or from the user and group databases on a blocking thread (NSS may be remote).
        let mut peer = peer::identify_process(cred).map_err(refused)?;
        if !self.names.fill_remembered(&mut peer, Instant::now()) {
            let names = self.names.clone();
            peer = tokio::task::spawn_blocking(move || {
                names.look_up(&mut peer, Instant::now());
                peer
            })
            .await
            .map_err(|_| Status::internal("caller identification failed"))?;
        }
        self.attest_pod(&mut peer).await;
        tracing::debug!(
            uid = peer.uid,
            gid = peer.gid,
            pid = peer.pid,
            exe = ?peer.exe,
            rpc,
            "workload call"
        );
        Ok(Caller { peer, _call: call })
    }

    /// The cache every call reads.
    pub(super) fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Turns true when the agent stops.
    pub(super) fn stop(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// A place among the open streams, or `ResourceExhausted`.
    pub(super) fn stream_slot(&self, rpc: &'static str) -> Result<StreamSlot, Status> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!("workload stream cap reached");
            Status::resource_exhausted("too many open streams; retry later")
        })?;
        Ok((permit, self.metrics.stream_opened(rpc)))
    }

    /// Answers with `build`'s first message at once, then a new one whenever a snapshot
    /// change (or the expiry of an SVID sent) alters it, until the caller leaves or the agent
    /// stops.
    fn stream<T>(
        &self,
        caller: Caller,
        rpc: &'static str,
        build: fn(&Snapshot, &PeerInfo, SystemTime) -> Built<T>,
    ) -> Result<Response<Updates<T>>, Status>
    where
        T: Clone + PartialEq + Send + Sync + 'static,
    {
        let slot = self.stream_slot(rpc)?;
        let mut snapshots = self.cache.subscribe();
        let first = build(
            &snapshots.borrow_and_update(),
            &caller.peer,
            SystemTime::now(),
        );
        let (mut last, mut expires) = first?;
        let (tx, rx) = mpsc::channel(2);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let caller = caller;
            // A caller that stops reading blocks a send; the agent's stop still ends it.
            let send = |item: Result<T, Status>, mut stop: watch::Receiver<bool>| {
                let tx = tx.clone();
                async move {
                    tokio::select! {
                        sent = tx.send(item) => sent.is_ok(),
                        () = stopped(&mut stop) => false,
                    }
                }
            };
            if !send(Ok(last.clone()), stop.clone()).await {
                return;
            }
            loop {
                let until_expiry = expires.map(|t| {
                    t.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                });
                tokio::select! {
                    _ = tx.closed() => return,
                    () = stopped(&mut stop) => {
                        // Clients reconnect on `Unavailable` (to the next agent).
                        let _ = tx.try_send(Err(Status::unavailable("agent shutting down")));
                        return;
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            let _ = tx.try_send(Err(Status::unavailable("agent shutting down")));
                            return;
                        }
                    }
                    _ = tokio::time::sleep(until_expiry.unwrap_or_default()), if until_expiry.is_some() => {}
                }
                let snapshot = snapshots.borrow_and_update().clone();
                match build(&snapshot, &caller.peer, SystemTime::now()) {
                    Ok((message, next)) => {
                        expires = next;
                        if message != last {
                            // Keep a copy to compare the next state with.
                            last = message.clone();
                            if !send(Ok(message), stop.clone()).await {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        send(Err(status), stop.clone()).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A message for the caller, and when the earliest SVID in it expires.
type Built<T> = Result<(T, Option<SystemTime>), Status>;

/// The refusal of a caller entitled to nothing: `Unavailable` (retry) when its pod could not
/// be attested, else `PermissionDenied`.
fn nothing_for(peer: &PeerInfo) -> Status {
    match &peer.pod_error {
        Some(e) => Status::unavailable(format!("pod attestation failed: {e}")),
        None => Status::permission_denied(NO_IDENTITY),
    }
}

fn x509_svids(snapshot: &Snapshot, peer: &PeerInfo, now: SystemTime) -> Built<X509svidResponse> {
    let svids = selection::svids_for(snapshot, peer, now);
    if svids.is_empty() {
        return Err(nothing_for(peer));
    }
    let expires = svids.iter().map(|s| s.not_after).min();
    Ok((response::x509_svid_response(snapshot, &svids), expires))
}

fn x509_bundles(
    snapshot: &Snapshot,
    peer: &PeerInfo,
    now: SystemTime,
) -> Built<X509BundlesResponse> {
    // Bundles go only to callers entitled to an identity, as SPIRE does.
    let svids = selection::svids_for(snapshot, peer, now);
    if svids.is_empty() {
        return Err(nothing_for(peer));
    }
    let expires = svids.iter().map(|s| s.not_after).min();
    Ok((response::x509_bundles_response(snapshot), expires))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = Updates<X509svidResponse>;
    type FetchX509BundlesStream = Updates<X509BundlesResponse>;
    type FetchJWTBundlesStream = Updates<JwtBundlesResponse>;
    type FetchWITSVIDStream = Updates<WitsvidResponse>;
    type FetchWITBundlesStream = Updates<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let result = async {
            let caller = self.admit(&request, "FetchX509SVID").await?;
            self.stream(caller, "FetchX509SVID", x509_svids)
        };
        self.metrics.record("FetchX509SVID", result.await)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let result = async {
            let caller = self.admit(&request, "FetchX509Bundles").await?;
            self.stream(caller, "FetchX509Bundles", x509_bundles)
        };
        self.metrics.record("FetchX509Bundles", result.await)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let result = async {
            let tokens = self.tokens(&request)?;
            let caller = self.admit(&request, "FetchJWTSVID").await?;
            let snapshot = self.cache.current();
            let now = SystemTime::now();
            let request = request.into_inner();
            super::jwt::fetch_svids(&tokens, &snapshot, &caller.peer, request, now)
                .await
                .map(Response::new)
        };
        self.metrics.record("FetchJWTSVID", result.await)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let result = async {
            let tokens = self.tokens(&request)?;
            let caller = self.admit(&request, "FetchJWTBundles").await?;
            self.jwt_bundle_stream(caller, &tokens)
        };
        self.metrics.record("FetchJWTBundles", result.await)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let result = async {
            let tokens = self.tokens(&request)?;
            let _caller = self.admit(&request, "ValidateJWTSVID").await?;
            super::jwt::validate_svid(&tokens, request.get_ref()).map(Response::new)
        };
        self.metrics.record("ValidateJWTSVID", result.await)
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented("WIT-SVIDs are not served"))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented("WIT bundles are not served"))
    }
}

/// Completes once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(HEADER_MISSING)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> WorkloadService {
        let (_stop_tx, stop) = watch::channel(false);
        WorkloadService::new(
            crate::cache::CacheWriter::new().reader(),
            RateLimiter::new(1.0, 1),
            1,
            stop,
        )
    }

    fn with_header<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().expect("ascii"));
        request
    }

    #[tokio::test]
    async fn jwt_and_wit_calls_are_unimplemented_and_still_need_the_header() {
        let svc = service();
        let code = |r: Result<_, Status>| r.err().map(|s| s.code());
        assert_eq!(
            code(
                svc.fetch_jwtsvid(with_header(JwtsvidRequest::default()))
                    .await
                    .map(drop)
            ),
            Some(tonic::Code::Unimplemented)
        );
        assert_eq!(
            code(
                svc.fetch_jwt_bundles(with_header(JwtBundlesRequest::default()))
                    .await
                    .map(drop)
            ),
            Some(tonic::Code::Unimplemented)
        );
        assert_eq!(
            code(
                svc.validate_jwtsvid(with_header(ValidateJwtsvidRequest::default()))
                    .await
                    .map(drop)
            ),
            Some(tonic::Code::Unimplemented)
        );
        assert_eq!(
            code(
                svc.fetch_witsvid(with_header(WitsvidRequest::default()))
                    .await
                    .map(drop)
            ),
            Some(tonic::Code::Unimplemented)
        );
        assert_eq!(
            code(
                svc.fetch_wit_bundles(with_header(WitBundlesRequest::default()))
                    .await
                    .map(drop)
            ),
            Some(tonic::Code::Unimplemented)
        );
        let status = svc
            .fetch_jwtsvid(Request::new(JwtsvidRequest::default()))
            .await
            .expect_err("no header");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), HEADER_MISSING);
    }

    #[tokio::test]
    async fn a_request_with_a_wrong_header_value_is_invalid() {
        let mut request = Request::new(X509svidRequest {});
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, "yes".parse().expect("ascii"));
        let status = service()
            .fetch_x509svid(request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
