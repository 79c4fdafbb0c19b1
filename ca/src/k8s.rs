//! Node attestation with Kubernetes projected service-account tokens (as SPIRE's `k8s_psat`).
//!
//! The agent sends its pod's projected token and the name of its cluster. The holder asks that
//! cluster's API server whether the token is valid for the configured audience (TokenReview,
//! `authentication.k8s.io/v1`), accepts only the service accounts it is told to trust, then
//! reads the token's pod (named by the review, never by the agent) and names the node after
//! the Kubernetes node that pod is scheduled on: `<cluster>.<node name>`. A Kubernetes node
//! may attest again at any time with a fresh token; join tokens stay for VMs.
//!
//! The checks of the review and of the pod are pure functions ([`judge_review`],
//! [`node_of_pod`]); [`attest`] does the calls.

use std::path::PathBuf;
use std::time::SystemTime;

use meshcert_kube::api::api::authentication::v1::{
    TokenReview, TokenReviewSpec, TokenReviewStatus,
};
use meshcert_kube::api::api::core::v1::Pod;
use meshcert_kube::{Client, Endpoint, KubeError, ServerTrust};
use meshcert_protocol::api::{
    ApiError, ErrorCode, KubernetesAttestRequest, NodeSvidResponse, valid_node_name,
};
use serde::Deserialize;

use crate::holder::Holder;

/// Default audience of the agents' projected tokens.
pub const DEFAULT_AUDIENCE: &str = "meshcert";

/// The TokenReview `extra` key naming the token's pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The TokenReview `extra` key carrying the token's pod UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// One cluster whose agents attest with service-account tokens (`holder.kubernetes[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The cluster's name, unique on this holder; node names are `<cluster>.<node>`.
    pub name: String,
    /// The mesh its nodes join.
    pub mesh: String,
    /// The API server (URL, CA file, and the holder's own bearer token file).
    pub api_server: Endpoint,
    /// The audience the agents' tokens must carry.
    pub audience: String,
    /// The trusted service accounts, `<namespace>:<name>`.
    pub service_accounts: Vec<String>,
}

/// `holder.kubernetes[]` as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawCluster {
    cluster: Option<String>,
    mesh: Option<String>,
    api_server: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    audience: Option<String>,
    service_accounts: Option<Vec<String>>,
}

/// Validates `holder.kubernetes`; problems are `(field path, message)`. Mesh names are checked
/// against `meshes`.
pub(crate) fn validate(
    raw: Vec<RawCluster>,
    meshes: &[String],
    problems: &mut Vec<(String, String)>,
) -> Vec<Cluster> {
    let mut clusters: Vec<Cluster> = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("holder.kubernetes[{i}].{field}");
        let mut need = |field: &str, v: Option<String>| {
            v.filter(|s| !s.is_empty()).unwrap_or_else(|| {
                problems.push((at(field), "is required".to_owned()));
                String::new()
            })
        };
        let name = need("cluster", c.cluster);
        let mesh = need("mesh", c.mesh);
        let url = need("apiServer", c.api_server);
        let ca_file = need("caFile", c.ca_file.map(|p| p.display().to_string()));
        let token_file = need("tokenFile", c.token_file.map(|p| p.display().to_string()));
        if !name.is_empty() && !is_dns_label(&name) {
            problems.push((
                at("cluster"),
                format!("`{name}` is not a DNS label (lowercase letters, digits, `-`)"),
            ));
        }
        if clusters.iter().any(|o| o.name == name) {
            problems.push((at("cluster"), format!("`{name}` is listed twice")));
        }
        if !mesh.is_empty() && !meshes.contains(&mesh) {
            problems.push((at("mesh"), format!("`{mesh}` is not one of spec.meshes")));
        }
        if !url.is_empty() && !url.starts_with("https://") {
            problems.push((at("apiServer"), format!("`{url}` is not an https:// URL")));
        }
        if c.audience.as_deref() == Some("") {
            problems.push((
                at("audience"),
                "is empty; leave it out for `meshcert`".to_owned(),
            ));
        }
        let service_accounts = c.service_accounts.unwrap_or_default();
        if service_accounts.is_empty() {
            problems.push((
                at("serviceAccounts"),
                "lists no service account (`<namespace>:<name>`) to trust".to_owned(),
            ));
        }
        for (j, sa) in service_accounts.iter().enumerate() {
            let ok = sa
                .split_once(':')
                .is_some_and(|(ns, n)| is_dns_label(ns) && !n.is_empty() && !n.contains(':'));
            if !ok {
                problems.push((
                    format!("{}[{j}]", at("serviceAccounts")),
                    format!("`{sa}` is not `<namespace>:<name>`"),
                ));
            }
        }
        clusters.push(Cluster {
            name,
            mesh,
            api_server: Endpoint {
                url,
                trust: ServerTrust::CaFile(PathBuf::from(ca_file)),
                token_file: Some(PathBuf::from(token_file)),
            },
            audience: c.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned()),
            service_accounts,
        });
    }
    clusters
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What a successful TokenReview says about the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod_name: String,
    /// That pod's UID.
    pub pod_uid: String,
}

