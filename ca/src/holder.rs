//! The running holder: configuration, authority, datastore and entries, and the operations the
//! HTTPS API and the admin socket expose. Transport-free, so both front ends share it.
//!
//! One file on purpose: every operation here reads or swaps the one `Serving` snapshot under the
//! same locks (attest, renew, sync, sign, report, reload), and keeping them together keeps that
//! discipline visible. The status document is built in `status`, the policy checks in `policy`.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use meshcert_protocol::api::{
    ApiError, AttestRequest, Bundles, Der, ErrorCode, MAX_BATCH, NodeSvidResponse, RenewRequest,
    SignOutcome, SignRequest, SignResponse, SignResult, Svid, SyncResponse, node_id,
    valid_node_name,
};
use meshcert_protocol::{Enforcement, NodeReport};

use crate::authority::{Authority, AuthorityError, unix};
use crate::caller::ClientChain;
use crate::config::{Config, TrustModel};
use crate::entries::EntryBook;
use crate::metrics::Metrics;
use crate::policy::{Caller, LocalRules, check_csr, check_sign};
use crate::status::{ConfigStatus, ServerCert, State, Status, StatusBuilder};
use crate::store::{
    Issuance, KubernetesNodeOutcome, NodeRecord, Store, StoreError, StoredReport, TokenOutcome,
    TokenRecord,
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
    /// The builtin root the replicas share cannot be read or stored.
    #[error(transparent)]
    Sealed(#[from] crate::sealed::SealError),
    /// The JWT-SVID signing keys cannot be read, shared or migrated.
    #[error(transparent)]
    Jwt(#[from] crate::jwt::JwtError),
}

/// What a holder serves with one accepted configuration: swapped as a whole on reload.
pub struct Serving {
    /// The validated configuration.
    pub config: Config,
    /// Roots and intermediates.
    pub authority: Authority,
    /// Registration entries.
    pub entries: EntryBook,
    /// The current bundle version (persisted in the datastore).
    pub bundle_version: u64,
    /// The root rotation state this authority was opened with.
    pub rotation: crate::rotation::RotationDoc,
    /// Under limited trust, each mesh root's rotation state (`root-rotation/<mesh>`).
    pub mesh_rotations: std::collections::BTreeMap<String, crate::rotation::RotationDoc>,
    /// Client chains verified with this snapshot, across connections (`crate::caller`).
    pub verified_chains: crate::caller::VerifiedChains,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("name", &self.config.name)
            .field("bundle_version", &self.bundle_version)
            .finish_non_exhaustive()
    }
}

impl Serving {
    /// Loads (or creates) the authority for `config`, and settles the bundle version.
    pub fn open(
        config: Config,
        store: &Arc<dyn Store>,
        now: SystemTime,
    ) -> Result<Self, HolderError> {
        crate::sealed::share_builtin_roots(&config, store.as_ref(), now)?;
        let (_, rotation) = crate::rotation::load(store.as_ref())?;
        crate::sealed::share_rotation_roots(&config, store.as_ref())?;
        let mut mesh_rotations = std::collections::BTreeMap::new();
        for m in config.mesh_roots.keys() {
            let scope = crate::rotation::Scope::Mesh(m.clone());
            let (_, doc) = crate::rotation::load_scope(store.as_ref(), &scope)?;
            mesh_rotations.insert(m.clone(), doc);
        }
        let authority = Authority::open_with_plan(
            &config.root,
            &config.mesh_roots,
            &config.display_name,
            &config.meshes,
            &config.holder.state_dir,
            now,
            &crate::rotation::plans(&rotation, &mesh_rotations, &config.holder.state_dir),
        )?;
        // The federation mode changes what nodes receive: it counts as bundle content.
        let digest = format!(
            "{}/{}",
            authority.bundle_digest(),
            if config.federation_permissive {
                "permissive"
            } else {
                "own"
            }
        );
        let bundle_version = store.settle_bundle_version(&digest)?;
        let entries = EntryBook::new(
            config.entries.clone(),
            config.meshes.clone(),
            Arc::clone(store),
        );
        Ok(Self {
            config,
            authority,
            entries,
            bundle_version,
            rotation,
            mesh_rotations,
            verified_chains: crate::caller::VerifiedChains::default(),
        })
    }

    /// Every bundle at the current version (with the activation of a rotation under way).
    pub fn bundles(&self) -> Bundles {
        let mut b = self.authority.bundles(self.bundle_version);
        b.rotation = crate::rotation::hint(self, None);
        b
    }

    /// What one CSR of a batch asks for: the holder entry with its id (a lookup by key), or for
    /// an agent-local entry whether a holder entry registers its ID (an indexed lookup, done
    /// only when the mesh's `enforcement` could allow the local entry at all).
    pub fn requested(
        &self,
        csr: &meshcert_protocol::api::CsrRequest,
        enforcement: Enforcement,
    ) -> Result<(Option<meshcert_protocol::Entry>, bool), ApiError> {
        let read = |e: crate::entries::EntryError| entries_failed("reading entries", &e);
        match &csr.local {
            Some(l) if enforcement == Enforcement::Disabled => {
                Ok((None, self.entries.registers(&l.spiffe_id).map_err(read)?))
            }
            Some(_) => Ok((None, false)),
            None => Ok((self.entries.get(&csr.entry_id).map_err(read)?, false)),
        }
    }

    /// The bundles a node of `mesh` receives: every mesh's under PERMISSIVE federation, else its
    /// own trust domain's only (plus the shared root under limited trust).
    pub fn bundles_for(&self, mesh: &str) -> Bundles {
        let mut b = self.bundles();
        b.rotation = crate::rotation::hint(self, Some(mesh));
        if !self.config.federation_permissive
            && let Some(m) = self.config.mesh(mesh)
        {
            b.trust_domains.retain(|td, _| *td == m.trust_domain);
        }
        b
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new configuration serves; whether the bundle version changed.
    Applied {
        /// The bundles changed (their version grew).
        bundles_changed: bool,
    },
    /// The file is invalid: `configStatus` is INVALID, the previous configuration serves.
    Invalid,
    /// The file is valid but could not be acted on (e.g. a provided root is unreadable):
    /// `configStatus` is PROCESSING_ERROR, the previous configuration serves.
    Failed,
}

/// The holder's shared state.
pub struct Holder {
    serving: RwLock<Arc<Serving>>,
    /// The datastore.
    pub store: Arc<dyn Store>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Metrics,
    /// The JWT-SVID signing keys (`crate::jwt`).
    pub jwt: crate::jwt::JwtKeys,
    config_status: RwLock<ConfigStatus>,
    renewal_error: Mutex<Option<String>>,
    server_cert_error: Mutex<Option<String>>,
    tls: RwLock<Option<crate::server::ServerTls>>,
    listen_address: Mutex<Option<SocketAddr>>,
    metrics_address: Mutex<Option<SocketAddr>>,
    /// The watch version (`crate::push`): moves whenever what nodes sync changes.
    changes: tokio::sync::watch::Sender<u64>,
    /// The datastore's change version last served, and this replica's configuration epoch:
    /// the two parts of the watch version.
    followed: Mutex<(u64, u64)>,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder")
            .field("serving", &self.serving())
            .finish_non_exhaustive()
    }
}

/// Logs an internal failure and answers without its details.
fn internal(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError::new(ErrorCode::Internal, "the holder failed; see its log")
}

/// A datastore failure: retryable ones (connection lost, database restarting, serialization
/// race) answer `UNAVAILABLE` so that agents retry, possibly on another replica; the others
/// are internal failures.
fn stored(what: &str, e: &StoreError) -> ApiError {
    if e.is_retryable() {
        tracing::warn!(error = %e, "{what}: the datastore is unavailable");
        return ApiError::new(
            ErrorCode::Unavailable,
            "the holder's datastore is unavailable; retry",
        );
    }
    internal(what, e)
}

/// An entry lookup failure: a datastore one as [`stored`] answers it.
fn entries_failed(what: &str, e: &crate::entries::EntryError) -> ApiError {
    match e {
        crate::entries::EntryError::Store(s) => stored(what, s),
        other => internal(what, other),
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
}

/// The settings that only take effect at a restart: `(field path, value)` pairs.
fn restart_only(h: &crate::config::HolderSettings) -> Vec<(&'static str, String)> {
    vec![
        ("holder.listen", h.listen.to_string()),
        ("holder.stateDir", h.state_dir.display().to_string()),
        ("holder.adminSocket", h.admin_socket.display().to_string()),
        ("holder.datastore", h.datastore_display()),
        (
            "holder.metricsListen",
            h.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
        ),
        ("holder.maxConnections", h.max_connections.to_string()),
    ]
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
            .and_then(|()| dir.parent().map_or(Ok(()), crate::authority::sync_dir))
            .map_err(|source| HolderError::StateDir {
                path: dir.clone(),
                source,
            })?;
        let store = crate::store::open(&config.holder.datastore, dir)?;
        let jwt = crate::jwt::JwtKeys::open(&config.holder, &store)?;
        let serving = Serving::open(config, &store, now)?;
        let metrics = Metrics::new();
        metrics.set_bundle_version(serving.bundle_version);
        let followed = (*store.changes().borrow(), crate::push::next_epoch(0));
        Ok(Self {
            serving: RwLock::new(Arc::new(serving)),
            store,
            metrics,
            jwt,
            config_status: RwLock::new(ConfigStatus::accepted()),
            renewal_error: Mutex::new(None),
            server_cert_error: Mutex::new(None),
            tls: RwLock::new(None),
            listen_address: Mutex::new(None),
            metrics_address: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(crate::push::watch_version(
                followed.0, followed.1,
            )),
            followed: Mutex::new(followed),
        })
    }

    /// Tells this replica's watching agents that its own configuration changed (a new epoch).
    pub fn changed(&self) {
        self.announce(|f| f.1 = crate::push::next_epoch(f.1));
    }

    /// Tells this replica's watching agents that the datastore's change version `version` is
    /// served (`crate::push::follow`).
    pub fn store_changed(&self, version: u64) {
        self.announce(|f| f.0 = f.0.max(version));
    }

    fn announce(&self, update: impl FnOnce(&mut (u64, u64))) {
        let mut followed = self
            .followed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        update(&mut followed);
        let version = crate::push::watch_version(followed.0, followed.1);
        self.changes
            .send_if_modified(|v| std::mem::replace(v, version) != version);
    }

    /// The change version, to wait on ([`crate::push`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// What the holder serves now.
    pub fn serving(&self) -> Arc<Serving> {
        read(&self.serving)
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.serving().config.clone()
    }

    /// Applies a re-read configuration file (`Err` = its validation problems). A failure leaves
    /// the previous configuration serving and says why in `configStatus`. Settings that only a
    /// restart applies (listen addresses, state folder, datastore) keep their running values
    /// and are noted in `configStatus.messages`.
    pub fn reload(&self, new: Result<Config, Vec<String>>, now: SystemTime) -> ReloadOutcome {
        let mut config = match new {
            Ok(c) => c,
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "invalid configuration; the previous one keeps serving");
                }
                let mut messages = problems;
                messages.push("the last accepted configuration keeps serving".into());
                write(&self.config_status, ConfigStatus::invalid(messages));
                return ReloadOutcome::Invalid;
            }
        };
        let current = self.serving();
        let mut notes = Vec::new();
        for ((path, old), (_, new)) in restart_only(&current.config.holder)
            .into_iter()
            .zip(restart_only(&config.holder))
        {
            if old != new {
                notes.push(format!(
                    "{path}: `{new}` takes effect at the next restart; `{old}` is in use"
                ));
            }
        }
        config.holder.listen = current.config.holder.listen;
        config.holder.state_dir = current.config.holder.state_dir.clone();
        config.holder.admin_socket = current.config.holder.admin_socket.clone();
        config.holder.datastore = current.config.holder.datastore.clone();
        config.holder.metrics_listen = current.config.holder.metrics_listen;
        config.holder.max_connections = current.config.holder.max_connections;
        match Serving::open(config, &self.store, now) {
            Ok(next) => {
                let bundles_changed = next.bundle_version != current.bundle_version;
                for n in &notes {
                    tracing::warn!(note = %n, "configuration reloaded");
                }
                tracing::info!(
                    meshes = next.config.meshes.len(),
                    entries = next.config.entries.len(),
                    bundle_version = next.bundle_version,
                    "configuration reloaded"
                );
                self.metrics.set_bundle_version(next.bundle_version);
                write(&self.serving, Arc::new(next));
                self.changed();
                write(
                    &self.config_status,
                    ConfigStatus {
                        state: State::Accepted,
                        messages: notes,
                    },
                );
                ReloadOutcome::Applied { bundles_changed }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot apply the configuration; the previous one keeps serving");
                write(
                    &self.config_status,
                    ConfigStatus {
                        state: State::ProcessingError,
                        messages: vec![
                            e.to_string(),
                            "the last accepted configuration keeps serving".into(),
                        ],
                    },
                );
                ReloadOutcome::Failed
            }
        }
    }

    /// Opens the authority again with the configuration in force (a root rotation step was
    /// persisted); the configuration status is left as it is.
    pub fn reopen(&self, now: SystemTime) -> Result<(), HolderError> {
        let next = Serving::open(self.config(), &self.store, now)?;
        self.metrics.set_bundle_version(next.bundle_version);
        // Announced by `crate::push::follow` once the step's version is served.
        write(&self.serving, Arc::new(next));
        Ok(())
    }

    /// Records the outcome of the last intermediate renewal (`None`: it worked).
    pub fn set_renewal_error(&self, error: Option<String>) {
        *self
            .renewal_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    /// Records the outcome of the last server certificate renewal (`None`: it worked).
    pub fn set_server_cert_error(&self, error: Option<String>) {
        *self
            .server_cert_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    /// Prunes issuances that expired, and join tokens that expired, longer than
    /// `holder.retention` before `now`; failures are logged and retried at the next round.
    pub fn prune(&self, now: SystemTime) {
        let retention = self.serving().config.holder.retention;
        let before = unix(now).saturating_sub(retention.as_secs());
        match self.store.prune(before) {
            Ok(p) if p.issuances > 0 || p.tokens > 0 => tracing::info!(
                issuances = p.issuances,
                tokens = p.tokens,
                retention = %humantime::format_duration(retention),
                "pruned expired records"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "pruning the datastore failed; retrying later"),
        }
    }

    /// Installs the TLS configuration (and server certificate) new connections use.
    pub fn set_tls(&self, tls: crate::server::ServerTls) {
        self.metrics.set_server_cert_expiry(tls.not_after);
        write(&self.tls, Some(tls));
    }

    /// The TLS configuration new connections use, once set.
    pub fn tls(&self) -> Option<crate::server::ServerTls> {
        read(&self.tls)
    }

    /// Records the address the metrics listener is bound to.
    pub fn set_metrics_address(&self, addr: SocketAddr) {
        *self
            .metrics_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(addr);
    }

    /// The address the metrics listener is bound to, when there is one.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        *self
            .metrics_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    /// Identifies the calling node from its client certificate chain (leaf first, DER), which
    /// must verify against the claimed node's own mesh root through one of that mesh's
    /// intermediates ([`Authority::verify_node_chain`]): the TLS layer accepts a chain to any
    /// of the holder's roots, so this is what keeps meshes apart under limited trust.
    /// The chain's identity is read once per connection ([`ClientChain`]) and a successful
    /// verification is remembered for the serving snapshot across connections (see `caller`);
    /// the node's record is read for every call.
    pub fn caller(&self, chain: Option<&ClientChain>, now: SystemTime) -> Result<Caller, ApiError> {
        let chain = chain.filter(|c| !c.der().is_empty()).ok_or_else(|| {
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
        let identity = chain.identity().ok_or_else(unknown)?;
        let name = identity.node.as_str();
        let record = self
            .store
            .node(name)
            .map_err(|e| stored("reading a node", &e))?
            .ok_or_else(unknown)?;
        if record.banned {
            return Err(ApiError::new(
                ErrorCode::NodeBanned,
                format!("node `{name}` is banned"),
            ));
        }
        if record.spiffe_id != identity.id.to_string() {
            return Err(unknown());
        }
        let serving = self.serving();
        let mesh = serving.config.mesh(&record.mesh).ok_or_else(unknown)?;
        if !chain.verified_for(&serving, &mesh.name, now) {
            if let Err(reason) = serving.authority.verify_node_chain(mesh, chain.der(), now) {
                tracing::warn!(node = %name, mesh = %mesh.name, %reason, "a client certificate for a known node does not chain to its mesh's root; refused");
                return Err(ApiError::new(
                    ErrorCode::Unauthenticated,
                    format!(
                        "the client certificate for node `{name}` does not chain to the root of its mesh `{}` through one of that mesh's intermediates",
                        mesh.name
                    ),
                ));
            }
            chain.remember_verified(&serving, &mesh.name, now);
        }
        Ok(Caller {
            node: record.name,
            mesh: mesh.name.clone(),
            trust_domain: mesh.trust_domain.clone(),
        })
    }

    /// Issues a node SVID from the node's mesh intermediate (so it chains to the mesh's root:
    /// its own under limited trust).
    pub(crate) fn node_svid(
        &self,
        node: &str,
        mesh_name: &str,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<NodeSvidResponse, ApiError> {
        let checked = check_csr(csr)?;
        let serving = self.serving();
        let mesh = serving.config.mesh(mesh_name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::WrongMesh,
                format!("mesh `{mesh_name}` is not part of this virtual mesh"),
            )
        })?;
        let id = node_id(&mesh.trust_domain, node)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
        let ttl = serving.config.holder.node_svid_ttl;
        let issued = serving
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
                local: false,
            }])
            .map_err(|e| stored("recording an issuance", &e))?;
        tracing::info!(node, spiffe_id = %id, serial = %issued.serial, "node SVID issued");
        Ok(NodeSvidResponse {
            node: node.to_owned(),
            mesh: mesh_name.to_owned(),
            svid: Svid {
                spiffe_id: id,
                chain: vec![Der(issued.leaf), Der(issued.intermediate)],
            },
            bundles: serving.bundles_for(mesh_name),
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
        let serving = self.serving();
        let ids = |node: &str, mesh: &str| {
            serving
                .config
                .mesh(mesh)
                .and_then(|m| node_id(&m.trust_domain, node).ok())
                .map(|id| id.to_string())
                .unwrap_or_default()
        };
        let outcome = self
            .store
            .consume_token(&hash, unix(now), &ids)
            .map_err(|e| stored("consuming a token", &e))?;
        match outcome {
            TokenOutcome::Consumed { node, mesh } => {
                let banned = self
                    .store
                    .node(&node)
                    .map_err(|e| stored("reading a node", &e))?
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

    /// Registers (again) a node attested through Kubernetes as `node` of `cluster`: refused
    /// when it is banned, or when the name is a node of another cluster or mesh, or one that
    /// joined with a join token (a VM's name never passes to a Kubernetes node).
    pub fn register_kubernetes_node(
        &self,
        node: &str,
        cluster: &crate::k8s::Cluster,
        now: SystemTime,
    ) -> Result<(), ApiError> {
        let serving = self.serving();
        let mesh = serving.config.mesh(&cluster.mesh).ok_or_else(|| {
            ApiError::new(
                ErrorCode::WrongMesh,
                format!("mesh `{}` is not part of this virtual mesh", cluster.mesh),
            )
        })?;
        let id = node_id(&mesh.trust_domain, node)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
        let record = NodeRecord {
            name: node.to_owned(),
            mesh: cluster.mesh.clone(),
            spiffe_id: id.to_string(),
            first_seen: unix(now),
            banned: false,
            cluster: Some(cluster.name.clone()),
        };
        match self
            .store
            .attest_kubernetes_node(&record)
            .map_err(|e| stored("registering a node", &e))?
        {
            KubernetesNodeOutcome::Registered => Ok(()),
            KubernetesNodeOutcome::Banned => Err(ApiError::new(
                ErrorCode::NodeBanned,
                format!("node `{node}` is banned"),
            )),
            KubernetesNodeOutcome::Taken {
                cluster: other,
                mesh,
            } => Err(ApiError::new(
                ErrorCode::WrongMesh,
                format!(
                    "node name `{node}` belongs to a node of {} in mesh `{mesh}`",
                    other.map_or_else(|| "a join token".to_owned(), |c| format!("cluster `{c}`"))
                ),
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
        let serving = self.serving();
        let entries = serving
            .entries
            .for_node(&caller.node, &caller.mesh)
            .map_err(|e| entries_failed("listing entries", &e))?;
        let mesh = serving
            .config
            .mesh(&caller.mesh)
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownNode, "the node's mesh is gone"))?;
        Ok(SyncResponse {
            node: caller.node.clone(),
            mesh: caller.mesh.clone(),
            trust_domain: caller.trust_domain.clone(),
            enforcement: serving.config.effective_enforcement(mesh),
            entries,
            bundles: serving.bundles_for(&caller.mesh),
        })
    }

    /// Every bundle at the current version (the public `GET /v1/bundle`).
    pub fn bundles(&self) -> Bundles {
        self.serving().bundles()
    }

    /// `POST /v1/sign`: one result per CSR; every issuance is committed before the answer.
    ///
    /// Under limited trust a gateway entry's CSR yields a second SVID over the same key and ID,
    /// chained to the shared root. An agent-local entry (`local`) is decided by the mesh's
    /// effective enforcement (see [`crate::policy`]) and recorded as local.
    ///
    /// The caller awaits the commit ([`Store::submit_issuances`]): concurrent calls share one
    /// group commit without blocking a worker thread while it is under way.
    pub async fn sign(
        &self,
        caller: &Caller,
        req: &SignRequest,
        now: SystemTime,
    ) -> Result<SignResponse, ApiError> {
        let (response, records) = self.sign_unrecorded(caller, req, now)?;
        self.store
            .submit_issuances(records.clone())
            .await
            .map_err(|e| stored("recording issuances", &e))?;
        for r in &records {
            tracing::info!(node = %r.node, spiffe_id = %r.spiffe_id, serial = %r.serial, local = r.local, "SVID issued");
        }
        Ok(response)
    }

    /// Checks and signs every CSR of a batch: the answer, and the issuances to commit before
    /// it is sent.
    fn sign_unrecorded(
        &self,
        caller: &Caller,
        req: &SignRequest,
        now: SystemTime,
    ) -> Result<(SignResponse, Vec<Issuance>), ApiError> {
        if req.csrs.len() > MAX_BATCH {
            return Err(ApiError::new(
                ErrorCode::BatchTooLarge,
                format!("{} CSRs; at most {MAX_BATCH} per batch", req.csrs.len()),
            ));
        }
        let serving = self.serving();
        let enforcement = serving
            .config
            .mesh(&caller.mesh)
            .map(|m| serving.config.effective_enforcement(m))
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownNode, "the node's mesh is gone"))?;
        let mut results = Vec::with_capacity(req.csrs.len());
        let mut records = Vec::new();
        let prefixes = &serving.config.holder.local_entry_prefixes;
        for c in &req.csrs {
            let started = Instant::now();
            let (entry, registered) = serving.requested(c, enforcement)?;
            let rules = LocalRules {
                enforcement,
                prefixes,
                registered,
            };
            let outcome = match check_sign(
                caller,
                &c.entry_id,
                entry.as_ref(),
                c.local.as_ref(),
                &rules,
                &c.csr.0,
            ) {
                Err(error) => {
                    tracing::info!(node = %caller.node, entry_id = %c.entry_id, local = c.local.is_some(), code = %error.code, "CSR refused");
                    self.metrics.refused(error.code);
                    SignOutcome::Refused { error }
                }
                Ok(ok) => {
                    let outcome = self.issue(&serving, caller, &ok, now, &mut records)?;
                    self.metrics.signed(started.elapsed());
                    outcome
                }
            };
            results.push(SignResult {
                entry_id: c.entry_id.clone(),
                outcome,
            });
        }
        let response = SignResponse {
            results,
            bundles: serving.bundles_for(&caller.mesh),
        };
        Ok((response, records))
    }

    /// Signs an approved CSR (and, under limited trust, a gateway's second SVID over the same
    /// key), adding the issuances to `records`.
    fn issue(
        &self,
        serving: &Serving,
        caller: &Caller,
        ok: &crate::policy::Approved,
        now: SystemTime,
        records: &mut Vec<Issuance>,
    ) -> Result<SignOutcome, ApiError> {
        let max_ttl = serving.config.holder.svid_max_ttl;
        let a = &serving.authority;
        let (mesh, key, id) = (&caller.mesh, &ok.key, &ok.spiffe_id);
        let issued = a
            .sign_leaf(mesh, key, id, ok.ttl, max_ttl, now)
            .map_err(|e| internal("signing a leaf", &e))?;
        let gateway = if ok.gateway && serving.config.trust == TrustModel::Limited {
            let g = a
                .sign_gateway_leaf(mesh, key, id, ok.ttl, max_ttl, now)
                .map_err(|e| internal("signing a leaf", &e))?;
            Some(g)
        } else {
            None
        };
        for i in std::iter::once(&issued).chain(gateway.as_ref()) {
            records.push(Issuance {
                serial: i.serial.clone(),
                spiffe_id: id.to_string(),
                node: caller.node.clone(),
                not_after: unix(i.not_after),
                issued_at: unix(now),
                local: ok.local,
            });
        }
        let svid = |i: crate::authority::Issued| Svid {
            spiffe_id: id.clone(),
            chain: vec![Der(i.leaf), Der(i.intermediate)],
        };
        Ok(SignOutcome::Issued {
            svid: svid(issued),
            gateway_svid: gateway.map(svid),
        })
    }

    /// `POST /v1/report`: the node's identities, bundle version and applied enforcement.
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
            .map_err(|e| stored("storing a report", &e))
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
        if self.serving().config.mesh(mesh).is_none() {
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
            .map_err(|e| stored("storing a token", &e))?;
        tracing::info!(node, mesh, ttl = %humantime::format_duration(ttl), "join token created");
        Ok(token)
    }

    /// The status document.
    pub fn status(&self, now: SystemTime) -> Result<Status, ApiError> {
        let serving = self.serving();
        let last_error = |m: &Mutex<Option<String>>| {
            m.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        };
        StatusBuilder {
            config: &serving.config,
            authority: &serving.authority,
            bundle_version: serving.bundle_version,
            store: &*self.store,
            config_status: read(&self.config_status),
            listen_address: self.listen_address(),
            metrics_address: self.metrics_address(),
            renewal_error: last_error(&self.renewal_error),
            server_cert_error: last_error(&self.server_cert_error),
            server_cert: self.tls().map(|t| ServerCert {
                fingerprint: t.fingerprint,
                not_before: t.not_before,
                not_after: t.not_after,
            }),
        }
        .build(now)
        .map_err(|e| stored("reading the status", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::VIRTUAL_MESH as BASE;

    fn parse(text: &str, dir: &std::path::Path) -> Config {
        crate::config::parse(&text.replace("STATE", &dir.display().to_string())).expect("valid")
    }

    #[test]
    fn a_reload_applies_a_valid_file_and_keeps_serving_after_a_bad_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let holder = Holder::open(parse(BASE, dir.path()), now).expect("open");
        let v1 = holder.serving().bundle_version;

        // Invalid: INVALID with every problem, the old configuration serves.
        let outcome = holder.reload(Err(vec!["spec.meshes: nope".into()]), now);
        assert_eq!(outcome, ReloadOutcome::Invalid);
        let status = holder.status(now).expect("status");
        assert_eq!(status.config_status.state, State::Invalid);
        assert_eq!(status.config_status.messages[0], "spec.meshes: nope");
        assert_eq!(holder.serving().config.meshes.len(), 1);

        // Valid, with a restart-only change and a new mesh: applied, noted, version grows.
        let text = BASE
            .replace(
                "      trustDomain: mesh-a.test\n",
                "      trustDomain: mesh-a.test\n    - name: mesh-b\n      trustDomain: mesh-b.test\n",
            )
            .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:9999");
        let outcome = holder.reload(Ok(parse(&text, dir.path())), now);
        assert_eq!(
            outcome,
            ReloadOutcome::Applied {
                bundles_changed: true
            }
        );
        let serving = holder.serving();
        assert_eq!(serving.config.meshes.len(), 2);
        assert_eq!(serving.bundle_version, v1 + 1);
        assert_eq!(
            serving.config.holder.listen.to_string(),
            "127.0.0.1:0",
            "the running listener is kept"
        );
        let status = holder.status(now).expect("status");
        assert_eq!(status.config_status.state, State::Accepted);
        assert!(
            status.config_status.messages[0].starts_with("holder.listen: `127.0.0.1:9999`"),
            "{:?}",
            status.config_status.messages
        );
        // Without federation a node of mesh-a receives only its own trust domain.
        assert_eq!(serving.bundles_for("mesh-a").trust_domains.len(), 1);
        assert_eq!(serving.bundles().trust_domains.len(), 2);

        // The same file again: nothing changes in the bundles.
        let outcome = holder.reload(Ok(parse(&text, dir.path())), now);
        assert_eq!(
            outcome,
            ReloadOutcome::Applied {
                bundles_changed: false
            }
        );
    }
}
