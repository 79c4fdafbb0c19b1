//! Kubernetes end to end: the real holder reviews agents' service-account tokens with a
//! stand-in API server (HTTPS, Kubernetes' JSON) and names each node after the Kubernetes node
//! of the token's pod; the real agent joins with its projected token file, and attests
//! Workload API callers by pod: real cgroup v2 folders shaped like the kubelet's (as root), the
//! stand-in answering as the kubelet.

use meshcert_protocol::api::{ApiError, ErrorCode, KubernetesAttestRequest, NodeSvidResponse};
use meshcert_tests::agent::{Agent, WAIT};
use meshcert_tests::ca::{CaHolder, HttpAnswer};
use meshcert_tests::kube::{FakeApiServer, PodCgroup, ServiceAccountToken, WorkloadPod};
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
    let status = ca.status().expect("status");
    let text = status.to_string();
    assert!(
        text.contains("\"cluster\":\"east\""),
        "the status names each node's cluster: {text}"
    );
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

/// A holder for cluster `east` whose entries select pods: `web` by namespace and service
/// account, `root` by uid 0 only.
fn pod_entries_config(api: &FakeApiServer) -> String {
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
{cluster}entries:
  - id: web
    spiffeId: spiffe://mesh-a.test/ns/shop/sa/web
    mesh: mesh-a
    selectors: ["k8s:ns:shop", "k8s:sa:web"]
    dir: web
  - id: root
    spiffeId: spiffe://mesh-a.test/node-root
    mesh: mesh-a
    selectors: ["unix:uid:0"]
    dir: root
"#,
        cluster = api.cluster_yaml("east", "mesh-a"),
    )
}

/// An agent of cluster `east` on `worker-1` whose pod attestation asks `kubelet_url`.
fn pod_agent(ca: &CaHolder, api: &FakeApiServer, kubelet_url: &str) -> (Agent, tempfile::TempDir) {
    api.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
    let token = api.issue_token(ServiceAccountToken::agent("agent-a", "uid-a"));
    let dir = tempfile::tempdir().expect("tmp");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).expect("write token");
    let extra = format!(
        "kubernetes:\n  cluster: east\n  tokenFile: {token}\n  kubelet:\n    url: {kubelet_url}\n    caFile: {ca}\n    tokenFile: {kubelet_token}\n    wait: 20s\nsyncInterval: 1s\n",
        token = token_file.display(),
        ca = api.ca_file().display(),
        kubelet_token = api.holder_token_file().display(),
    );
    let mut agent = Agent::spawn(ca, "worker-1", "mesh-a", &extra, None).expect("spawn");
    agent.wait_joined().expect("joined");
    agent
        .wait_for_file(&agent.volume_dir().join("web/svid.pem"))
        .expect("web issued");
    agent
        .wait_for_file(&agent.volume_dir().join("root/svid.pem"))
        .expect("root issued");
    (agent, dir)
}

/// Runs `workload-probe svids` inside `pod`'s cgroup (as `uid`); its output, trimmed.
fn probe_in_pod(agent: &Agent, pod: &WorkloadPod, uid: u32) -> String {
    let cgroup = PodCgroup::create(pod).expect("cgroup folders (needs root)");
    let endpoint = format!("unix://{}", agent.workload_socket().display());
    let output = meshcert_tests::output_within(
        &mut cgroup.command(
            &meshcert_tests::bin_path("workload-probe"),
            &["svids", &endpoint],
            uid,
        ),
        meshcert_tests::COMMAND_TIMEOUT,
    )
    .expect("probe runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "pod attestation tests move processes into cgroups and must run as root"
    );
}

