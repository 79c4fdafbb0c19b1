//! A stand-in Kubernetes API server and kubelet for the e2e tests: HTTPS on loopback, in the
//! test process, answering TokenReview (`POST /apis/authentication.k8s.io/v1/tokenreviews`),
//! pod reads (`GET /api/v1/namespaces/<ns>/pods/<name>`) and, as the kubelet, the pod list
//! (`GET /pods`) with Kubernetes' own JSON, built and parsed with the `k8s-openapi` types.
//! [`PodCgroup`] makes a real cgroup v2 folder shaped like the kubelet's for a test process.
//!
//! Its service-account tokens are opaque random strings the test gets from
//! [`FakeApiServer::issue_token`]; the review answers as kube-apiserver does: unauthenticated
//! with its error text for an unknown or expired token or a wrong audience, otherwise the
//! service account's user with the pod's name and UID in `extra`. The holder authenticates
//! with its own bearer token ([`FakeApiServer::holder_token_file`]); any other gets 401.
//!
//! ```no_run
//! use meshcert_tests::kube::{FakeApiServer, ServiceAccountToken};
//! let api = FakeApiServer::start()?;
//! api.add_pod("meshcert", "agent-a", "uid-a", "worker-1");
//! let token = api.issue_token(ServiceAccountToken::agent("agent-a", "uid-a"));
//! // holder config: api.cluster_yaml("east", "mesh-a")
//! # anyhow::Ok(())
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshcert_kube::api::List;
use meshcert_kube::api::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use meshcert_kube::api::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};
use meshcert_kube::api::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The service account the example agents run as.
pub const AGENT_NAMESPACE: &str = "meshcert";
/// The agents' service account name.
pub const AGENT_SERVICE_ACCOUNT: &str = "meshcert-agent";

/// What a token the stand-in issued stands for.
#[derive(Debug, Clone)]
pub struct ServiceAccountToken {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod it is bound to.
    pub pod_name: String,
    /// That pod's UID.
    pub pod_uid: String,
    /// The audiences it was issued for.
    pub audiences: Vec<String>,
    /// Whether it has expired.
    pub expired: bool,
}

impl ServiceAccountToken {
    /// A valid token of the agents' service account for `meshcert`, bound to this pod.
    pub fn agent(pod_name: &str, pod_uid: &str) -> Self {
        Self {
            namespace: AGENT_NAMESPACE.to_owned(),
            service_account: AGENT_SERVICE_ACCOUNT.to_owned(),
            pod_name: pod_name.to_owned(),
            pod_uid: pod_uid.to_owned(),
            audiences: vec!["meshcert".to_owned()],
            expired: false,
        }
    }
}

#[derive(Default)]
struct State {
    tokens: BTreeMap<String, ServiceAccountToken>,
    pods: BTreeMap<(String, String), Pod>,
    reviews: usize,
    pod_lists: usize,
}

/// The stand-in API server; dropping it stops it.
pub struct FakeApiServer {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    holder_token: String,
    _runtime: tokio::runtime::Runtime,
}

