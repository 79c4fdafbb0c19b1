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
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use meshcert_daemon::serve::{Connection, Limits, Pools};
use meshcert_protocol::Entry;
use meshcert_protocol::api::{ApiError, ErrorCode};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::entries::EntryError;
use crate::holder::Holder;
use crate::server::{error_response, parse_json, read_body};
use crate::tokens::DEFAULT_TOKEN_TTL;

mod client;
pub use client::Client;

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
/// How long a request's headers may take.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The pool of root and the holder's user.
const ALLOWED: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    header_read_timeout: HEADER_TIMEOUT,
    lifetime: CONNECTION_LIFETIME,
    keep_alive: true,
};
/// The pool of refused peers, answered 403 once.
const REFUSED: Limits = Limits {
    max_connections: MAX_REFUSED,
    header_read_timeout: HEADER_TIMEOUT,
    lifetime: REFUSED_LIFETIME,
    keep_alive: false,
};

/// Serves the admin socket until `shutdown` resolves. A peer's credentials are checked first,
/// at accept: a peer that is neither root nor the holder's user is answered 403 from a small
/// pool of its own, so it can never take the slots operators need.
pub async fn serve(
    listener: UnixListener,
    holder: Arc<Holder>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let own_uid = nix::unistd::getuid().as_raw();
    let check = move |stream: &UnixStream| {
        stream
            .peer_cred()
            .is_ok_and(|cred| uid_allowed(cred.uid(), own_uid))
    };
    let handle = move |connection: Connection<UnixStream, _>| {
        let holder = Arc::clone(&holder);
        async move {
            let allowed = connection.allowed;
            // Logged once a slot is taken, so a refused peer cannot flood the log either.
            match connection.io.peer_cred() {
                Ok(cred) if !allowed => {
                    tracing::warn!(uid = cred.uid(), "admin connection refused")
                }
                Err(e) => tracing::warn!(error = %e, "admin peer credentials unavailable"),
                Ok(_) => {}
            }
            let service = service_fn(move |req| {
                let holder = Arc::clone(&holder);
                async move { Ok::<_, Infallible>(answer(&holder, allowed, req).await) }
            });
            connection
                .limits
                .serve_http1("admin", connection.io, service)
                .await;
        }
    };
    let pools = Pools {
        allowed: ALLOWED,
        refused: Some(REFUSED),
    };
    meshcert_daemon::serve::serve("admin", listener, pools, check, handle, shutdown).await;
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
        EntryError::Reserved(_) => ApiError::new(ErrorCode::ReservedId, e.to_string()),
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

/// Routes one request of an allowed peer: one line per endpoint. Path segments are
/// percent-decoded (entry ids and node names may hold `/`, `?`, `%` or spaces).
async fn route(holder: &Holder, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mesh = req.uri().query().and_then(|q| query_value(q, "mesh"));
    let now = SystemTime::now();
    let decoded = segments(&path)?;
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Ok(json(&holder.status(now)?)),
        (_, ["v1", "root", rest @ ..]) => Ok(json(&crate::rotation_admin::route(
            holder,
            &method,
            rest,
            &read_body(req).await?,
            now,
        )?)),
        (&Method::POST, ["v1", "tokens"]) => create_token(holder, req, now).await,
        (&Method::GET, ["v1", "nodes"]) => Ok(json(&holder.store.nodes().map_err(store_error)?)),
        (&Method::POST, ["v1", "nodes", name, "ban"]) => ban_node(holder, name),
        (&Method::GET, ["v1", "entries"]) => entries(holder),
        (&Method::POST, ["v1", "entries"]) => create_entry(holder, req).await,
        (&Method::DELETE, ["v1", "entries", id]) => delete_entry(holder, id),
        (&Method::GET, ["v1", "issuances"]) => {
            Ok(json(&holder.store.issuances().map_err(store_error)?))
        }
        (&Method::GET, ["v1", "bundle"]) => bundle(holder, mesh.as_deref()),
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no admin endpoint {method} {path}"),
        )),
    }
}

/// The percent-decoded segments of `path`.
fn segments(path: &str) -> Result<Vec<String>, ApiError> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|d| d.into_owned())
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "a path segment is not UTF-8"))
        })
        .collect()
}

/// The decoded value of `name` in a query string.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

async fn create_token(
    holder: &Holder,
    req: Request<Incoming>,
    now: SystemTime,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body: TokenRequest = parse_json(&read_body(req).await?)?;
    let token = holder.create_token(
        &body.node,
        &body.mesh,
        body.ttl.unwrap_or(DEFAULT_TOKEN_TTL),
        now,
    )?;
    Ok(json(&TokenResponse { token }))
}

fn ban_node(holder: &Holder, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
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

fn entries(holder: &Holder) -> Result<Response<Full<Bytes>>, ApiError> {
    Ok(json(&holder.serving().entries.all().map_err(entry_error)?))
}

async fn create_entry(
    holder: &Holder,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
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

fn delete_entry(holder: &Holder, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    holder.serving().entries.delete(id).map_err(entry_error)?;
    tracing::info!(entry_id = %id, "entry deleted");
    Ok(json(&serde_json::json!({})))
}

/// A mesh's bundle is its own root under limited trust, the shared root otherwise; without a
/// mesh, the shared root (what agents trust the holder with).
fn bundle(holder: &Holder, mesh: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
    let serving = holder.serving();
    if let Some(m) = mesh
        && serving.config.mesh(m).is_none()
    {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no mesh `{m}`")));
    }
    let pem = match mesh {
        Some(m) => serving.authority.trust_root(m).pem(),
        None => serving.authority.root().pem(),
    };
    // During a root rotation both roots are trusted: the one that signs the API's server
    // certificate first.
    let pem = crate::rotation::bundle_pem(&serving, mesh).unwrap_or(pem);
    let mut r = Response::new(Full::new(Bytes::from(pem)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-pem-file"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_and_query_values_are_percent_decoded() {
        let decoded = segments("/v1/entries/a%2Fb%3Fc%25d%20e").expect("decoded");
        assert_eq!(decoded, ["v1", "entries", "a/b?c%d e"]);
        assert!(segments("/v1/entries/%FF").is_err());
        assert_eq!(
            query_value("x=1&mesh=a%26b", "mesh").as_deref(),
            Some("a&b")
        );
        assert_eq!(query_value("x=1", "mesh"), None);
    }

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
