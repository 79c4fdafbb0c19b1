//! Kubernetes node attestation end to end: the real holder reviews agents' service-account
//! tokens with a stand-in API server (HTTPS, Kubernetes' JSON) and names each node after the
//! Kubernetes node of the token's pod; the real agent joins with its projected token file.

use meshcert_protocol::api::{ApiError, ErrorCode, KubernetesAttestRequest, NodeSvidResponse};
use meshcert_tests::agent::Agent;
use meshcert_tests::ca::{CaHolder, HttpAnswer};
use meshcert_tests::kube::{FakeApiServer, ServiceAccountToken};
use meshcert_tests::pki::{csr, p256};

/// One mesh, cluster `east` attesting through `api`, an entry for each of two Kubernetes nodes.
fn holder_config(api: &FakeApiServer, extra_clusters: &str) -> String {
    format!(
        r#"apiVersion: networking.smh.solo.io/v1alpha1
kind: VirtualMesh
metadata:
  name: test-mesh
spec:
  meshes:
    - name: mesh-a
      trustDomain: mesh-a.test
      type: generic
  certificateAuthority:
    builtin:
      ttlDays: 30
      rsaKeySizeBytes: 2048
  enforceAccessControl: ENABLED
holder:
  serverNames: [localhost]
  kubernetes:
{cluster}{extra_clusters}entries:
  - id: web-1
    spiffeId: spiffe://mesh-a.test/web-1
    nodes: [east.worker-1]
    selectors: ["unix:uid:1000"]
    dir: web-1
  - id: web-2
    spiffeId: spiffe://mesh-a.test/web-2
    nodes: [east.worker-2]
    selectors: ["unix:uid:1000"]
    dir: web-2
"#,
        cluster = api.cluster_yaml("east", "mesh-a"),
    )
}

fn attest(ca: &CaHolder, cluster: &str, token: &str) -> HttpAnswer {
    let req = KubernetesAttestRequest {
        cluster: cluster.to_owned(),
        token: token.to_owned(),
        csr: csr(&p256(), &[]),
    };
    let body = serde_json::to_vec(&req).expect("serialise");
    ca.https("POST", "/v1/attest/kubernetes", Some(&body), None)
        .expect("attest call")
}

fn refused(a: &HttpAnswer, code: ErrorCode) -> String {
    let e: ApiError = serde_json::from_slice(&a.body).unwrap_or_else(|e| {
        panic!(
            "not an ApiError ({e}): {}",
            String::from_utf8_lossy(&a.body)
        )
    });
    assert_eq!(e.code, code, "{}", e.message);
    assert_eq!(a.status, code.http_status());
    e.message
}

/// An agent whose config says `kubernetes: {cluster: east}` and whose token file holds
/// `token`; no join token.
fn k8s_agent(ca: &CaHolder, claimed_node: &str, token: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    let extra = format!(
        "kubernetes:\n  cluster: east\n  tokenFile: {}\n",
        token_file.display()
    );
    let mut agent = Agent::spawn(ca, claimed_node, "mesh-a", &extra, None).expect("spawn");
    agent
        .wait_joined()
        .expect("joined with the service-account token");
    (agent, dir)
}

