//! Envoy's Secret Discovery Service (SDS v3, `envoy.service.secret.v3.SecretDiscoveryService`)
//! on the workload socket, with Envoy's own protobuf definitions (the `envoy-types` crate).
//! This is how Istio's and other Envoy-based proxies take identities from a node agent.
//!
//! Callers are attested exactly as for the Workload API (kernel credentials; Envoy sends no
//! `workload.spiffe.io` header, so none is required here). Resource names:
//!
//! - `default`: the caller's first identity; a SPIFFE ID: that identity, if the caller holds it
//!   (a TLS certificate: chain and PKCS#8 key, PEM);
//! - `ROOTCA`: the node's own trust domain's bundle; `spiffe://<td>`: that trust domain's
//!   bundle, if the node serves it; `ALL`: every bundle served (own and federated) — a
//!   validation context;
//! - any other name is left out of the answer (xDS: an unknown resource is absent).
//!
//! Versions are a digest of the resources sent, so an unchanged state is never sent again;
//! each response has a new nonce. A request carrying the last nonce and no error is an ACK; one
//! with an `error_detail` is a NACK: it is logged and the same version is not sent again (the
//! stream waits for the next change). A rotation or a bundle change sends a new version to
//! every open stream. `DeltaSecrets` answers `Unimplemented`.

use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::peer::PeerInfo;
use super::selection;
use super::service::{NO_IDENTITY, Updates, WorkloadService, stopped};
use crate::cache::{InstalledSvid, Snapshot};

/// The type URL of every SDS resource.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The SDS service over the Workload API's state and limits.
#[derive(Debug, Clone)]
pub struct SdsService {
    inner: WorkloadService,
}

impl SdsService {
    /// SDS sharing `inner`'s cache, rate limit, stream cap and stop signal.
    pub fn new(inner: WorkloadService) -> Self {
        Self { inner }
    }
}

fn pem_of(label: &str, ders: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Vec<u8> {
    ders.into_iter()
        .map(|der| pem::encode(&pem::Pem::new(label, der.as_ref().to_vec())))
        .collect::<String>()
        .into_bytes()
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

fn tls_secret(name: &str, svid: &InstalledSvid) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(pem_of("CERTIFICATE", svid.chain())),
            private_key: inline(pem_of("PRIVATE KEY", [svid.key_pkcs8.as_slice()])),
            ..Default::default()
        })),
    }
}

fn validation_secret(name: &str, certs: Vec<&Vec<u8>>) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(pem_of("CERTIFICATE", certs)),
                ..Default::default()
            },
        )),
    }
}

/// The secrets named `names` for `peer` at `now` (unknown names left out); `PermissionDenied`
/// for a caller entitled to no identity. Pure.
pub fn secrets(
    snapshot: &Snapshot,
    peer: &PeerInfo,
    names: &[String],
    now: SystemTime,
) -> Result<Vec<Secret>, Status> {
    let svids = selection::svids_for(snapshot, peer, now);
    let Some(first) = svids.first() else {
        return Err(Status::permission_denied(NO_IDENTITY));
    };
    let own = snapshot.trust_domain.as_ref();
    let served = |td: &meshcert_protocol::TrustDomain| {
        Some(td) == own || snapshot.federated_bundles().any(|(t, _)| t == td)
    };
    let mut out = Vec::new();
    for name in names {
        let secret = match name.as_str() {
            "default" => Some(tls_secret(name, first)),
            "ROOTCA" => own
                .and_then(|td| snapshot.bundles.get(td))
                .map(|certs| validation_secret(name, certs.iter().collect())),
            "ALL" => {
                let own_certs = own.and_then(|td| snapshot.bundles.get(td));
                let certs = own_certs
                    .into_iter()
                    .flatten()
                    .chain(snapshot.federated_bundles().flat_map(|(_, c)| c))
                    .collect();
                Some(validation_secret(name, certs))
            }
            other => match meshcert_protocol::SpiffeId::new(other) {
                Ok(id) if id.path().is_empty() => snapshot
                    .bundles
                    .get(id.trust_domain())
                    .filter(|_| served(id.trust_domain()))
                    .map(|certs| validation_secret(name, certs.iter().collect())),
                Ok(id) => svids
                    .iter()
                    .find(|s| s.spiffe_id == id)
                    .map(|s| tls_secret(name, s)),
                Err(_) => None,
            },
        };
        out.extend(secret);
    }
    Ok(out)
}

