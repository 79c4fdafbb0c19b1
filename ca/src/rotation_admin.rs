//! The root rotation's front ends: the admin socket's `/v1/root/...` endpoints and the
//! `meshcert-ca root` subcommands that call them ([`crate::rotation`] holds the logic).
//!
//! `POST /v1/root/rotate` `{certFile?, keyFile?}`, `POST /v1/root/abort`, `GET /v1/root/status`;
//! under limited trust a mesh's own root through `/v1/root/mesh/<mesh>/rotate|abort|status`.

use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;
use http::Method;
use meshcert_protocol::api::{ApiError, ErrorCode};

use crate::admin::{AdminError, Client};
use crate::holder::Holder;
use crate::rotation::{self, RotationStatus, Scope, Staged};

/// Answers `/v1/root/<rest>` on the admin socket; the work may generate an RSA key, so it runs
/// off the async workers' fast path.
pub fn route(
    holder: &Holder,
    method: &Method,
    rest: &[&str],
    body: &Bytes,
    now: SystemTime,
) -> Result<RotationStatus, ApiError> {
    let staged: Option<Staged> = if body.is_empty() {
        None
    } else {
        crate::server::parse_json(body)?
    };
    let (scope, rest) = match rest {
        ["mesh", m, rest @ ..] => {
            if holder.serving().config.mesh(m).is_none() {
                return Err(ApiError::new(ErrorCode::NotFound, format!("no mesh `{m}`")));
            }
            (Scope::Mesh((*m).to_owned()), rest)
        }
        _ => (Scope::Shared, rest),
    };
    let work = || {
        match (method, rest) {
            (&Method::GET, ["status"]) => rotation::status(holder, &scope, now),
            (&Method::POST, ["rotate"]) => {
                rotation::rotate(holder, &scope, staged.as_ref(), "operator", now)
                    .and_then(|()| rotation::status(holder, &scope, now))
            }
            (&Method::POST, ["abort"]) => rotation::abort(holder, &scope, now)
                .and_then(|()| rotation::status(holder, &scope, now)),
            _ => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("no admin endpoint {method} /v1/root/{}", rest.join("/")),
                ));
            }
        }
        .map_err(rotation::RotationError::into_api)
    };
    tokio::task::block_in_place(work)
}

/// `meshcert-ca root ...`.
#[derive(Debug, clap::Subcommand)]
pub enum RootCommand {
    /// Start a root rotation: the next root (generated, or the staged --cert/--key) joins every
    /// bundle; it signs once the fleet has acknowledged that bundle.
    Rotate {
        /// A staged root certificate (PEM) to rotate to, instead of a generated one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Rotate this mesh's own root (limited trust) instead of the shared root.
        #[arg(long)]
        mesh: Option<String>,
        /// The holder's admin socket.
        #[arg(long, env = "MESHCERT_CA_ADMIN_SOCKET", default_value = crate::config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Show the rotation's phase, counts and what blocks its next step.
    Status {
        /// Output format: `table` or `json`.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        /// Show this mesh's own root (limited trust) instead of the shared root.
        #[arg(long)]
        mesh: Option<String>,
        /// The holder's admin socket.
        #[arg(long, env = "MESHCERT_CA_ADMIN_SOCKET", default_value = crate::config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Abort the rotation under way (only while PREPARED): the next root leaves the bundles.
    Abort {
        /// Abort the rotation of this mesh's own root (limited trust).
        #[arg(long)]
        mesh: Option<String>,
        /// The holder's admin socket.
        #[arg(long, env = "MESHCERT_CA_ADMIN_SOCKET", default_value = crate::config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
}

impl RootCommand {
    /// Runs the subcommand; returns what to print on stdout.
    pub async fn run(self) -> Result<String, AdminError> {
        let (client, method, path, body, json) = match self {
            Self::Rotate {
                cert,
                key,
                mesh,
                admin_socket,
            } => {
                let staged = cert.zip(key).map(|(c, k)| Staged {
                    cert_file: absolute(c),
                    key_file: absolute(k),
                });
                let path = path(mesh.as_deref(), "rotate");
                (admin_socket, Method::POST, path, staged, false)
            }
            Self::Status {
                output,
                mesh,
                admin_socket,
            } => {
                let path = path(mesh.as_deref(), "status");
                (admin_socket, Method::GET, path, None, output == "json")
            }
            Self::Abort { mesh, admin_socket } => {
                let path = path(mesh.as_deref(), "abort");
                (admin_socket, Method::POST, path, None, false)
            }
        };
        let status: RotationStatus = Client::new(client)
            .json(method, &path, body.as_ref())
            .await?;
        Ok(if json {
            serde_json::to_string_pretty(&status).unwrap_or_default() + "\n"
        } else {
            rotation::render(&status)
        })
    }
}

/// `/v1/root/<action>`, or `/v1/root/mesh/<mesh>/<action>` (the mesh percent-encoded).
fn path(mesh: Option<&str>, action: &str) -> String {
    match mesh {
        None => format!("/v1/root/{action}"),
        Some(m) => {
            let m = percent_encoding::utf8_percent_encode(m, percent_encoding::NON_ALPHANUMERIC);
            format!("/v1/root/mesh/{m}/{action}")
        }
    }
}

/// The holder may run in another folder: paths are sent absolute.
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}
