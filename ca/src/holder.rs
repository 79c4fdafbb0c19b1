//! The running holder: configuration, authority, datastore and entries, and the operations the
//! HTTPS API and the admin socket expose. Transport-free, so both front ends share it.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshcert_protocol::api::{
    ApiError, AttestRequest, Der, ErrorCode, MAX_BATCH, NodeSvidResponse, RenewRequest,
    SignOutcome, SignRequest, SignResponse, SignResult, Svid, SyncResponse, node_id, node_name,
    valid_node_name,
};
use meshcert_protocol::{NodeReport, SpiffeId};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::authority::{Authority, AuthorityError, rfc3339, unix};
use crate::config::Config;
use crate::entries::EntryBook;
use crate::policy::{Caller, check_csr, check_sign};
use crate::status::{
    CertificateStatus, ConfigStatus, IntermediateStatus, RootStatus, Status, node_statuses,
};
use crate::store::{
    Issuance, SqliteStore, Store, StoreError, StoredReport, TokenOutcome, TokenRecord,
};
use crate::tokens;

/// Why the holder cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// The state folder cannot be created.
    #[error("cannot create the state folder {path}: {source}")]
    StateDir {
        /// The folder.
        path: std::path::PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The root or an intermediate cannot be loaded or created.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The datastore cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The holder's shared state.
pub struct Holder {
    /// The validated configuration.
    pub config: Config,
    /// Root and intermediates.
    pub authority: Authority,
    /// The datastore.
    pub store: Arc<dyn Store>,
    /// Registration entries.
    pub entries: EntryBook,
    listen_address: Mutex<Option<SocketAddr>>,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

/// Logs an internal failure and answers without its details.
fn internal(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError::new(ErrorCode::Internal, "the holder failed; see its log")
}

impl Holder {
    /// Creates the state folder, loads or creates the authority, opens the datastore.
    pub fn open(config: Config, now: SystemTime) -> Result<Self, HolderError> {
        let dir = &config.holder.state_dir;
        // The state folder holds private keys: owner-only from creation.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| HolderError::StateDir {
                path: dir.clone(),
                source,
            })?;
        let authority =
            Authority::open(&config.root, &config.display_name, &config.meshes, dir, now)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.holder.db_path())?);
        let entries = EntryBook::new(
            config.entries.clone(),
            config.meshes.clone(),
            Arc::clone(&store),
        );
        Ok(Self {
            config,
            authority,
            store,
            entries,
            listen_address: Mutex::new(None),
        })
    }

    /// Records the address the API is bound to.
    pub fn set_listen_address(&self, addr: SocketAddr) {
        *self
            .listen_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(addr);
    }

    /// The address the API is bound to, once bound.
    pub fn listen_address(&self) -> Option<SocketAddr> {
        *self
            .listen_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Identifies the calling node from its verified client certificate (leaf DER).
    pub fn caller(&self, leaf: Option<&[u8]>) -> Result<Caller, ApiError> {
        let leaf = leaf.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "this call needs the node SVID as client certificate",
            )
        })?;
        let unknown = || {
            ApiError::new(
                ErrorCode::UnknownNode,
                "the client certificate is not a node SVID of a known node",
            )
        };
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|_| unknown())?;
        let uri = match cert.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.iter().find_map(|g| match g {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            }),
            _ => None,
        }
        .ok_or_else(unknown)?;
        let id = SpiffeId::new(&uri).map_err(|_| unknown())?;
        let name = node_name(&id).ok_or_else(unknown)?;
        let record = self
            .store
            .node(name)
            .map_err(|e| internal("reading a node", &e))?
            .ok_or_else(unknown)?;
        if record.banned {
            return Err(ApiError::new(
                ErrorCode::NodeBanned,
                format!("node `{name}` is banned"),
            ));
        }
        if record.spiffe_id != id.to_string() {
            return Err(unknown());
        }
        let mesh = self.config.mesh(&record.mesh).ok_or_else(unknown)?;
        Ok(Caller {
            node: record.name,
            mesh: mesh.name.clone(),
            trust_domain: mesh.trust_domain.clone(),
        })
    }

    fn node_svid(
        &self,
        node: &str,
        mesh_name: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<NodeSvidResponse, ApiError> {
        let checked = check_csr(csr)?;
        let mesh = self.config.mesh(mesh_name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::WrongMesh,
                format!("mesh `{mesh_name}` is not part of this virtual mesh"),
            )
        })?;
        let id = node_id(&mesh.trust_domain, node)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
        let ttl = self.config.holder.node_svid_ttl;
        let issued = self
            .authority
            .sign_leaf(mesh_name, &checked.key, &id, ttl, ttl, now)
            .map_err(|e| internal("signing a node SVID", &e))?;
        self.store
            .record_issuances(&[Issuance {
                serial: issued.serial.clone(),
                spiffe_id: id.to_string(),
                node: node.to_owned(),
                not_after: unix(issued.not_after),
                issued_at: unix(now),
            }])
            .map_err(|e| internal("recording an issuance", &e))?;
        tracing::info!(node, spiffe_id = %id, serial = %issued.serial, "node SVID issued");
        Ok(NodeSvidResponse {
            node: node.to_owned(),
            mesh: mesh_name.to_owned(),
            svid: Svid {
                spiffe_id: id,
                chain: vec![Der(issued.leaf), Der(issued.intermediate)],
            },
            bundles: self.authority.bundles(),
        })
    }

    /// `POST /v1/attest`: consumes the join token and issues the node SVID.
    pub fn attest(
        &self,
        req: &AttestRequest,
        now: SystemTime,
    ) -> Result<NodeSvidResponse, ApiError> {
        // A malformed CSR must not burn the token.
        check_csr(&req.csr.0)?;
        let hash = tokens::hash(&req.token);
        let ids = |node: &str, mesh: &str| {
            self.config
                .mesh(mesh)
                .and_then(|m| node_id(&m.trust_domain, node).ok())
                .map(|id| id.to_string())
                .unwrap_or_default()
        };
        let outcome = self
            .store
            .consume_token(&hash, unix(now), &ids)
            .map_err(|e| internal("consuming a token", &e))?;
        match outcome {
            TokenOutcome::Consumed { node, mesh } => {
                let banned = self
                    .store
                    .node(&node)
                    .map_err(|e| internal("reading a node", &e))?
                    .is_some_and(|n| n.banned);
                if banned {
                    return Err(ApiError::new(
                        ErrorCode::NodeBanned,
                        format!("node `{node}` is banned"),
                    ));
                }
                tracing::info!(node, mesh, "node attested");
                self.node_svid(&node, &mesh, &req.csr.0, now)
            }
            TokenOutcome::Used => Err(ApiError::new(
                ErrorCode::TokenUsed,
                "the join token was already used",
            )),
            TokenOutcome::Expired => Err(ApiError::new(
                ErrorCode::TokenExpired,
                "the join token has expired",
            )),
            TokenOutcome::Unknown => Err(ApiError::new(
                ErrorCode::InvalidToken,
                "the join token is not known",
            )),
        }
    }

    /// `POST /v1/node/renew`.
    pub fn renew(
        &self,
        caller: &Caller,
        req: &RenewRequest,
        now: SystemTime,
    ) -> Result<NodeSvidResponse, ApiError> {
        self.node_svid(&caller.node, &caller.mesh, &req.csr.0, now)
    }

    /// `GET /v1/sync`.
    pub fn sync(&self, caller: &Caller) -> Result<SyncResponse, ApiError> {
        let entries = self
            .entries
            .for_node(&caller.node, &caller.mesh)
            .map_err(|e| internal("listing entries", &e))?;
        let mesh = self
            .config
            .mesh(&caller.mesh)
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownNode, "the node's mesh is gone"))?;
        Ok(SyncResponse {
            node: caller.node.clone(),
            mesh: caller.mesh.clone(),
            trust_domain: caller.trust_domain.clone(),
            enforcement: self.config.effective_enforcement(mesh),
            entries,
            bundles: self.authority.bundles(),
        })
    }

    /// `POST /v1/sign`: one result per CSR; every issuance is committed before the answer.
    pub fn sign(
        &self,
        caller: &Caller,
        req: &SignRequest,
        now: SystemTime,
    ) -> Result<SignResponse, ApiError> {
        if req.csrs.len() > MAX_BATCH {
            return Err(ApiError::new(
                ErrorCode::BatchTooLarge,
                format!("{} CSRs; at most {MAX_BATCH} per batch", req.csrs.len()),
            ));
        }
        let mut results = Vec::with_capacity(req.csrs.len());
        let mut records = Vec::new();
        for c in &req.csrs {
            let entry = self
                .entries
                .get(&c.entry_id)
                .map_err(|e| internal("reading entries", &e))?;
            let outcome = match check_sign(
                caller,
                &c.entry_id,
                entry.as_ref(),
                c.local.is_some(),
                &c.csr.0,
            ) {
                Err(error) => {
                    tracing::info!(node = %caller.node, entry_id = %c.entry_id, code = %error.code, "CSR refused");
                    SignOutcome::Refused { error }
                }
                Ok(ok) => {
                    let issued = self
                        .authority
                        .sign_leaf(
                            &caller.mesh,
                            &ok.key,
                            &ok.spiffe_id,
                            ok.ttl,
                            self.config.holder.svid_max_ttl,
                            now,
                        )
                        .map_err(|e| internal("signing a leaf", &e))?;
                    records.push(Issuance {
                        serial: issued.serial.clone(),
                        spiffe_id: ok.spiffe_id.to_string(),
                        node: caller.node.clone(),
                        not_after: unix(issued.not_after),
                        issued_at: unix(now),
                    });
                    SignOutcome::Issued {
                        svid: Svid {
                            spiffe_id: ok.spiffe_id,
                            chain: vec![Der(issued.leaf), Der(issued.intermediate)],
                        },
                        gateway_svid: None,
                    }
                }
            };
            results.push(SignResult {
                entry_id: c.entry_id.clone(),
                outcome,
            });
        }
        self.store
            .record_issuances(&records)
            .map_err(|e| internal("recording issuances", &e))?;
        for r in &records {
            tracing::info!(node = %r.node, spiffe_id = %r.spiffe_id, serial = %r.serial, "SVID issued");
        }
        Ok(SignResponse {
            results,
            bundles: self.authority.bundles(),
        })
    }

    /// `POST /v1/report`.
    pub fn report(
        &self,
        caller: &Caller,
        report: NodeReport,
        now: SystemTime,
    ) -> Result<(), ApiError> {
        self.store
            .put_report(&StoredReport {
                node: caller.node.clone(),
                report,
                received_at: unix(now),
            })
            .map_err(|e| internal("storing a report", &e))
    }

    /// Creates a join token for `node` in `mesh`.
    pub fn create_token(
        &self,
        node: &str,
        mesh: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, ApiError> {
        if !valid_node_name(node) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!(
                    "`{node}` is not a valid node name (lowercase letters, digits, `.`, `-`, `_`)"
                ),
            ));
        }
        if self.config.mesh(mesh).is_none() {
            return Err(ApiError::new(
                ErrorCode::WrongMesh,
                format!("mesh `{mesh}` is not part of this virtual mesh"),
            ));
        }
        let token = tokens::generate().map_err(|e| internal("creating a token", &e))?;
        self.store
            .create_token(&TokenRecord {
                hash: tokens::hash(&token),
                node: node.to_owned(),
                mesh: mesh.to_owned(),
                expires_at: unix(now + ttl),
            })
            .map_err(|e| internal("storing a token", &e))?;
        tracing::info!(node, mesh, ttl = %humantime::format_duration(ttl), "join token created");
        Ok(token)
    }

    /// The status document.
    pub fn status(&self, now: SystemTime) -> Result<Status, ApiError> {
        let nodes = self
            .store
            .nodes()
            .map_err(|e| internal("listing nodes", &e))?;
        let reports = self
            .store
            .reports()
            .map_err(|e| internal("listing reports", &e))?;
        let issued = self
            .store
            .issuance_count()
            .map_err(|e| internal("counting issuances", &e))?;
        let root = self.authority.root();
        let intermediates = self
            .config
            .meshes
            .iter()
            .filter_map(|m| {
                self.authority
                    .intermediate(&m.name)
                    .map(|ca| IntermediateStatus {
                        mesh: m.name.clone(),
                        trust_domain: m.trust_domain.to_string(),
                        fingerprint_sha256: ca.fingerprint(),
                        not_after: rfc3339(ca.not_after),
                    })
            })
            .collect();
        Ok(Status {
            display_name: self.config.display_name.clone(),
            listen_address: self
                .listen_address()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            config_status: ConfigStatus::accepted(),
            certificate_status: CertificateStatus {
                state: if now < root.not_after {
                    "ISSUING".into()
                } else {
                    "EXPIRED".into()
                },
                root: RootStatus {
                    fingerprint_sha256: root.fingerprint(),
                    not_after: rfc3339(root.not_after),
                    key_bits: self.authority.root_key_bits(),
                    org: self.authority.root_org(),
                },
                intermediates,
                svids_issued: issued,
                nodes: node_statuses(&nodes, &reports, now, self.config.holder.heartbeat),
            },
        })
    }
}