/// A response carrying `secrets`, its version a digest of them, with `nonce`.
pub fn response(secrets: &[Secret], nonce: String) -> DiscoveryResponse {
    let resources: Vec<Any> = secrets
        .iter()
        .map(|s| Any {
            type_url: SECRET_TYPE.to_owned(),
            value: s.encode_to_vec(),
        })
        .collect();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for r in &resources {
        digest.update(&(r.value.len() as u64).to_be_bytes());
        digest.update(&r.value);
    }
    let version = digest.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    DiscoveryResponse {
        version_info: version,
        resources,
        type_url: SECRET_TYPE.to_owned(),
        nonce,
        ..Default::default()
    }
}

fn check_type(request: &DiscoveryRequest) -> Result<(), Status> {
    if request.type_url.is_empty() || request.type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "SDS serves {SECRET_TYPE}, not {}",
            request.type_url
        )))
    }
}

/// What one SDS stream has sent and been told.
#[derive(Debug, Default)]
struct StreamState {
    names: Vec<String>,
    version: Option<String>,
    nonce: Option<String>,
    sent: u64,
}

impl StreamState {
    /// The next response if it differs from the last one sent (`force`: the names changed).
    fn next(
        &mut self,
        snapshot: &Snapshot,
        peer: &PeerInfo,
        force: bool,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let found = secrets(snapshot, peer, &self.names, SystemTime::now())?;
        self.sent += 1;
        let resp = response(&found, self.sent.to_string());
        if !force && self.version.as_deref() == Some(resp.version_info.as_str()) {
            return Ok(None);
        }
        self.version = Some(resp.version_info.clone());
        self.nonce = Some(resp.nonce.clone());
        Ok(Some(resp))
    }

