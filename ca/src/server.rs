//! The HTTPS API (hyper 1 over tokio-rustls, HTTP/2 when the client offers `h2` by ALPN,
//! HTTP/1.1 otherwise): the paths and bodies of `meshcert_protocol::api`.
//!
//! `POST /v1/attest`, `POST /v1/attest/kubernetes` and `GET /v1/bundle` need no client
//! certificate; every other path needs the
//! node SVID (verified by rustls against the root, then matched to a known, non-banned node).
//! Every failure is a JSON `ApiError` with its HTTP status; bodies are capped at
//! `MAX_BODY_BYTES`; handshakes, headers and bodies time out; at most `holder.maxConnections`
//! connections are served at once (more are closed at once), each for at most 10 minutes.
//! An agent keeps one HTTP/2 connection and makes every call a stream on it; such a connection
//! carries at most [`MAX_STREAMS`] streams at once, and is closed (GOAWAY) once it has had no
//! stream for [`IDLE_ANONYMOUS`] (no client certificate: the header timeout of HTTP/1) or
//! [`IDLE_NODE`] (a verified client certificate: above the agent's watch wait), and at the end
//! of its lifetime, its streams in flight (a watch, say) then finishing within [`DRAIN`].
//! There is no plaintext endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use meshcert_daemon::serve::{Connection, Http2Limits, Limits, Pools};
use meshcert_protocol::api::{
    self, ApiError, AttestRequest, ErrorCode, KubernetesAttestRequest, MAX_BODY_BYTES,
    RenewRequest, SignRequest,
};
use meshcert_protocol::{NodeReport, jwt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::FromDer as _;

use crate::caller::ClientChain;
use crate::holder::Holder;

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest life of one connection.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// Streams one HTTP/2 connection carries at once (an agent's watch, sync, report and its
/// signings in flight fit many times over).
pub const MAX_STREAMS: u32 = 32;
/// The largest header list of one HTTP/2 request.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How long an HTTP/2 connection without a client certificate may stay without a stream.
pub const IDLE_ANONYMOUS: Duration = HEADER_TIMEOUT;
/// How long a node's HTTP/2 connection (verified client certificate) may stay without a
/// stream: above the agent's watch wait and sync interval, so it is not closed between calls.
pub const IDLE_NODE: Duration = Duration::from_secs(90);
/// After the lifetime's GOAWAY, how long the streams in flight may take: the longest watch
/// ([`api::WATCH_MAX_WAIT_SECS`]) and a slow body.
pub const DRAIN: Duration = Duration::from_secs(api::WATCH_MAX_WAIT_SECS + 30);

/// Why the API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The server certificate cannot be made.
    #[error(transparent)]
    Authority(#[from] crate::authority::AuthorityError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The API's TLS configuration and the facts about its server certificate that status,
/// metrics and renewal need.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// What new connections use.
    pub config: Arc<rustls::ServerConfig>,
    /// The server certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    /// Its start of validity.
    pub not_before: SystemTime,
    /// Its end of validity.
    pub not_after: SystemTime,
}

impl ServerTls {
    /// Whether the server certificate is due for renewal at `now`: half of its life has passed
    /// (as for the intermediates), unless it already ends with the root that signs it (a new
    /// one could not live longer; the status warns about the root instead).
    pub fn renewal_due(&self, root_not_after: SystemTime, now: SystemTime) -> bool {
        server_cert_renewal_due(self.not_before, self.not_after, root_not_after, now)
    }
}

/// The rule of [`ServerTls::renewal_due`], pure.
pub fn server_cert_renewal_due(
    not_before: SystemTime,
    not_after: SystemTime,
    root_not_after: SystemTime,
    now: SystemTime,
) -> bool {
    crate::authority::renewal_due(not_before, not_after, now) && not_after < root_not_after
}

/// The rustls server configuration: a fresh server certificate signed by the shared root (the
/// one agents bootstrap with: `root.pem`, `Bundles.shared_root` under limited trust), client
/// certificates optional but, when present, verified against the shared root and every mesh
/// root (node SVIDs chain to their mesh's root; [`Holder::caller`] then checks each call's
/// chain against the claimed node's own mesh root).
pub fn tls_config(holder: &Holder, now: SystemTime) -> Result<ServerTls, ServerError> {
    let serving = holder.serving();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = |e: rustls::Error| ServerError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for der in serving.authority.client_roots() {
        roots.add(CertificateDer::from(der)).map_err(tls)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    let (cert, key) = serving
        .authority
        .server_identity(&serving.config.holder.server_names, now)?;
    // A borrow of the key's DER: the only copy stays in `key`, zeroised when it drops.
    let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key.serialized_der()),
    ))
    .map_err(tls)?;
    drop(key);
    let (_, parsed) = x509_parser::prelude::X509Certificate::from_der(&cert)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let at = |t: i64| std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let not_before = at(parsed.validity().not_before.timestamp());
    let not_after = at(parsed.validity().not_after.timestamp());
    let fingerprint = crate::authority::fingerprint(&cert);
    let certified = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(cert)], signing_key);
    certified.keys_match().map_err(tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    // HTTP/2 first: an agent multiplexes all its calls on one connection; curl and older
    // agents get HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless TLS 1.3 session tickets: an agent reconnecting (it drops a connection idle for
    // 5 s, and syncs every 30 s) resumes its session instead of a full handshake, so the holder
    // skips its signature and the client chain's verification. The resumed session keeps the
    // client chain it was verified with; every call still checks it against the node's mesh
    // root at the time of the call (`Holder::caller`). A fresh ticket key per configuration: a
    // session of an older configuration (other roots) is never resumed under this one.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(tls)?;
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        not_before,
        not_after,
    })
}

