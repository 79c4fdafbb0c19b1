//! The admin socket: HTTP/JSON on a Unix socket (mode 0600) that only root or the holder's own
//! user may use (checked again per connection with `SO_PEERCRED`), and the client the CLI uses.
//!
//! Endpoints: `POST /v1/tokens` `{node, mesh, ttl?}` → `{token}`; `GET /v1/nodes`;
//! `POST /v1/nodes/<name>/ban`; `GET|POST /v1/entries`; `DELETE /v1/entries/<id>`;
//! `GET /v1/status`; `GET /v1/bundle[?mesh=NAME]` (PEM: the mesh's root, or the shared root);
//! `GET /v1/issuances`.
//! Errors are `ApiError` JSON, as on the HTTPS API.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshcert_protocol::Entry;
use meshcert_protocol::api::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::entries::EntryError;
use crate::holder::Holder;
use crate::server::{error_response, parse_json, read_body};
use crate::tokens::DEFAULT_TOKEN_TTL;

/// Why the admin socket or its client failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket cannot be created, or something else sits at its path.
    #[error("admin socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The holder cannot be reached.
    #[error(
        "cannot reach the holder at {path}: {source} (is `meshcert-ca run` running, and is this the right --admin-socket?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin request failed: {0}")]
    Http(String),
    /// The holder answered with an error.
    #[error("{0}")]
    Api(ApiError),
}

/// `POST /v1/tokens` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// Node name the token binds.
    pub node: String,
    /// Mesh the token binds.
    pub mesh: String,
    /// Lifetime (`10m` by default).
    #[serde(
        default,
        with = "meshcert_protocol::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}

/// `POST /v1/tokens` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The one-time join token.
    pub token: String,
}

/// Binds the admin socket: replaces a stale socket (never another kind of file), creates the
/// parent folder, and restricts the socket to mode 0600 before anything is accepted.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |reason: String| AdminError::Socket {
        path: path.to_owned(),
        reason,
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create its folder: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot restrict its mode: {e}")))?;
    Ok(listener)
}

/// Whether a peer uid may use the admin socket: root or the holder's own user.
pub fn uid_allowed(peer: u32, own: u32) -> bool {
    peer == 0 || peer == own
}

/// Admin connections of allowed peers served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 32;
/// Connections of refused peers answered (403) at once, apart from the allowed ones' slots.
const MAX_REFUSED: usize = 4;
/// Longest life of an allowed admin connection.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Longest life of a refused peer's connection (one 403 answer).
const REFUSED_LIFETIME: Duration = Duration::from_secs(2);

/// Serves the admin socket until `shutdown` resolves. A peer's credentials are checked first,
/// at accept: a peer that is neither root nor the holder's user is answered 403 from a small
/// pool of its own, so it can never take the slots operators need.
pub async fn serve(
    listener: UnixListener,
    holder: Arc<Holder>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let own_uid = nix::unistd::getuid().as_raw();
    let allowed_slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let refused_slots = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSED));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let peer = stream.peer_cred();
        let allowed = peer
            .as_ref()
            .is_ok_and(|cred| uid_allowed(cred.uid(), own_uid));
        let (slots, lifetime) = if allowed {
            (&allowed_slots, CONNECTION_LIFETIME)
        } else {
            (&refused_slots, REFUSED_LIFETIME)
        };
        let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
            tracing::debug!(
                allowed,
                "admin connection cap reached; closing a new connection"
            );
            continue;
        };
        // Logged once a slot is taken, so a refused peer cannot flood the log either.
        match &peer {
            Ok(cred) if !allowed => tracing::warn!(uid = cred.uid(), "admin connection refused"),
            Err(e) => tracing::warn!(error = %e, "admin peer credentials unavailable"),
            Ok(_) => {}
        }
        let holder = Arc::clone(&holder);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let holder = Arc::clone(&holder);
                async move { Ok::<_, Infallible>(answer(&holder, allowed, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(allowed);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(lifetime, conn).await.is_err() {
                tracing::debug!(
                    allowed,
                    "admin connection closed after its maximum lifetime"
                );
            }
        });
    }
}