/// The refusal of a token the API server did not authenticate. The API server says why only
/// in text: these are the phrases of its authenticators ("service account token has expired",
/// "token audiences ... is invalid for the target audiences ...").
fn not_authenticated(status: &TokenReviewStatus, cluster: &Cluster) -> ApiError {
    let reason = status.error.clone().unwrap_or_default();
    let lower = reason.to_ascii_lowercase();
    let code = if lower.contains("expired") {
        ErrorCode::TokenExpired
    } else if lower.contains("audience") {
        ErrorCode::WrongAudience
    } else {
        ErrorCode::InvalidToken
    };
    ApiError::new(
        code,
        format!(
            "cluster `{}` did not authenticate the service-account token: {}",
            cluster.name,
            if reason.is_empty() {
                "no reason given"
            } else {
                &reason
            }
        ),
    )
}

/// Judges a TokenReview answer: authenticated, for our audience, a trusted service account,
/// bound to a pod. Each refusal has its own code.
pub fn judge_review(
    status: Option<&TokenReviewStatus>,
    cluster: &Cluster,
) -> Result<Reviewed, ApiError> {
    let status = status.ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidToken,
            format!(
                "the TokenReview of cluster `{}` has no status",
                cluster.name
            ),
        )
    })?;
    if status.authenticated != Some(true) {
        return Err(not_authenticated(status, cluster));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.contains(&cluster.audience) {
        return Err(ApiError::new(
            ErrorCode::WrongAudience,
            format!(
                "the service-account token is not valid for the audience `{}` (it is for {audiences:?})",
                cluster.audience
            ),
        ));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    let Some((namespace, service_account)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(ApiError::new(
            ErrorCode::UntrustedServiceAccount,
            format!("`{username}` is not a service account"),
        ));
    };
    let qualified = format!("{namespace}:{service_account}");
    if !cluster.service_accounts.contains(&qualified) {
        return Err(ApiError::new(
            ErrorCode::UntrustedServiceAccount,
            format!(
                "service account `{qualified}` is not trusted for cluster `{}` (holder.kubernetes[].serviceAccounts)",
                cluster.name
            ),
        ));
    }
    let extra = |key: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(pod_name), Some(pod_uid)) = (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) else {
        return Err(ApiError::new(
            ErrorCode::InvalidToken,
            "the service-account token is not bound to a pod: mount a projected service-account token",
        ));
    };
    Ok(Reviewed {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod_name,
        pod_uid,
    })
}

/// The holder's node name for the token's pod: `<cluster>.<spec.nodeName>`. The pod must be
/// the one the token is bound to (same UID: a pod of the same name created again is another
/// pod) and be scheduled.
pub fn node_of_pod(pod: &Pod, reviewed: &Reviewed, cluster: &Cluster) -> Result<String, ApiError> {
    let who = format!("pod `{}/{}`", reviewed.namespace, reviewed.pod_name);
    if pod.metadata.uid.as_deref() != Some(reviewed.pod_uid.as_str()) {
        return Err(ApiError::new(
            ErrorCode::PodNotFound,
            format!("{who} is no longer the pod the token was issued to (its UID changed)"),
        ));
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::PodNotFound,
                format!("{who} is not scheduled on a node"),
            )
        })?;
    let name = format!("{}.{node}", cluster.name);
    if !valid_node_name(&name) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("Kubernetes node `{node}` does not make a usable node name"),
        ));
    }
    Ok(name)
}

/// The API server could not be asked: the holder's side (retry), logged as a WARN.
fn unavailable(cluster: &Cluster, what: &str, e: &KubeError) -> ApiError {
    tracing::warn!(cluster = %cluster.name, error = %e, "cannot {what}");
    ApiError::new(
        ErrorCode::Unavailable,
        format!(
            "the holder cannot {what} in cluster `{}` now; retry",
            cluster.name
        ),
    )
}