/// Serves the API on `listener` until `shutdown` resolves. Each connection uses the holder's
/// current TLS configuration ([`Holder::set_tls`], replaced on reload), `tls` until one is set.
/// Over the cap (`holder.maxConnections`) a connection is closed at once: the agent retries
/// with backoff.
pub async fn serve(
    listener: TcpListener,
    holder: Arc<Holder>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limits = Limits {
        max_connections: holder.serving().config.holder.max_connections,
        header_read_timeout: HEADER_TIMEOUT,
        lifetime: CONNECTION_LIFETIME,
        keep_alive: true,
    };
    let handle = move |connection: Connection<TcpStream, SocketAddr>| {
        let acceptor = TlsAcceptor::from(
            holder
                .tls()
                .map_or_else(|| Arc::clone(&tls), |t| Arc::clone(&t.config)),
        );
        serve_connection(Arc::clone(&holder), acceptor, connection)
    };
    let pools = Pools::single(limits);
    meshcert_daemon::serve::serve("api", listener, pools, |_| true, handle, shutdown).await;
}

/// One API connection: the TLS handshake, then HTTP/2 or HTTP/1 (as ALPN chose) with the
/// client's chain at hand.
async fn serve_connection(
    holder: Arc<Holder>,
    acceptor: TlsAcceptor,
    connection: Connection<TcpStream, SocketAddr>,
) {
    let peer = connection.peer;
    // Answers go out at once: with Nagle's algorithm, an answer written right after the session
    // tickets of a new connection waited for the client's delayed ACK (about 40 ms).
    let _ = connection.io.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(connection.io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // One per connection: its calls share what was found out about the chain (crate::caller).
    let client_chain: Option<Arc<ClientChain>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| Arc::new(ClientChain::new(c.iter().map(|d| d.to_vec()).collect())));
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let idle = if client_chain.is_some() {
        IDLE_NODE
    } else {
        IDLE_ANONYMOUS
    };
    let service = service_fn(move |req| {
        let holder = Arc::clone(&holder);
        let client_chain = client_chain.clone();
        async move { Ok::<_, Infallible>(handle(&holder, client_chain.as_deref(), req).await) }
    });
    if h2 {
        let h2 = Http2Limits {
            max_streams: MAX_STREAMS,
            max_header_list_size: MAX_HEADER_LIST,
            idle,
            drain: DRAIN,
        };
        connection.limits.serve_http2("api", tls, service, h2).await;
    } else {
        connection.limits.serve_http1("api", tls, service).await;
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The response for an API error.
pub fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, e)
}