fn random_text() -> String {
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        *b = fastrand::u8(..);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FakeApiServer {
    /// Starts it on a free loopback port with a fresh CA and server certificate.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (ca_pem, chain, key) = server_pki()?;
        std::fs::write(dir.path().join("ca.pem"), ca_pem)?;
        let holder_token = format!("holder-{}", random_text());
        std::fs::write(dir.path().join("holder-token"), &holder_token)?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let shared = Arc::clone(&state);
        let expected = format!("Bearer {holder_token}");
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let state = Arc::clone(&shared);
                let expected = expected.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        let expected = expected.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(&state, &expected, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            dir,
            addr,
            state,
            holder_token,
            _runtime: runtime,
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA file its certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The file holding the bearer token the holder must send.
    pub fn holder_token_file(&self) -> PathBuf {
        self.dir.path().join("holder-token")
    }

    /// The holder's bearer token.
    pub fn holder_token(&self) -> &str {
        &self.holder_token
    }

    /// A `holder.kubernetes[]` item for this API server, trusting the agents' service account.
    pub fn cluster_yaml(&self, cluster: &str, mesh: &str) -> String {
        format!(
            "    - cluster: {cluster}\n      mesh: {mesh}\n      apiServer: {url}\n      caFile: {ca}\n      tokenFile: {token}\n      serviceAccounts: [\"{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}\"]\n",
            url = self.url(),
            ca = self.ca_file().display(),
            token = self.holder_token_file().display(),
        )
    }

    /// Adds (or replaces) a pod scheduled on `node`.
    pub fn add_pod(&self, namespace: &str, name: &str, uid: &str, node: &str) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                uid: Some(uid.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_owned()),
                service_account_name: Some(AGENT_SERVICE_ACCOUNT.to_owned()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        self.lock()
            .pods
            .insert((namespace.to_owned(), name.to_owned()), pod);
    }

    /// Adds (or replaces) a workload pod on `node` running one container `app` with
    /// `container_id` (containerd), as the kubelet lists it.
    pub fn add_workload_pod(&self, pod: &WorkloadPod) {
        let value = Pod {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                labels: Some(BTreeMap::from([("app".to_owned(), pod.name.clone())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(pod.node.clone()),
                service_account_name: Some(pod.service_account.clone()),
                containers: vec![Container {
                    name: "app".to_owned(),
                    image: Some("example.org/app:1".to_owned()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".to_owned()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "app".to_owned(),
                    container_id: Some(format!("containerd://{}", pod.container_id)),
                    image: "example.org/app:1".to_owned(),
                    ready: true,
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        };
        self.lock()
            .pods
            .insert((pod.namespace.clone(), pod.name.clone()), value);
    }

    /// How many pod lists (`GET /pods`, the kubelet's) it answered.
    pub fn pod_lists(&self) -> usize {
        self.lock().pod_lists
    }

    /// Removes a pod.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.lock()
            .pods
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// A new opaque token standing for `token`.
    pub fn issue_token(&self, token: ServiceAccountToken) -> String {
        let text = format!("sat-{}", random_text());
        self.lock().tokens.insert(text.clone(), token);
        text
    }

    /// How many TokenReviews it answered.
    pub fn reviews(&self) -> usize {
        self.lock().reviews
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_default()
}

/// A Kubernetes `Status` failure body.
fn failure(status: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    json(
        status,
        &Status {
            status: Some("Failure".to_owned()),
            message: Some(message),
            reason: Some(reason.to_owned()),
            code: Some(i32::from(status.as_u16())),
            ..Status::default()
        },
    )
}

async fn answer(
    state: &Mutex<State>,
    expected_auth: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(expected_auth);
    if !authorized {
        return failure(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".to_owned(),
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut state = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let Ok(mut review) = serde_json::from_slice::<TokenReview>(&body) else {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "not a TokenReview".to_owned(),
                );
            };
            state.reviews += 1;
            review.status = Some(review_status(&state.tokens, &review));
            json(StatusCode::CREATED, &review)
        }
        (&Method::GET, ["pods"]) => {
            state.pod_lists += 1;
            let list = List {
                items: state.pods.values().cloned().collect(),
                metadata: ListMeta::default(),
            };
            json(StatusCode::OK, &list)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match state.pods.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(pod) => json(StatusCode::OK, pod),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("pods \"{name}\" not found"),
                ),
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
        ),
    }
}

/// What kube-apiserver says about a token (its error texts included).
fn review_status(
    tokens: &BTreeMap<String, ServiceAccountToken>,
    review: &TokenReview,
) -> TokenReviewStatus {
    let unauthenticated = |error: String| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error),
        ..TokenReviewStatus::default()
    };
    let Some(token) = review.spec.token.as_ref().and_then(|t| tokens.get(t)) else {
        return unauthenticated("[invalid bearer token, token lookup failed]".to_owned());
    };
    let wanted = review.spec.audiences.clone().unwrap_or_default();
    let common: Vec<String> = wanted
        .iter()
        .filter(|a| token.audiences.contains(a))
        .cloned()
        .collect();
    if common.is_empty() {
        return unauthenticated(format!(
            "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
            token.audiences, wanted
        ));
    }
    if token.expired {
        return unauthenticated(
            "[invalid bearer token, service account token has expired]".to_owned(),
        );
    }
    let extra = BTreeMap::from([
        (
            "authentication.kubernetes.io/pod-name".to_owned(),
            vec![token.pod_name.clone()],
        ),
        (
            "authentication.kubernetes.io/pod-uid".to_owned(),
            vec![token.pod_uid.clone()],
        ),
    ]);
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(common),
        user: Some(UserInfo {
            username: Some(format!(
                "system:serviceaccount:{}:{}",
                token.namespace, token.service_account
            )),
            uid: Some(format!("sa-uid-{}", token.service_account)),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{}", token.namespace),
                "system:authenticated".to_owned(),
            ]),
            extra: Some(extra),
        }),
        error: None,
    }
}

/// A CA (PEM) and a server certificate for 127.0.0.1 signed by it, with its key.
type ServerPki = (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn server_pki() -> anyhow::Result<ServerPki> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "stand-in kubernetes CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate()?)?;
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&key, &ca)?;
    Ok((
        ca.pem(),
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

/// A workload pod as [`FakeApiServer::add_workload_pod`] lists it.
#[derive(Debug, Clone)]
pub struct WorkloadPod {
    /// Namespace.
    pub namespace: String,
    /// Name (also its `app` label).
    pub name: String,
    /// UID.
    pub uid: String,
    /// Service account.
    pub service_account: String,
    /// Node.
    pub node: String,
    /// Its container's ID (64 hex digits).
    pub container_id: String,
}

impl WorkloadPod {
    /// A pod `name` of `namespace`/`service_account` on `node`, with a fresh UID and container ID.
    pub fn new(namespace: &str, name: &str, service_account: &str, node: &str) -> Self {
        let hex = random_text();
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &random_text()[..12]
            ),
            service_account: service_account.to_owned(),
            node: node.to_owned(),
            container_id: format!("{}{}", random_text(), random_text()),
        }
    }
}

/// Where cgroup v2 is mounted on the test machines (hybrid hierarchy), or the unified one.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(root).join("cgroup.procs").exists()
            && Path::new(root).join("cgroup.controllers").exists()
        {
            return Ok(PathBuf::from(root));
        }
    }
    anyhow::bail!("no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

/// A real cgroup v2 folder shaped like the kubelet's (systemd driver, containerd):
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
/// Needs root. Dropping it removes the folders it made (once their processes exited).
pub struct PodCgroup {
    made: Vec<PathBuf>,
    leaf: PathBuf,
}

impl PodCgroup {
    /// Makes the folders for `pod`'s container.
    pub fn create(pod: &WorkloadPod) -> anyhow::Result<Self> {
        let root = cgroup2_root()?;
        let uid = pod.uid.replace('-', "_");
        let mut path = root;
        let mut made = Vec::new();
        for part in [
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            format!("kubepods-besteffort-pod{uid}.slice"),
            format!("cri-containerd-{}.scope", pod.container_id),
        ] {
            path = path.join(part);
            match std::fs::create_dir(&path) {
                Ok(()) => made.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Self { made, leaf: path })
    }

    /// A command running `program args...` inside this cgroup as `uid` (and gid `uid`): a
    /// root shell moves itself into it, then becomes the program under that uid (`setpriv`,
    /// same pid), so the program's first call comes from there.
    pub fn command(&self, program: &Path, args: &[&str], uid: u32) -> std::process::Command {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("u=\"$1\"; shift; echo $$ > \"$0\" && exec setpriv --reuid=\"$u\" --regid=\"$u\" --clear-groups -- \"$@\"")
            .arg(self.leaf.join("cgroup.procs"))
            .arg(uid.to_string())
            .arg(program)
            .args(args);
        cmd
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        // The shared parents go with the last pod folder, whichever test made them (a folder
        // still in use is not removed).
        if let Some(pod_slice) = self.leaf.parent() {
            for dir in pod_slice.ancestors().skip(1).take(2) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}