#[test]
fn two_kubernetes_nodes_attest_with_their_own_tokens_and_get_only_their_own_entries() {
    let api = FakeApiServer::start().expect("API server");
    api.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
    api.add_pod("meshcert", "agent-b", "uid-b", "worker-2");
    let ca = CaHolder::start(&holder_config(&api, "")).expect("holder");
    let token_a = api.issue_token(ServiceAccountToken::agent("agent-a", "uid-a"));
    let token_b = api.issue_token(ServiceAccountToken::agent("agent-b", "uid-b"));

    // The second agent claims the first one's node name: the holder does not listen.
    let (a, _token_a_dir) = k8s_agent(&ca, "worker-1", &token_a);
    let (b, _token_b_dir) = k8s_agent(&ca, "east.worker-1", &token_b);
    a.wait_for_file(&a.volume_dir().join("web-1/svid.pem"))
        .expect("node a gets web-1");
    b.wait_for_file(&b.volume_dir().join("web-2/svid.pem"))
        .expect("node b gets web-2");
    assert!(
        !a.volume_dir().join("web-2").exists(),
        "node a never gets web-2"
    );
    assert!(
        !b.volume_dir().join("web-1").exists(),
        "node b never gets web-1"
    );

    let nodes = ca.ctl(&["node", "list", "-o", "json"]).expect("node list");
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).expect("json");
    let mut seen: Vec<(String, String)> = nodes
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("").to_owned(),
                n["cluster"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("east.worker-1".to_owned(), "east".to_owned()),
            ("east.worker-2".to_owned(), "east".to_owned())
        ]
    );

    // No single use: the same pod attests again, with the same token and with a fresh one.
    for token in [
        token_a.clone(),
        api.issue_token(ServiceAccountToken::agent("agent-a", "uid-a")),
    ] {
        let answer = attest(&ca, "east", &token);
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let node: NodeSvidResponse = serde_json::from_slice(&answer.body).expect("node SVID");
        assert_eq!(node.node, "east.worker-1");
        assert_eq!(
            node.svid.spiffe_id.to_string(),
            "spiffe://mesh-a.test/meshcert/node/east.worker-1"
        );
    }
}

#[test]
fn kubernetes_attestations_are_refused_with_a_code_per_rule() {
    let api = FakeApiServer::start().expect("API server");
    api.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
    // A second cluster whose API server is down (nothing listens on its port).
    let down = format!(
        "    - cluster: west\n      mesh: mesh-a\n      apiServer: https://127.0.0.1:9\n      caFile: {}\n      tokenFile: {}\n      serviceAccounts: [\"meshcert:meshcert-agent\"]\n",
        api.ca_file().display(),
        api.holder_token_file().display()
    );
    let ca = CaHolder::start(&holder_config(&api, &down)).expect("holder");
    let agent = ServiceAccountToken::agent("agent-a", "uid-a");

    let wrong_audience = api.issue_token(ServiceAccountToken {
        audiences: vec!["https://kubernetes.default.svc".to_owned()],
        ..agent.clone()
    });
    let message = refused(
        &attest(&ca, "east", &wrong_audience),
        ErrorCode::WrongAudience,
    );
    assert!(message.contains("audience"), "{message}");

    let untrusted = api.issue_token(ServiceAccountToken {
        namespace: "default".to_owned(),
        service_account: "default".to_owned(),
        ..agent.clone()
    });
    let message = refused(
        &attest(&ca, "east", &untrusted),
        ErrorCode::UntrustedServiceAccount,
    );
    assert!(message.contains("default:default"), "{message}");

    let expired = api.issue_token(ServiceAccountToken {
        expired: true,
        ..agent.clone()
    });
    refused(&attest(&ca, "east", &expired), ErrorCode::TokenExpired);
    refused(&attest(&ca, "east", "not-a-token"), ErrorCode::InvalidToken);
    refused(
        &attest(&ca, "north", "not-a-token"),
        ErrorCode::UnknownCluster,
    );

    // The token's pod is gone, or was replaced by a pod of the same name.
    let gone = api.issue_token(ServiceAccountToken::agent("agent-z", "uid-z"));
    refused(&attest(&ca, "east", &gone), ErrorCode::PodNotFound);
    api.add_pod("meshcert", "agent-z", "uid-other", "worker-1");
    refused(&attest(&ca, "east", &gone), ErrorCode::PodNotFound);

    // The holder's side failing is retryable, and says which cluster.
    let message = refused(&attest(&ca, "west", "any"), ErrorCode::Unavailable);
    assert!(message.contains("west"), "{message}");

    // A banned node cannot come back with a fresh token.
    let good = api.issue_token(agent.clone());
    assert_eq!(attest(&ca, "east", &good).status, 200);
    ca.ctl(&["node", "ban", "east.worker-1"]).expect("ban");
    refused(&attest(&ca, "east", &good), ErrorCode::NodeBanned);
    assert!(
        api.reviews() >= 7,
        "every token was reviewed by the API server"
    );
}