/// Asks the API server to review `token` for the cluster's audience.
async fn review(client: &Client, cluster: &Cluster, token: &str) -> Result<Reviewed, ApiError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![cluster.audience.clone()]),
        },
        ..TokenReview::default()
    };
    let answer: TokenReview = client
        .post("/apis/authentication.k8s.io/v1/tokenreviews", &request)
        .await
        .map_err(|e| unavailable(cluster, "review service-account tokens", &e))?;
    judge_review(answer.status.as_ref(), cluster)
}

/// Reads the token's pod and names its node.
async fn node(client: &Client, cluster: &Cluster, reviewed: &Reviewed) -> Result<String, ApiError> {
    let path = format!(
        "/api/v1/namespaces/{}/pods/{}",
        reviewed.namespace, reviewed.pod_name
    );
    let pod: Pod = match client.get(&path).await {
        Ok(pod) => pod,
        Err(e) if e.is_not_found() => {
            return Err(ApiError::new(
                ErrorCode::PodNotFound,
                format!(
                    "pod `{}/{}` of the service-account token does not exist",
                    reviewed.namespace, reviewed.pod_name
                ),
            ));
        }
        Err(e) => return Err(unavailable(cluster, "read pods", &e)),
    };
    node_of_pod(&pod, reviewed, cluster)
}