/// Reads a body up to [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`].
pub async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            ErrorCode::BadRequest,
            "the body took too long",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::new(
            ErrorCode::BadRequest,
            "the body could not be read",
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Parses a JSON body.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

async fn handle(
    holder: &Holder,
    client_chain: Option<&ClientChain>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match route(holder, client_chain, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn route(
    holder: &Holder,
    client_chain: Option<&ClientChain>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let method = req.method().clone();
    let expected = match path.as_str() {
        api::PATH_ATTEST
        | api::PATH_ATTEST_KUBERNETES
        | api::PATH_RENEW
        | api::PATH_SIGN
        | api::PATH_REPORT => Method::POST,
        api::PATH_SYNC | api::PATH_BUNDLE | api::PATH_WATCH => Method::GET,
        jwt::PATH_JWT_SIGN => Method::POST,
        jwt::PATH_JWT_BUNDLES => Method::GET,
        _ => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no endpoint {path}"),
            ));
        }
    };
    if method != expected {
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{path} takes {expected}"),
        ));
    }
    let now = SystemTime::now();
    let ok = StatusCode::OK;
    match path.as_str() {
        api::PATH_BUNDLE => Ok(json(ok, &holder.bundles())),
        api::PATH_ATTEST => {
            let body: AttestRequest = parse_json(&read_body(req).await?)?;
            Ok(json(ok, &holder.attest(&body, now)?))
        }
        api::PATH_ATTEST_KUBERNETES => {
            let body: KubernetesAttestRequest = parse_json(&read_body(req).await?)?;
            // Boxed: a call to the Kubernetes API is a large future, and every connection's
            // request future is as large as its largest branch, idle long polls included.
            Ok(json(
                ok,
                &Box::pin(crate::k8s::attest(holder, &body, now)).await?,
            ))
        }
        _ => {
            let caller = holder.caller(client_chain, now)?;
            match path.as_str() {
                api::PATH_SYNC => Ok(json(ok, &holder.sync(&caller)?)),
                api::PATH_WATCH => Ok(json(ok, &crate::push::wait(holder, &query).await?)),
                api::PATH_RENEW => {
                    let body: RenewRequest = parse_json(&read_body(req).await?)?;
                    Ok(json(ok, &holder.renew(&caller, &body, now)?))
                }
                api::PATH_SIGN => {
                    let body: SignRequest = parse_json(&read_body(req).await?)?;
                    Ok(json(ok, &holder.sign(&caller, &body, now).await?))
                }
                jwt::PATH_JWT_SIGN => {
                    let body: jwt::JwtSignRequest = parse_json(&read_body(req).await?)?;
                    Ok(json(ok, &crate::jwt::sign(holder, &caller, &body, now)?))
                }
                jwt::PATH_JWT_BUNDLES => Ok(json(ok, &crate::jwt::bundles(holder, &caller, now)?)),
                _ => {
                    let body: NodeReport = parse_json(&read_body(req).await?)?;
                    holder.report(&caller, body, now)?;
                    Ok(json(ok, &serde_json::json!({})))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_certificate_renews_at_half_life_unless_it_ends_with_its_root() {
        let day = Duration::from_secs(86400);
        let t0 = std::time::UNIX_EPOCH + 20_000 * day;
        let end = t0 + 90 * day;
        let root = t0 + 365 * day;
        assert!(!server_cert_renewal_due(t0, end, root, t0 + 44 * day));
        assert!(server_cert_renewal_due(t0, end, root, t0 + 45 * day));
        assert!(server_cert_renewal_due(t0, end, root, t0 + 100 * day));
        // Already ending with the root: a new one could not live longer.
        assert!(!server_cert_renewal_due(t0, end, end, t0 + 60 * day));
    }
}
