//! meshcert-kube: the HTTPS JSON calls meshcert makes to Kubernetes, shared by the holder
//! (TokenReview and pod reads on an API server) and the agent (the kubelet's pod list).
//!
//! Bodies are Kubernetes' own types from `k8s-openapi` (re-exported as [`api`]), so what is
//! sent and read is exactly the JSON the API server and the kubelet speak.
//!
//! # Layout
//!
//! - [`Endpoint`]: where to call (an `https://host:port` URL), which CA to trust (or, for a
//!   kubelet with a self-signed certificate, explicitly none: [`ServerTrust`]), and the
//!   bearer token file, read again at every call (projected tokens are rotated by the kubelet).
//! - [`Client`]: one call is one connection (TCP, TLS, HTTP/1.1): these calls are rare
//!   (attestations, a cached pod list), so no pool is kept.
//! - [`KubeError`]: why a call failed, with [`KubeError::is_not_found`] for a missing object.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

/// Kubernetes' API types (one Kubernetes version for the whole workspace).
pub use k8s_openapi as api;

/// How long one call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read (a kubelet's pod list with its maximum of pods fits many times).
pub const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The URL is not `https://host[:port]`.
    #[error("`{url}` is not an https://host[:port] URL")]
    Url {
        /// The URL as configured.
        url: String,
    },
    /// The CA file cannot be read or holds no certificate.
    #[error("cannot read the CA certificates in {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The bearer token file cannot be read, or is empty.
    #[error("cannot read the bearer token in {path}: {reason}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No TCP connection.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (usually: the server's certificate is not signed by the CA).
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        /// `host:port`.
        address: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {address} failed: {reason}")]
    Http {
        /// `host:port`.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The call took longer than [`CALL_TIMEOUT`].
    #[error("{address} did not answer within {CALL_TIMEOUT:?}")]
    Timeout {
        /// `host:port`.
        address: String,
    },
    /// The server answered with an error status.
    #[error("{address} answered HTTP {status} to {path}: {message}")]
    Status {
        /// `host:port`.
        address: String,
        /// The path called.
        path: String,
        /// HTTP status.
        status: u16,
        /// The `message` of Kubernetes' `Status` answer, or the start of the body.
        message: String,
    },
    /// The answer is not the JSON expected.
    #[error("cannot read the answer of {address} to {path}: {reason}")]
    Decode {
        /// `host:port`.
        address: String,
        /// The path called.
        path: String,
        /// The parser's complaint.
        reason: String,
    },
}

impl KubeError {
    /// Whether the server said the object does not exist (HTTP 404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }

    /// Whether the server could not be reached or failed (worth trying again later).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Tls { .. } | Self::Http { .. } | Self::Timeout { .. } => {
                true
            }
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Where to call and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://host[:port]` (port 443 when absent).
    pub url: String,
    /// How the server's certificate is checked.
    pub trust: ServerTrust,
    /// File holding the bearer token sent with every call; read again at each call.
    pub token_file: Option<PathBuf>,
}

/// How a server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// It must chain to a certificate of this PEM file, and name the URL's host.
    CaFile(PathBuf),
    /// Not checked at all (its signature over the handshake still is): only for a kubelet
    /// whose serving certificate is self-signed, on an operator's explicit choice.
    SkipVerify,
}

/// An HTTPS JSON client for one endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    address: String,
    authority: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    token_file: Option<PathBuf>,
}

