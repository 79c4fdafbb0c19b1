//! The status document built from the holder's state at one moment: the configuration and
//! the authority serving, the datastore's nodes and reports, and the facts only the running
//! process knows (addresses, the last renewal failures, the server certificate).

use std::net::SocketAddr;
use std::time::SystemTime;

use super::{
    CertificateStatus, ConfigStatus, IntermediateStatus, MeshFacts, MeshRootStatus, RootStatus,
    ServerCertStatus, State, Status, enforcement_status, federation_status, node_statuses,
    server_cert_warning,
};
use crate::authority::{Authority, rfc3339};
use crate::config::{Config, TrustModel};
use crate::store::{Store, StoreError};

/// The HTTPS API's server certificate, as the status shows it.
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// SHA-256 fingerprint of its DER.
    pub fingerprint: String,
    /// Start of its validity.
    pub not_before: SystemTime,
    /// End of its validity.
    pub not_after: SystemTime,
}

/// Everything the status document is built from; [`StatusBuilder::build`] reads the
/// datastore once and assembles the document.
pub struct StatusBuilder<'a> {
    /// The configuration serving.
    pub config: &'a Config,
    /// The roots and intermediates serving.
    pub authority: &'a Authority,
    /// The current bundle version.
    pub bundle_version: u64,
    /// The datastore (nodes, their reports, the issuance count).
    pub store: &'a dyn Store,
    /// The last reload's verdict.
    pub config_status: ConfigStatus,
    /// The HTTPS API's bound address.
    pub listen_address: Option<SocketAddr>,
    /// The metrics listener's bound address.
    pub metrics_address: Option<SocketAddr>,
    /// The last intermediate renewal failure, if the last attempt failed.
    pub renewal_error: Option<String>,
    /// The last server certificate renewal failure, if the last attempt failed.
    pub server_cert_error: Option<String>,
    /// The server certificate in use.
    pub server_cert: Option<ServerCert>,
}

impl StatusBuilder<'_> {
    /// The status document at `now`.
    pub fn build(self, now: SystemTime) -> Result<Status, StoreError> {
        let nodes = self.store.nodes()?;
        let reports = self.store.reports()?;
        let issued = self.store.issuance_count()?;
        let mut messages = Vec::new();
        let root = self.authority.root();
        if now >= root.not_after {
            messages.push(format!(
                "the shared root expired at {}",
                rfc3339(root.not_after)
            ));
        }
        let (mesh_roots, intermediates) = self.mesh_authorities(now, &mut messages);
        if let Some(e) = &self.renewal_error {
            messages.push(format!("intermediate renewal failed: {e}"));
        }
        let server_certificate = self.server_certificate(now, &mut messages);
        let facts = self.mesh_facts();
        let config = self.config;
        Ok(Status {
            display_name: config.display_name.clone(),
            listen_address: self
                .listen_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
            metrics_address: self.metrics_address.map(|a| a.to_string()),
            config_status: self.config_status,
            certificate_status: CertificateStatus {
                state: if messages.is_empty() {
                    State::Accepted
                } else {
                    State::ProcessingError
                },
                messages,
                trust: match config.trust {
                    TrustModel::Shared => "SHARED".into(),
                    TrustModel::Limited => "LIMITED".into(),
                },
                root: RootStatus {
                    fingerprint_sha256: root.fingerprint(),
                    not_after: rfc3339(root.not_after),
                    key_bits: self.authority.root_key_bits(),
                    org: self.authority.root_org(),
                },
                mesh_roots,
                intermediates,
                server_certificate,
                svids_issued: issued,
                nodes: node_statuses(&nodes, &reports, now, config.holder.heartbeat),
            },
            federation_status: federation_status(
                &facts,
                self.bundle_version,
                config.federation_permissive,
                &nodes,
                &reports,
            ),
            access_control_enforcement_status: enforcement_status(&facts, &nodes, &reports),
        })
    }

    /// Each mesh's own root (limited trust) and its intermediates (workload and gateway);
    /// adds a message for each one that expired.
    fn mesh_authorities(
        &self,
        now: SystemTime,
        messages: &mut Vec<String>,
    ) -> (Vec<MeshRootStatus>, Vec<IntermediateStatus>) {
        let mut intermediates = Vec::new();
        let mut mesh_roots = Vec::new();
        for m in &self.config.meshes {
            if let Some(r) = self.authority.mesh_root(&m.name) {
                if now >= r.not_after {
                    messages.push(format!(
                        "the root of mesh `{}` expired at {}",
                        m.name,
                        rfc3339(r.not_after)
                    ));
                }
                mesh_roots.push(MeshRootStatus {
                    mesh: m.name.clone(),
                    trust_domain: m.trust_domain.to_string(),
                    fingerprint_sha256: r.fingerprint(),
                    not_after: rfc3339(r.not_after),
                });
            }
            let kinds = [
                (false, self.authority.intermediate(&m.name)),
                (true, self.authority.gateway_intermediate(&m.name)),
            ];
            for (gateway, ca) in kinds {
                let Some(ca) = ca else { continue };
                if now >= ca.not_after {
                    messages.push(format!(
                        "the {}intermediate of mesh `{}` expired at {}",
                        if gateway { "gateway " } else { "" },
                        m.name,
                        rfc3339(ca.not_after)
                    ));
                }
                intermediates.push(IntermediateStatus {
                    mesh: m.name.clone(),
                    trust_domain: m.trust_domain.to_string(),
                    gateway,
                    fingerprint_sha256: ca.fingerprint(),
                    not_after: rfc3339(ca.not_after),
                });
            }
        }
        (mesh_roots, intermediates)
    }

    /// The server certificate's facts; adds its renewal failure and its expiry warning to
    /// `messages`.
    fn server_certificate(
        &self,
        now: SystemTime,
        messages: &mut Vec<String>,
    ) -> Option<ServerCertStatus> {
        if let Some(e) = &self.server_cert_error {
            messages.push(format!("server certificate renewal failed: {e}"));
        }
        let t = self.server_cert.as_ref()?;
        messages.extend(server_cert_warning(t.not_before, t.not_after, now));
        let life = t.not_after.duration_since(t.not_before).unwrap_or_default();
        Some(ServerCertStatus {
            fingerprint_sha256: t.fingerprint.clone(),
            not_before: rfc3339(t.not_before),
            not_after: rfc3339(t.not_after),
            renew_at: rfc3339(t.not_before + life / 2),
        })
    }

    /// Each mesh's configured and effective enforcement.
    fn mesh_facts(&self) -> Vec<MeshFacts> {
        let config = self.config;
        config
            .meshes
            .iter()
            .map(|m| MeshFacts {
                mesh: m.name.clone(),
                trust_domain: m.trust_domain.to_string(),
                configured: config.enforcement,
                effective: config.effective_enforcement(m),
            })
            .collect()
    }
}