#[test]
fn a_pod_gets_the_svid_of_its_service_account_entry_and_others_are_denied() {
    assert_root();
    let api = FakeApiServer::start().expect("API server");
    let ca = CaHolder::start(&pod_entries_config(&api)).expect("holder");
    let (agent, _dir) = pod_agent(&ca, &api, &api.url());

    let web = WorkloadPod::new("shop", "web-0", "web", "worker-1");
    let db = WorkloadPod::new("shop", "db-0", "db", "worker-1");
    api.add_workload_pod(&web);
    api.add_workload_pod(&db);

    // As another uid, only the pod decides.
    assert_eq!(
        probe_in_pod(&agent, &web, 65534),
        "svid spiffe://mesh-a.test/ns/shop/sa/web",
        "agent log:\n{}",
        agent.log()
    );
    assert_eq!(probe_in_pod(&agent, &db, 65534), "error NoIdentityIssued");
    // As root, in the web pod: both its pod's and the uid entry, the first entry first.
    assert_eq!(
        probe_in_pod(&agent, &web, 0),
        "svid spiffe://mesh-a.test/ns/shop/sa/web\nsvid spiffe://mesh-a.test/node-root"
    );

    // Entries made with `entry create` select by label and container too.
    let created = ca
        .ctl(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://mesh-a.test/labelled",
            "--mesh",
            "mesh-a",
            "--selector",
            "k8s:pod-label:app:db-0",
            "--selector",
            "k8s:container-name:app",
            "--selector",
            "k8s:node-name:worker-1",
            "--dir",
            "labelled",
        ])
        .expect("entry create");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    agent
        .wait_for_served("labelled")
        .expect("the created entry is issued and served");
    assert_eq!(
        probe_in_pod(&agent, &db, 65534),
        "svid spiffe://mesh-a.test/labelled"
    );

    // Concurrent callers share pod lists (one list is reused for a second).
    let before = api.pod_lists();
    let endpoint = format!("unix://{}", agent.workload_socket().display());
    let cgroup = PodCgroup::create(&web).expect("cgroup");
    let probes: Vec<_> = (0..8)
        .map(|_| {
            meshcert_tests::ChildGuard::spawn(
                cgroup
                    .command(
                        &meshcert_tests::bin_path("workload-probe"),
                        &["svids", &endpoint],
                        65534,
                    )
                    .stdout(std::process::Stdio::piped()),
            )
            .expect("probe starts")
        })
        .collect();
    for probe in probes {
        let out = probe
            .output_within(meshcert_tests::COMMAND_TIMEOUT)
            .expect("probe ends");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "svid spiffe://mesh-a.test/ns/shop/sa/web"
        );
    }
    let lists = api.pod_lists() - before;
    println!("8 concurrent callers: {lists} pod list(s) fetched");
    assert!(lists < 8, "{lists} pod lists for 8 concurrent callers");
    drop(cgroup);

    // A pod the kubelet does not list yet: its first call waits until the kubelet lists it.
    let late = WorkloadPod::new("shop", "web-1", "web", "worker-1");
    let cgroup = PodCgroup::create(&late).expect("cgroup");
    let lists_before = api.pod_lists();
    let probe = meshcert_tests::ChildGuard::spawn(
        cgroup
            .command(
                &meshcert_tests::bin_path("workload-probe"),
                &["svids", &endpoint],
                65534,
            )
            .stdout(std::process::Stdio::piped()),
    )
    .expect("probe starts");
    meshcert_tests::agent::wait_until("the agent to look for the new pod", WAIT, || {
        api.pod_lists() >= lists_before + 2
    })
    .expect("the agent asks the kubelet again while the pod is not listed");
    api.add_workload_pod(&late);
    let output = probe
        .output_within(meshcert_tests::COMMAND_TIMEOUT)
        .expect("probe ends");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "svid spiffe://mesh-a.test/ns/shop/sa/web"
    );
}

#[test]
fn a_kubelet_that_is_down_is_a_clear_error_and_uid_entries_still_work() {
    assert_root();
    let api = FakeApiServer::start().expect("API server");
    let ca = CaHolder::start(&pod_entries_config(&api)).expect("holder");
    // Nothing listens on port 9.
    let (agent, _dir) = pod_agent(&ca, &api, "https://127.0.0.1:9");
    let web = WorkloadPod::new("shop", "web-0", "web", "worker-1");
    api.add_workload_pod(&web);

    assert_eq!(
        probe_in_pod(&agent, &web, 0),
        "svid spiffe://mesh-a.test/node-root",
        "the uid entry is served without the kubelet"
    );
    let refused = probe_in_pod(&agent, &web, 65534);
    assert!(
        refused.contains("Unavailable") && refused.contains("pod attestation failed"),
        "{refused}"
    );
    assert!(
        agent.log().contains("pod attestation failed"),
        "the agent logs why"
    );
}

