//! On Kubernetes: the agent joins with its pod's projected service-account token instead of a
//! join token. The token file is read again at every attestation (the kubelet replaces it
//! before it expires), so a node can attest again whenever it needs to: after its node SVID
//! expired while the agent was down, or on a new pod. The holder checks the token with the
//! cluster's TokenReview API and names the node after the Kubernetes node the pod runs on;
//! what the agent's config calls the node does not count.

use std::path::PathBuf;

use meshcert_protocol::api::{ErrorCode, KubernetesAttestRequest, SyncResponse};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::issuer::{Issuer, IssuerError};
use crate::node::JoinError;
use crate::node::{self, NodeIdentity};

/// Where the DaemonSet mounts the projected token by default.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/meshcert/token";

/// `kubernetes:` as written in the agent's config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesFile {
    /// The cluster's name, as the holder's `holder.kubernetes[].cluster` says.
    pub cluster: Option<String>,
    /// The projected service-account token file.
    pub token_file: Option<PathBuf>,
    /// Pod attestation of Workload API callers through the kubelet; off when absent.
    pub kubelet: Option<crate::kubelet::KubeletFile>,
}

/// Kubernetes settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    /// The cluster's name.
    pub cluster: String,
    /// The projected service-account token file, read at every attestation.
    pub token_file: PathBuf,
    /// Pod attestation through the kubelet, when configured.
    pub kubelet: Option<crate::kubelet::KubeletSettings>,
}

impl Kubernetes {
    /// Validates `kubernetes:`; problems are added to `problems`.
    pub fn resolve(file: KubernetesFile, problems: &mut Vec<String>) -> Self {
        let cluster = file.cluster.unwrap_or_default();
        let label = !cluster.is_empty()
            && cluster.len() <= 63
            && cluster
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !label {
            problems.push(format!(
                "kubernetes.cluster `{cluster}` must be the cluster's name as the holder knows it (a DNS label)"
            ));
        }
        Self {
            cluster,
            token_file: file
                .token_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE)),
            kubelet: file.kubelet.map(|k| {
                let url = std::env::var(crate::kubelet::URL_ENV).ok();
                crate::kubelet::KubeletSettings::resolve(k, url, problems)
            }),
        }
    }
}

/// Why a Kubernetes join failed.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The token file cannot be read or is empty (the kubelet may not have written it yet).
    #[error("cannot read the service-account token {path}: {reason}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Key, CSR, holder call or storing the identity failed.
    #[error(transparent)]
    Join(#[from] JoinError),
}

impl K8sError {
    /// Whether trying again later may succeed without a change of configuration: the holder
    /// was unreachable, the token file is not there yet, or the token had expired (the kubelet
    /// writes a fresh one).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::TokenFile { .. } => true,
            Self::Join(JoinError::Issuer(IssuerError::Api(e))) => {
                e.code.is_retryable() || e.code == ErrorCode::TokenExpired
            }
            Self::Join(JoinError::Issuer(e)) => e.is_retryable(),
            Self::Join(_) => false,
        }
    }

    /// Whether the holder as a whole could not serve (probed, not backed off).
    pub fn is_holder_down(&self) -> bool {
        matches!(self, Self::Join(JoinError::Issuer(e)) if e.is_holder_down())
    }
}

/// Reads the token file, trimmed.
fn read_token(path: &std::path::Path) -> Result<Zeroizing<String>, K8sError> {
    let err = |reason: String| K8sError::TokenFile {
        path: path.to_owned(),
        reason,
    };
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let token = Zeroizing::new(text.trim().to_owned());
    if token.is_empty() {
        return Err(err("the file is empty".to_owned()));
    }
    Ok(token)
}

/// Joins with the service-account token: a fresh node key, the token read now, and the node
/// identity stored in the state folder. Returns the identity and a first sync seed.
pub async fn join<I: Issuer>(
    issuer: &I,
    config: &Config,
    kubernetes: &Kubernetes,
) -> Result<(NodeIdentity, SyncResponse), K8sError> {
    let token = read_token(&kubernetes.token_file)?;
    let key = crate::rotation::signing::generate_key(config.key_algorithm)
        .await
        .map_err(JoinError::from)?;
    let request = KubernetesAttestRequest {
        cluster: kubernetes.cluster.clone(),
        token: token.as_str().to_owned(),
        csr: crate::csr::build(&key, None)
            .map_err(JoinError::from)?
            .into(),
    };
    let response = issuer
        .attest_kubernetes(request)
        .await
        .map_err(JoinError::from)?;
    let identity = NodeIdentity::new(
        key,
        response.svid.chain.iter().map(|c| c.0.clone()).collect(),
    )
    .map_err(JoinError::from)?;
    node::store(&config.state_dir, &identity).map_err(JoinError::from)?;
    tracing::info!(node = %response.node, mesh = %response.mesh, cluster = %kubernetes.cluster, "attested with the pod's service-account token");
    let seed = SyncResponse {
        node: response.node,
        mesh: response.mesh,
        trust_domain: identity.info.spiffe_id.trust_domain().clone(),
        enforcement: meshcert_protocol::Enforcement::MeshDefault,
        entries: Vec::new(),
        bundles: response.bundles,
    };
    Ok((identity, seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_need_a_cluster_and_default_the_token_file() {
        let mut problems = Vec::new();
        let k = Kubernetes::resolve(
            KubernetesFile {
                cluster: Some("east".into()),
                ..KubernetesFile::default()
            },
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(k.token_file, PathBuf::from(DEFAULT_TOKEN_FILE));
        Kubernetes::resolve(KubernetesFile::default(), &mut problems);
        Kubernetes::resolve(
            KubernetesFile {
                cluster: Some("East.1".into()),
                ..KubernetesFile::default()
            },
            &mut problems,
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn the_token_is_read_trimmed_and_an_empty_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("token");
        std::fs::write(&path, "eyJhbGciOi.x.y\n").expect("write");
        assert_eq!(read_token(&path).expect("read").as_str(), "eyJhbGciOi.x.y");
        std::fs::write(&path, "\n").expect("write");
        let e = read_token(&path).expect_err("empty");
        assert!(e.is_retryable());
        assert!(read_token(&dir.path().join("none")).is_err());
    }
}
