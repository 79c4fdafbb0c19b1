//! The admin socket's client, the one behind the `meshcert-ca` subcommands: one typed method
//! per endpoint, each path segment and query value percent-encoded (an entry id or a node name
//! may hold `/`, `?`, `%` or spaces). A new endpoint is a new method here.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use meshcert_protocol::Entry;
use meshcert_protocol::api::{ApiError, ErrorCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use tokio::net::UnixStream;

use super::{AdminError, TokenRequest, TokenResponse};
use crate::status::Status;
use crate::store::{Issuance, NodeRecord};

/// What stays unescaped in a path segment or query value: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `/v1/` followed by `segments`, each percent-encoded.
fn path(segments: &[&str]) -> String {
    let mut path = String::from("/v1");
    for segment in segments {
        path.push('/');
        path.extend(utf8_percent_encode(segment, SEGMENT));
    }
    path
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

    /// `POST /v1/tokens`: a one-time join token.
    pub async fn create_token(&self, request: &TokenRequest) -> Result<TokenResponse, AdminError> {
        self.json(Method::POST, &path(&["tokens"]), Some(request))
            .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, AdminError> {
        self.json(Method::GET, &path(&["nodes"]), None::<&()>).await
    }

    /// `POST /v1/nodes/<name>/ban`.
    pub async fn ban_node(&self, name: &str) -> Result<(), AdminError> {
        let url = path(&["nodes", name, "ban"]);
        self.request(Method::POST, &url, Some(Vec::new())).await?;
        Ok(())
    }

    /// `GET /v1/entries`.
    pub async fn entries(&self) -> Result<Vec<Entry>, AdminError> {
        self.json(Method::GET, &path(&["entries"]), None::<&()>)
            .await
    }

    /// `POST /v1/entries`: the entry as created.
    pub async fn create_entry(&self, entry: &Entry) -> Result<Entry, AdminError> {
        self.json(Method::POST, &path(&["entries"]), Some(entry))
            .await
    }

    /// `DELETE /v1/entries/<id>`.
    pub async fn delete_entry(&self, id: &str) -> Result<(), AdminError> {
        let url = path(&["entries", id]);
        self.request(Method::DELETE, &url, None).await?;
        Ok(())
    }

    /// `GET /v1/bundle[?mesh=NAME]`: PEM.
    pub async fn bundle(&self, mesh: Option<&str>) -> Result<Bytes, AdminError> {
        let mut url = path(&["bundle"]);
        if let Some(mesh) = mesh {
            url.push_str("?mesh=");
            url.extend(utf8_percent_encode(mesh, SEGMENT));
        }
        self.request(Method::GET, &url, None).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, AdminError> {
        self.json(Method::GET, &path(&["status"]), None::<&()>)
            .await
    }

    /// `GET /v1/issuances`.
    pub async fn issuances(&self) -> Result<Vec<Issuance>, AdminError> {
        self.json(Method::GET, &path(&["issuances"]), None::<&()>)
            .await
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
    fn path_segments_are_escaped() {
        assert_eq!(path(&["entries", "web"]), "/v1/entries/web");
        assert_eq!(
            path(&["entries", "a/b?c%d e"]),
            "/v1/entries/a%2Fb%3Fc%25d%20e"
        );
        assert_eq!(
            path(&["nodes", "n-1.a_b~", "ban"]),
            "/v1/nodes/n-1.a_b~/ban"
        );
    }

    use crate::testing::VIRTUAL_MESH as CONFIG;

    /// A holder serving its admin socket in a temporary folder, and a client of it.
    fn admin() -> (tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = CONFIG.replace("STATE", &dir.path().join("state").display().to_string());
        let config = crate::config::parse(&text).expect("valid config");
        let holder = std::sync::Arc::new(
            crate::holder::Holder::open(config, std::time::SystemTime::now()).expect("open"),
        );
        let socket = dir.path().join("admin.sock");
        let listener = super::super::bind(&socket).expect("bind");
        tokio::spawn(super::super::serve(
            listener,
            holder,
            std::future::pending(),
        ));
        (dir, Client::new(socket))
    }

    #[tokio::test]
    async fn ids_and_names_with_reserved_characters_reach_their_route() {
        let (_dir, client) = admin();
        let id = "a?c%d#e";
        let entry = Entry {
            id: id.to_owned(),
            spiffe_id: meshcert_protocol::SpiffeId::new_leaf("spiffe://mesh-a.test/odd")
                .expect("id"),
            nodes: Vec::new(),
            mesh: Some("mesh-a".to_owned()),
            selectors: Vec::new(),
            ttl: std::time::Duration::from_secs(3600),
            dir: "odd".to_owned(),
            owner: None,
            hook: None,
            gateway: false,
        };
        assert_eq!(client.create_entry(&entry).await.expect("create").id, id);
        let ids = |entries: Vec<Entry>| entries.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(client.entries().await.expect("list")), [id]);
        client
            .delete_entry(id)
            .await
            .expect("delete by the same id");
        assert!(client.entries().await.expect("list").is_empty());
        let missing = client
            .ban_node("no/such node?")
            .await
            .expect_err("no such node");
        assert!(
            missing.to_string().contains("no node `no/such node?`"),
            "{missing}"
        );
        let pem = client.bundle(Some("mesh-a")).await.expect("bundle");
        assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn escaped_segments_round_trip_through_the_server_decoding() {
        let id = "a/b?c%d e";
        let url = path(&["entries", id]);
        let decoded = super::super::segments(&url).expect("decoded");
        assert_eq!(decoded, ["v1", "entries", id]);
    }
}