/// `POST /v1/attest/kubernetes`: reviews the token, finds its pod's node, registers the node
/// (again) and issues its node SVID.
pub async fn attest(
    holder: &Holder,
    req: &KubernetesAttestRequest,
    now: SystemTime,
) -> Result<NodeSvidResponse, ApiError> {
    crate::policy::check_csr(&req.csr.0)?;
    let cluster = holder
        .serving()
        .config
        .holder
        .kubernetes
        .iter()
        .find(|c| c.name == req.cluster)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownCluster,
                format!(
                    "cluster `{}` is not configured on this holder (holder.kubernetes)",
                    req.cluster
                ),
            )
        })?;
    let client = Client::new(&cluster.api_server)
        .map_err(|e| unavailable(&cluster, "reach the API server", &e))?;
    let reviewed = review(&client, &cluster, &req.token).await.inspect_err(|e| {
        tracing::info!(cluster = %cluster.name, code = %e.code, reason = %e.message, "Kubernetes attestation refused");
    })?;
    let node = node(&client, &cluster, &reviewed).await?;
    holder.register_kubernetes_node(&node, &cluster, now)?;
    tracing::info!(
        node,
        cluster = %cluster.name,
        mesh = %cluster.mesh,
        pod = %format!("{}/{}", reviewed.namespace, reviewed.pod_name),
        "node attested with a service-account token"
    );
    holder.node_svid(&node, &cluster.mesh, &req.csr.0, now)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshcert_kube::api::api::authentication::v1::UserInfo;
    use meshcert_kube::api::api::core::v1::PodSpec;
    use meshcert_kube::api::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn cluster() -> Cluster {
        Cluster {
            name: "east".into(),
            mesh: "mesh-a".into(),
            api_server: Endpoint {
                url: "https://127.0.0.1:6443".into(),
                trust: ServerTrust::CaFile("/ca.pem".into()),
                token_file: Some("/token".into()),
            },
            audience: "meshcert".into(),
            service_accounts: vec!["meshcert:meshcert-agent".into()],
        }
    }

    fn status(user: &str, audiences: &[&str], pod: Option<(&str, &str)>) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(EXTRA_POD_NAME.to_owned(), vec![name.to_owned()]);
            extra.insert(EXTRA_POD_UID.to_owned(), vec![uid.to_owned()]);
        }
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                extra: Some(extra),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    fn refused(s: TokenReviewStatus) -> ErrorCode {
        judge_review(Some(&s), &cluster())
            .expect_err("refused")
            .code
    }

    #[test]
    fn reviews_are_judged_with_a_code_per_rule() {
        let sa = "system:serviceaccount:meshcert:meshcert-agent";
        let ok = judge_review(
            Some(&status(sa, &["meshcert"], Some(("agent-x", "u1")))),
            &cluster(),
        )
        .expect("accepted");
        assert_eq!(ok.namespace, "meshcert");
        assert_eq!(ok.pod_name, "agent-x");
        assert_eq!(ok.pod_uid, "u1");

        let unauthenticated = |error: &str| TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error.to_owned()),
            ..TokenReviewStatus::default()
        };
        assert_eq!(
            refused(unauthenticated(
                "[invalid bearer token, service account token has expired]"
            )),
            ErrorCode::TokenExpired
        );
        assert_eq!(
            refused(unauthenticated(
                "[invalid bearer token, token audiences [\"api\"] is invalid for the target audiences [\"meshcert\"]]"
            )),
            ErrorCode::WrongAudience
        );
        assert_eq!(
            refused(unauthenticated("invalid bearer token")),
            ErrorCode::InvalidToken
        );
        assert_eq!(
            refused(TokenReviewStatus::default()),
            ErrorCode::InvalidToken
        );
        assert_eq!(
            refused(status(sa, &["api"], Some(("p", "u")))),
            ErrorCode::WrongAudience
        );
        assert_eq!(
            refused(status(
                "system:serviceaccount:default:default",
                &["meshcert"],
                Some(("p", "u"))
            )),
            ErrorCode::UntrustedServiceAccount
        );
        assert_eq!(
            refused(status("alice", &["meshcert"], Some(("p", "u")))),
            ErrorCode::UntrustedServiceAccount
        );
        assert_eq!(
            refused(status(sa, &["meshcert"], None)),
            ErrorCode::InvalidToken
        );
        assert_eq!(
            judge_review(None, &cluster()).expect_err("no status").code,
            ErrorCode::InvalidToken
        );
    }

    #[test]
    fn the_node_comes_from_the_pod_the_token_is_bound_to() {
        let reviewed = Reviewed {
            namespace: "meshcert".into(),
            service_account: "meshcert-agent".into(),
            pod_name: "agent-x".into(),
            pod_uid: "u1".into(),
        };
        let pod = |uid: &str, node: Option<&str>| Pod {
            metadata: ObjectMeta {
                uid: Some(uid.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        assert_eq!(
            node_of_pod(&pod("u1", Some("worker-1")), &reviewed, &cluster()).expect("node"),
            "east.worker-1"
        );
        let code = |p: Pod| {
            node_of_pod(&p, &reviewed, &cluster())
                .expect_err("refused")
                .code
        };
        assert_eq!(code(pod("u2", Some("worker-1"))), ErrorCode::PodNotFound);
        assert_eq!(code(pod("u1", None)), ErrorCode::PodNotFound);
        assert_eq!(code(pod("u1", Some("Bad/Name"))), ErrorCode::BadRequest);
    }

    #[test]
    fn the_shipped_holder_manifest_attests_the_shipped_agents() {
        use serde::Deserialize as _;
        let docs: Vec<serde_json::Value> =
            serde_norway::Deserializer::from_str(include_str!("../../deploy/kubernetes/ca.yaml"))
                .map(|d| serde_json::Value::deserialize(d).expect("a YAML document"))
                .collect();
        let text = docs
            .iter()
            .find_map(|d| d["data"]["virtualmesh.yaml"].as_str())
            .expect("the VirtualMesh ConfigMap");
        let config = crate::config::parse(text).unwrap_or_else(|e| panic!("{e:?}"));
        let cluster = &config.holder.kubernetes[0];
        assert_eq!(cluster.name, "cluster-a");
        assert_eq!(cluster.audience, "meshcert");
        assert_eq!(cluster.service_accounts, ["meshcert:meshcert-agent"]);
        let role = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRole")
            .expect("the holder's ClusterRole");
        assert_eq!(
            role["rules"],
            serde_json::json!([
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            ])
        );
    }

    #[test]
    fn cluster_settings_are_validated() {
        let raw: Vec<RawCluster> = serde_norway::from_str(
            "- cluster: east\n  mesh: mesh-a\n  apiServer: https://10.0.0.1:6443\n  caFile: /ca.pem\n  tokenFile: /t\n  serviceAccounts: [meshcert:meshcert-agent]\n\
             - cluster: East\n  mesh: nope\n  apiServer: http://x\n  caFile: /ca.pem\n  tokenFile: /t\n  audience: ''\n  serviceAccounts: [agent]\n",
        )
        .expect("yaml");
        let mut problems = Vec::new();
        let clusters = validate(raw, &["mesh-a".to_owned()], &mut problems);
        assert_eq!(clusters[0].audience, "meshcert");
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "holder.kubernetes[1].cluster",
                "holder.kubernetes[1].mesh",
                "holder.kubernetes[1].apiServer",
                "holder.kubernetes[1].audience",
                "holder.kubernetes[1].serviceAccounts[0]",
            ]
        );
    }
}