    /// Reads one request: whether a response is due now.
    fn on_request(&mut self, request: &DiscoveryRequest) -> bool {
        let first = self.nonce.is_none();
        if !first && request.response_nonce != self.nonce.clone().unwrap_or_default() {
            // An answer to an older response: superseded by the one in flight.
            return false;
        }
        let names_changed = request.resource_names != self.names;
        self.names.clone_from(&request.resource_names);
        if let Some(error) = &request.error_detail {
            tracing::warn!(version = %request.version_info, error = %error.message, "Envoy rejected an SDS response (NACK); waiting for the next change");
        }
        first || names_changed
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = Updates<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Updates<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.inner.metrics().record(
            "DeltaSecrets",
            Err(Status::unimplemented(
                "incremental SDS is not served; use StreamSecrets",
            )),
        )
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let admitted = async {
            let caller = self.inner.identify(&request, "StreamSecrets").await?;
            Ok((caller, self.inner.stream_slot("StreamSecrets")?))
        };
        let (caller, slot) = self
            .inner
            .metrics()
            .record("StreamSecrets", admitted.await)?;
        let mut incoming = request.into_inner();
        let mut snapshots = self.inner.cache().subscribe();
        let mut stop = self.inner.stop();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let (_slot, caller) = (slot, caller);
            let mut state = StreamState::default();
            loop {
                let due = tokio::select! {
                    message = incoming.message() => match message {
                        Ok(Some(request)) => {
                            if let Err(status) = check_type(&request) {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                            let force = state.on_request(&request);
                            if !force { continue; }
                            true
                        }
                        Ok(None) | Err(_) => return,
                    },
                    changed = snapshots.changed(), if state.nonce.is_some() => {
                        if changed.is_err() { return; }
                        false
                    }
                    () = stopped(&mut stop) => {
                        let _ = tx.try_send(Err(Status::unavailable("agent shutting down")));
                        return;
                    }
                };
                let snapshot: Arc<Snapshot> = snapshots.borrow_and_update().clone();
                match state.next(&snapshot, &caller.peer, due) {
                    Ok(Some(response)) => {
                        if tx.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let result = async {
            let caller = self.inner.identify(&request, "FetchSecrets").await?;
            check_type(request.get_ref())?;
            let snapshot = self.inner.cache().current();
            let found = secrets(
                &snapshot,
                &caller.peer,
                &request.get_ref().resource_names,
                SystemTime::now(),
            )?;
            Ok(Response::new(response(&found, "fetch".into())))
        };
        self.inner.metrics().record("FetchSecrets", result.await)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use meshcert_protocol::{Entry, Selector, SpiffeId, TrustDomain};

    use super::*;

    fn svid(id: &str) -> Arc<InstalledSvid> {
        let spiffe_id = SpiffeId::new(id).expect("valid");
        Arc::new(InstalledSvid {
            entry: Arc::new(Entry {
                id: "e".into(),
                spiffe_id: spiffe_id.clone(),
                nodes: vec![],
                mesh: None,
                selectors: vec![Selector::Uid(0)],
                ttl: Duration::from_secs(3600),
                dir: "e".into(),
                owner: None,
                hook: None,
                gateway: false,
            }),
            spiffe_id,
            leaf: vec![1, 2, 3],
            intermediates: vec![vec![4]].into(),
            key_pkcs8: Arc::new(vec![9].into()),
            not_after: SystemTime::now() + Duration::from_secs(3600),
            hint: String::new(),
        })
    }

    fn snapshot(federate: bool) -> Snapshot {
        let td = |s: &str| TrustDomain::new(s).expect("td");
        Snapshot {
            trust_domain: Some(td("a.org")),
            bundles: BTreeMap::from([(td("a.org"), vec![vec![10]]), (td("b.org"), vec![vec![20]])]),
            federate,
            svids: vec![svid("spiffe://a.org/web"), svid("spiffe://a.org/admin")],
            ..Snapshot::default()
        }
    }

    fn names(found: &[Secret]) -> Vec<&str> {
        found.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn resource_names_select_certificates_and_bundles() {
        let peer = PeerInfo::default();
        let all: Vec<String> = [
            "default",
            "spiffe://a.org/admin",
            "spiffe://a.org/other",
            "ROOTCA",
            "ALL",
            "spiffe://a.org",
            "spiffe://b.org",
            "nonsense",
        ]
        .map(str::to_owned)
        .to_vec();
        let now = SystemTime::now();
        let found = secrets(&snapshot(false), &peer, &all, now).expect("entitled");
        assert_eq!(
            names(&found),
            [
                "default",
                "spiffe://a.org/admin",
                "ROOTCA",
                "ALL",
                "spiffe://a.org"
            ]
        );
        let found = secrets(&snapshot(true), &peer, &all, now).expect("entitled");
        assert_eq!(
            names(&found),
            [
                "default",
                "spiffe://a.org/admin",
                "ROOTCA",
                "ALL",
                "spiffe://a.org",
                "spiffe://b.org"
            ]
        );
        let Some(secret::Type::ValidationContext(ctx)) = &found[3].r#type else {
            panic!("ALL is a validation context");
        };
        let Some(Specifier::InlineBytes(pem_bytes)) =
            ctx.trusted_ca.as_ref().and_then(|d| d.specifier.clone())
        else {
            panic!("inline");
        };
        assert_eq!(pem::parse_many(pem_bytes).expect("pem").len(), 2);
        // A caller entitled to nothing.
        let stranger = PeerInfo {
            uid: 1,
            ..PeerInfo::default()
        };
        let status = secrets(&snapshot(true), &stranger, &all, now).expect_err("nothing");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn versions_follow_content_and_nacks_do_not_resend() {
        let peer = PeerInfo::default();
        let mut state = StreamState::default();
        let ask = |names: &[&str], nonce: &str, nack: bool| DiscoveryRequest {
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            response_nonce: nonce.into(),
            error_detail: nack.then(Default::default),
            ..Default::default()
        };
        assert!(state.on_request(&ask(&["default"], "", false)));
        let first = state
            .next(&snapshot(false), &peer, true)
            .expect("ok")
            .expect("sent");
        // The same state again is not sent; a NACK sends nothing either.
        assert!(
            state
                .next(&snapshot(false), &peer, false)
                .expect("ok")
                .is_none()
        );
        assert!(!state.on_request(&ask(&["default"], &first.nonce, true)));
        // A stale nonce is ignored, new names are answered.
        assert!(!state.on_request(&ask(&["ROOTCA"], "stale", false)));
        assert!(state.on_request(&ask(&["ROOTCA"], &first.nonce, false)));
    }

    proptest::proptest! {
        #[test]
        fn garbage_resource_names_get_only_what_they_name(names in proptest::collection::vec(".{0,80}", 0..8)) {
            let found = secrets(&snapshot(true), &PeerInfo::default(), &names, SystemTime::now())
                .expect("entitled");
            proptest::prop_assert!(found.len() <= names.len());
            // Every secret answered was asked for by name (an empty list asks for every one).
            if !names.is_empty() {
                for secret in &found {
                    proptest::prop_assert!(names.contains(&secret.name), "{} not asked for", secret.name);
                }
            }
            let type_url = names.concat();
            let r = check_type(&DiscoveryRequest { type_url: type_url.clone(), ..Default::default() });
            match r {
                Ok(()) => proptest::prop_assert!(type_url.is_empty() || type_url == SECRET_TYPE),
                Err(status) => {
                    proptest::prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    proptest::prop_assert!(status.message().contains(SECRET_TYPE));
                }
            }
        }
    }
}