#[test]
fn an_agent_waits_for_its_token_file_and_stops_on_an_untrusted_service_account() {
    let api = FakeApiServer::start().expect("API server");
    api.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
    api.add_pod("default", "intruder", "uid-i", "worker-2");
    let ca = CaHolder::start(&holder_config(&api, "")).expect("holder");

    // The kubelet has not written the token yet when the agent starts.
    let dir = tempfile::tempdir().expect("tmp");
    let token_file = dir.path().join("token");
    let extra = format!(
        "kubernetes:\n  cluster: east\n  tokenFile: {}\nrotation:\n  backoffInitial: 100ms\n  backoffMax: 500ms\n",
        token_file.display()
    );
    let mut agent = Agent::spawn(&ca, "worker-1", "mesh-a", &extra, None).expect("spawn");
    meshcert_tests::agent::wait_until("the agent to miss its token", WAIT, || {
        agent
            .log()
            .contains("cannot read the service-account token")
    })
    .expect("the agent says what it waits for");
    let token = api.issue_token(ServiceAccountToken::agent("agent-a", "uid-a"));
    std::fs::write(&token_file, token).expect("write token");
    agent.wait_joined().expect("joins once the token is there");
    agent
        .wait_for_file(&agent.volume_dir().join("web-1/svid.pem"))
        .expect("web-1 issued");

    // A pod of a service account the holder does not trust: the agent stops, naming the rule.
    let dir = tempfile::tempdir().expect("tmp");
    let token_file = dir.path().join("token");
    let intruder = api.issue_token(ServiceAccountToken {
        namespace: "default".to_owned(),
        service_account: "default".to_owned(),
        ..ServiceAccountToken::agent("intruder", "uid-i")
    });
    std::fs::write(&token_file, intruder).expect("write token");
    let extra = format!(
        "kubernetes:\n  cluster: east\n  tokenFile: {}\n",
        token_file.display()
    );
    let mut refused = Agent::spawn(&ca, "worker-2", "mesh-a", &extra, None).expect("spawn");
    let status = refused
        .wait_exit(WAIT)
        .expect("the agent stops on a final refusal");
    assert_eq!(status.code(), Some(1));
    let log = refused.log();
    assert!(
        log.contains("untrusted_service_account") && log.contains("default:default"),
        "{log}"
    );
}

#[test]
fn two_clusters_share_a_holder_and_their_same_named_nodes_stay_apart() {
    let east = FakeApiServer::start().expect("east API server");
    let west = FakeApiServer::start().expect("west API server");
    east.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
    west.add_pod("meshcert", "agent-a", "uid-w", "worker-1");
    let ca = CaHolder::start(&holder_config(&east, &west.cluster_yaml("west", "mesh-a")))
        .expect("holder");
    let east_token = east.issue_token(ServiceAccountToken::agent("agent-a", "uid-a"));
    let west_token = west.issue_token(ServiceAccountToken::agent("agent-a", "uid-w"));

    let node = |answer: HttpAnswer| -> String {
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        serde_json::from_slice::<NodeSvidResponse>(&answer.body)
            .expect("node SVID")
            .node
    };
    assert_eq!(node(attest(&ca, "east", &east_token)), "east.worker-1");
    assert_eq!(node(attest(&ca, "west", &west_token)), "west.worker-1");
    // A token is checked by the API server of the cluster it names: east's means nothing to west.
    refused(&attest(&ca, "west", &east_token), ErrorCode::InvalidToken);
    assert_eq!(west.reviews(), 2);
}

#[test]
fn a_kubernetes_node_whose_identity_expired_while_down_attests_again_by_itself() {
    let api = FakeApiServer::start().expect("API server");
    api.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
    // 3 s node SVIDs: they expire soon after the agent is stopped.
    let config = holder_config(&api, "").replace(
        "  serverNames: [localhost]\n",
        "  serverNames: [localhost]\n  nodeSvidTtl: 3s\n",
    );
    assert!(
        config.contains("nodeSvidTtl"),
        "the test config changed shape"
    );
    let ca = CaHolder::start(&config).expect("holder");
    let token = api.issue_token(ServiceAccountToken::agent("agent-a", "uid-a"));
    let (mut agent, _token_dir) = k8s_agent(&ca, "worker-1", &token);
    let node_pem = agent.state_dir().join("node.pem");
    agent.kill9();
    let expired_at = std::fs::metadata(&node_pem)
        .and_then(|m| m.modified())
        .expect("node.pem")
        + std::time::Duration::from_secs(4);
    meshcert_tests::agent::wait_until("the node SVID to expire", WAIT, || {
        std::time::SystemTime::now() > expired_at
    })
    .expect("expiry");
    let reviews = api.reviews();
    agent
        .relaunch(None)
        .expect("relaunch without any token argument");
    meshcert_tests::agent::wait_until("a new attestation", WAIT, || {
        agent
            .log()
            .contains("attesting again with the service-account token")
            && api.reviews() > reviews
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    meshcert_tests::agent::wait_until("ready again", WAIT, || {
        agent
            .log()
            .split("attesting again")
            .nth(1)
            .is_some_and(|after| after.contains("rotator: ready"))
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    assert!(agent.try_exit().expect("status").is_none(), "still running");
}