impl Client {
    /// Builds a client: parses the URL and reads the CA file now.
    pub fn new(endpoint: &Endpoint) -> Result<Self, KubeError> {
        let bad_url = || KubeError::Url {
            url: endpoint.url.clone(),
        };
        let uri: Uri = endpoint.url.parse().map_err(|_| bad_url())?;
        if uri.scheme_str() != Some("https") || !uri.path().trim_end_matches('/').is_empty() {
            return Err(bad_url());
        }
        let authority = uri.authority().ok_or_else(bad_url)?;
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(443);
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare_host.to_owned()).map_err(|_| bad_url())?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeError::Url {
                url: format!("{}: {e}", endpoint.url),
            })?;
        let tls = match &endpoint.trust {
            ServerTrust::CaFile(path) => builder
                .with_root_certificates(read_roots(path)?)
                .with_no_client_auth(),
            ServerTrust::SkipVerify => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(skip::SkipVerify(provider)))
                .with_no_client_auth(),
        };
        Ok(Self {
            address: format!("{host}:{port}"),
            authority: authority.to_string(),
            server_name,
            tls: Arc::new(tls),
            token_file: endpoint.token_file.clone(),
        })
    }

    /// `host:port` of the endpoint.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `GET path` → JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let body = serde_json::to_vec(body).map_err(|e| KubeError::Decode {
            address: self.address.clone(),
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, KubeError> {
        let token = self.token()?;
        let exchange = self.exchange(method, path, body, token);
        let (status, bytes) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| KubeError::Timeout {
                address: self.address.clone(),
            })??;
        if !(200..300).contains(&status) {
            return Err(KubeError::Status {
                address: self.address.clone(),
                path: path.to_owned(),
                status,
                message: status_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| KubeError::Decode {
            address: self.address.clone(),
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    fn token(&self) -> Result<Option<Zeroizing<String>>, KubeError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| KubeError::TokenFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let token = Zeroizing::new(text.trim().to_owned());
        if token.is_empty() {
            return Err(KubeError::TokenFile {
                path: path.clone(),
                reason: "the file is empty".to_owned(),
            });
        }
        Ok(Some(token))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<Zeroizing<String>>,
    ) -> Result<(u16, Bytes), KubeError> {
        let http_err = |e: &dyn std::fmt::Display| KubeError::Http {
            address: self.address.clone(),
            reason: e.to_string(),
        };
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|source| KubeError::Connect {
                address: self.address.clone(),
                source,
            })?;
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| KubeError::Tls {
                address: self.address.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_err(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection to a Kubernetes endpoint ended");
            }
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.as_str()));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_err(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_err(&e))?;
        let status = response.status().as_u16();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// The `message` of a Kubernetes `Status` body, or the start of the body as text.
fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<api::apimachinery::pkg::apis::meta::v1::Status>(body)
        .ok()
        .and_then(|s| s.message)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

mod skip {
    //! The verifier behind [`super::ServerTrust::SkipVerify`]: any certificate is accepted,
    //! handshake signatures are still verified.

    use std::sync::Arc;

    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Debug)]
    pub(super) struct SkipVerify(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for SkipVerify {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

/// Reads every certificate of a PEM file into a root store.
fn read_roots(path: &Path) -> Result<RootCertStore, KubeError> {
    let err = |reason: String| KubeError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let blocks = pem::parse_many(&text).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for block in blocks.iter().filter(|b| b.tag() == "CERTIFICATE") {
        roots
            .add(CertificateDer::from(block.contents().to_vec()))
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block".to_owned()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_file(dir: &Path) -> PathBuf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("cert");
        let path = dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).expect("write");
        path
    }

    #[test]
    fn endpoints_need_an_https_url_and_a_ca() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = ca_file(dir.path());
        let endpoint = |url: &str| Endpoint {
            url: url.to_owned(),
            trust: ServerTrust::CaFile(ca.clone()),
            token_file: None,
        };
        let c = Client::new(&endpoint("https://127.0.0.1:6443")).expect("valid");
        assert_eq!(c.address(), "127.0.0.1:6443");
        let c = Client::new(&endpoint("https://kubernetes.default.svc")).expect("valid");
        assert_eq!(c.address(), "kubernetes.default.svc:443");
        for bad in ["http://127.0.0.1:6443", "127.0.0.1:6443", "https://h/api"] {
            assert!(
                matches!(Client::new(&endpoint(bad)), Err(KubeError::Url { .. })),
                "{bad}"
            );
        }
        let missing = Endpoint {
            trust: ServerTrust::CaFile(dir.path().join("none.pem")),
            ..endpoint("https://127.0.0.1")
        };
        let skip = Endpoint {
            trust: ServerTrust::SkipVerify,
            ..endpoint("https://10.0.0.1:10250")
        };
        assert!(Client::new(&skip).is_ok());
        assert!(matches!(
            Client::new(&missing),
            Err(KubeError::CaFile { .. })
        ));
    }

    #[test]
    fn status_messages_come_from_kubernetes_status_bodies() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"x\" not found","reason":"NotFound","code":404}"#;
        assert_eq!(status_message(body), "pods \"x\" not found");
        assert_eq!(status_message(b"plain"), "plain");
    }
}
