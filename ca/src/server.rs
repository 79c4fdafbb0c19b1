//! The HTTPS API (hyper 1 over tokio-rustls, HTTP/1.1): the paths and bodies of
//! `meshcert_protocol::api`.
//!
//! `POST /v1/attest` and `GET /v1/bundle` need no client certificate; every other path needs the
//! node SVID (verified by rustls against the root, then matched to a known, non-banned node).
//! Every failure is a JSON `ApiError` with its HTTP status; bodies are capped at
//! `MAX_BODY_BYTES`; handshakes, headers and bodies time out. There is no plaintext endpoint.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshcert_protocol::api::{
    self, ApiError, AttestRequest, ErrorCode, MAX_BODY_BYTES, RenewRequest, SignRequest,
};
use meshcert_protocol::{NodeReport, jwt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::holder::Holder;

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest life of one connection.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

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

/// The rustls server configuration: a fresh server certificate signed by the shared root (the
/// one agents bootstrap with: `root.pem`, `Bundles.shared_root` under limited trust), client
/// certificates optional but, when present, verified against the shared root and every mesh
/// root (node SVIDs chain to their mesh's root).
pub fn tls_config(
    holder: &Holder,
    now: SystemTime,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let serving = holder.serving();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in serving.authority.client_roots() {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    let (cert, key) = serving
        .authority
        .server_identity(&serving.config.holder.server_names, now)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the API on `listener` until `shutdown` resolves. Each connection uses the holder's
/// current TLS configuration ([`Holder::set_tls`], replaced on reload), `tls` until one is set.
pub async fn serve(
    listener: TcpListener,
    holder: Arc<Holder>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = TlsAcceptor::from(holder.tls().unwrap_or_else(|| Arc::clone(&tls)));
        let holder = Arc::clone(&holder);
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let client_cert: Option<Arc<Vec<u8>>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec()));
            let service = service_fn(move |req| {
                let holder = Arc::clone(&holder);
                let client_cert = client_cert.clone();
                async move { Ok::<_, Infallible>(handle(&holder, client_cert.as_deref(), req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
                Err(_) => tracing::debug!(%peer, "connection closed after its maximum lifetime"),
                Ok(Ok(())) => {}
            }
        });
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
    client_cert: Option<&Vec<u8>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match route(holder, client_cert.map(Vec::as_slice), req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

async fn route(
    holder: &Holder,
    client_cert: Option<&[u8]>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let expected = match path.as_str() {
        api::PATH_ATTEST | api::PATH_RENEW | api::PATH_SIGN | api::PATH_REPORT => Method::POST,
        api::PATH_SYNC | api::PATH_BUNDLE => Method::GET,
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
        _ => {
            let caller = holder.caller(client_cert)?;
            match path.as_str() {
                api::PATH_SYNC => Ok(json(ok, &holder.sync(&caller)?)),
                api::PATH_RENEW => {
                    let body: RenewRequest = parse_json(&read_body(req).await?)?;
                    Ok(json(ok, &holder.renew(&caller, &body, now)?))
                }
                api::PATH_SIGN => {
                    let body: SignRequest = parse_json(&read_body(req).await?)?;
                    Ok(json(ok, &holder.sign(&caller, &body, now)?))
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