/// The answer to one admin request: routed for an allowed peer, 403 for anyone else.
async fn answer(holder: &Holder, allowed: bool, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !allowed {
        let mut r = error_response(&ApiError::new(
            ErrorCode::Unauthenticated,
            "only root or the holder's user may use the admin socket",
        ));
        *r.status_mut() = StatusCode::FORBIDDEN;
        return r;
    }
    match route(holder, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn json<T: Serialize>(body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn entry_error(e: EntryError) -> ApiError {
    match e {
        EntryError::Invalid(_) | EntryError::Exists(_) | EntryError::Declared(_) => {
            ApiError::new(ErrorCode::BadRequest, e.to_string())
        }
        EntryError::NotFound(_) => ApiError::new(ErrorCode::NotFound, e.to_string()),
        EntryError::Store(s) => {
            tracing::error!(error = %s, "entry datastore failure");
            ApiError::new(ErrorCode::Internal, "the holder failed; see its log")
        }
    }
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "datastore failure");
    ApiError::new(ErrorCode::Internal, "the holder failed; see its log")
}

async fn route(holder: &Holder, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let now = SystemTime::now();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Ok(json(&holder.status(now)?)),
        (&Method::POST, ["v1", "tokens"]) => {
            let body: TokenRequest = parse_json(&read_body(req).await?)?;
            let token = holder.create_token(
                &body.node,
                &body.mesh,
                body.ttl.unwrap_or(DEFAULT_TOKEN_TTL),
                now,
            )?;
            Ok(json(&TokenResponse { token }))
        }
        (&Method::GET, ["v1", "nodes"]) => Ok(json(&holder.store.nodes().map_err(store_error)?)),
        (&Method::POST, ["v1", "nodes", name, "ban"]) => {
            if holder.store.ban_node(name).map_err(store_error)? {
                tracing::warn!(node = %name, "node banned");
                Ok(json(&serde_json::json!({})))
            } else {
                Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("no node `{name}`"),
                ))
            }
        }
        (&Method::GET, ["v1", "entries"]) => {
            Ok(json(&holder.serving().entries.all().map_err(entry_error)?))
        }
        (&Method::POST, ["v1", "entries"]) => {
            let entry: Entry = parse_json(&read_body(req).await?)?;
            if entry.hook.is_some() {
                tracing::warn!(entry_id = %entry.id, "entry with a hook refused");
                return Err(ApiError::new(
                    ErrorCode::HookNotAllowed,
                    crate::config::HOOK_NOT_ALLOWED,
                ));
            }
            holder
                .serving()
                .entries
                .create(&entry)
                .map_err(entry_error)?;
            tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, "entry created");
            Ok(json(&entry))
        }
        (&Method::DELETE, ["v1", "entries", id]) => {
            holder.serving().entries.delete(id).map_err(entry_error)?;
            tracing::info!(entry_id = %id, "entry deleted");
            Ok(json(&serde_json::json!({})))
        }
        (&Method::GET, ["v1", "issuances"]) => {
            Ok(json(&holder.store.issuances().map_err(store_error)?))
        }
        (&Method::GET, ["v1", "bundle"]) => {
            let mesh = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("mesh="))
                .map(str::to_owned);
            let serving = holder.serving();
            if let Some(m) = &mesh
                && serving.config.mesh(m).is_none()
            {
                return Err(ApiError::new(ErrorCode::NotFound, format!("no mesh `{m}`")));
            }
            // A mesh's bundle is its own root under limited trust, the shared root otherwise;
            // without a mesh, the shared root (what agents trust the holder with).
            let pem = match &mesh {
                Some(m) => serving.authority.trust_root(m).pem(),
                None => serving.authority.root().pem(),
            };
            let mut r = Response::new(Full::new(Bytes::from(pem)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/x-pem-file"),
            );
            Ok(r)
        }
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no admin endpoint {method} {path}"),
        )),
    }
}

/// The client the CLI uses: one request per connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the holder listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// Sends one request; returns the body of a 2xx answer, or the holder's `ApiError`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, AdminError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| AdminError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost");
        if has_body {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| AdminError::Http(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(AdminError::Api(
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| ApiError::new(ErrorCode::Internal, format!("HTTP {status}"))),
        ))
    }

    /// Sends a request and decodes a JSON answer.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, AdminError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let bytes = self.request(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| AdminError::Http(format!("bad answer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_the_holders_user() {
        assert!(uid_allowed(0, 1000));
        assert!(uid_allowed(1000, 1000));
        assert!(!uid_allowed(1001, 1000));
    }

    #[tokio::test]
    async fn bind_replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/admin.sock");
        let l = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(l);
        bind(&path).expect("a stale socket is replaced");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        let err = bind(&file).expect_err("a regular file is never replaced");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "x");
    }
}
