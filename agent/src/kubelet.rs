//! Pod attestation for the Workload API: a caller's pod UID and container ID (from its cgroup,
//! [`crate::workload::cgroup`]) → the kubelet's authenticated pod list (`GET /pods` on its
//! secure port) → the facts `k8s:` selectors look at ([`PodFacts`]).
//!
//! One list serves every caller: concurrent attestations wait for the same request (a lock
//! held across the fetch; a list fetched since a caller asked is good enough for it), a list
//! is reused for [`Kubelet::cache_for`], and a caller whose pod or container is not in it yet
//! (a new pod's first call races the kubelet's status update) asks for a fresh list every
//! [`RETRY_EVERY`] until [`Kubelet::wait`] has passed. Only the facts of each pod are kept,
//! replaced as a whole by each list, so memory follows the node's pod count.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshcert_kube::api::List;
use meshcert_kube::api::api::core::v1::Pod;
use meshcert_kube::{Client, Endpoint, KubeError, ServerTrust};
use serde::Deserialize;

use crate::workload::cgroup::PodContainer;

/// Default kubelet URL: its secure port on the node (the DaemonSet sets the node's IP).
pub const DEFAULT_URL: &str = "https://127.0.0.1:10250";
/// Default token file: the pod's service-account token for the API server's audience, which
/// the kubelet checks (TokenReview) and authorises (`nodes/proxy` or `nodes/pods`).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The environment variable that overrides `kubelet.url` (the DaemonSet sets it from the
/// node's IP, which a config file cannot know).
pub const URL_ENV: &str = "MESHCERT_KUBELET_URL";
/// How often a caller not yet listed asks for a fresh list.
pub const RETRY_EVERY: Duration = Duration::from_millis(250);

/// `kubernetes.kubelet:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeletFile {
    /// `https://host:port` of the kubelet's secure port.
    pub url: Option<String>,
    /// PEM file with the CA that signs the kubelet's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// Accept any kubelet certificate (self-signed kubelet serving certificates).
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Bearer token file.
    pub token_file: Option<PathBuf>,
    /// How long a pod list is reused (default 1 s).
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub cache_for: Option<Duration>,
    /// How long a caller whose pod is not listed yet waits for it (default 5 s).
    #[serde(default, with = "meshcert_protocol::duration::option")]
    pub wait: Option<Duration>,
}

/// Kubelet settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletSettings {
    /// Where and how to call.
    pub endpoint: Endpoint,
    /// How long a list is reused.
    pub cache_for: Duration,
    /// How long an unlisted caller waits.
    pub wait: Duration,
}

impl KubeletSettings {
    /// Validates `kubernetes.kubelet`, with `url_env` (the value of [`URL_ENV`]) over the file.
    pub fn resolve(file: KubeletFile, url_env: Option<String>, problems: &mut Vec<String>) -> Self {
        let trust = match (file.ca_file, file.insecure_skip_verify) {
            (Some(ca), false) => ServerTrust::CaFile(ca),
            (None, true) => ServerTrust::SkipVerify,
            (Some(_), true) => {
                problems.push(
                    "kubernetes.kubelet: set caFile or insecureSkipVerify, not both".to_owned(),
                );
                ServerTrust::SkipVerify
            }
            (None, false) => {
                problems.push("kubernetes.kubelet needs caFile (the CA of the kubelet's serving certificate) or, for self-signed kubelet certificates, insecureSkipVerify: true".to_owned());
                ServerTrust::SkipVerify
            }
        };
        let url = url_env
            .filter(|u| !u.is_empty())
            .or(file.url)
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        if !url.starts_with("https://") {
            problems.push(format!(
                "kubernetes.kubelet.url `{url}` is not an https:// URL"
            ));
        }
        Self {
            endpoint: Endpoint {
                url,
                trust,
                token_file: Some(
                    file.token_file
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_FILE)),
                ),
            },
            cache_for: file.cache_for.unwrap_or(Duration::from_secs(1)),
            wait: file.wait.unwrap_or(Duration::from_secs(5)),
        }
    }
}

/// Why a caller's pod could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The kubelet client cannot be set up (URL, CA file).
    #[error("the kubelet client cannot be set up: {0}")]
    Setup(#[source] KubeError),
    /// The kubelet did not answer, or refused (token, authorisation).
    #[error("the kubelet's pod list cannot be read: {0}")]
    List(#[source] KubeError),
    /// The pod was not in the kubelet's list within the wait.
    #[error("pod {pod_uid} is not in the kubelet's pod list (waited {waited:?})")]
    NotListed {
        /// The pod's UID from the caller's cgroup.
        pod_uid: String,
        /// How long it was waited for.
        waited: Duration,
    },
}

/// What `k8s:` selectors look at, about one caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `metadata.name`.
    pub pod_name: String,
    /// `metadata.uid`.
    pub pod_uid: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// The caller's container's name, when its status is listed.
    pub container_name: Option<String>,
    /// That container's image, as the pod spec names it.
    pub container_image: Option<String>,
}

/// One listed pod: its facts and its containers (ID without the runtime prefix, name, image).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedPod {
    facts: PodFacts,
    containers: Vec<(String, String, String)>,
}

impl ListedPod {
    fn with_container(&self, id: &str) -> Option<PodFacts> {
        let (_, name, image) = self.containers.iter().find(|(c, _, _)| c == id)?;
        Some(PodFacts {
            container_name: Some(name.clone()),
            container_image: Some(image.clone()),
            ..self.facts.clone()
        })
    }
}

/// A pod list, by pod UID, when its request started, and its number (lists are numbered from
/// 1 in the order they arrive; 0 is "none yet").
#[derive(Debug)]
struct Listing {
    started: Instant,
    generation: u64,
    pods: HashMap<String, ListedPod>,
}

/// The facts of each pod of a kubelet's list (pure).
fn listed_pods(list: List<Pod>) -> HashMap<String, ListedPod> {
    let mut pods = HashMap::with_capacity(list.items.len());
    for pod in list.items {
        let meta = pod.metadata;
        let Some(uid) = meta.uid else { continue };
        let spec = pod.spec.unwrap_or_default();
        let images: HashMap<&str, &str> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .map(|c| (c.name.as_str(), c.image.as_deref().unwrap_or_default()))
            .collect();
        let status = pod.status.unwrap_or_default();
        let containers = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .chain(status.ephemeral_container_statuses.iter().flatten())
            .filter_map(|c| {
                let id = c
                    .container_id
                    .as_deref()?
                    .split_once("://")?
                    .1
                    .to_ascii_lowercase();
                let image = images
                    .get(c.name.as_str())
                    .map_or_else(|| c.image.clone(), |i| (*i).to_owned());
                Some((id, c.name.clone(), image))
            })
            .collect();
        let facts = PodFacts {
            namespace: meta.namespace.unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            pod_name: meta.name.unwrap_or_default(),
            pod_uid: uid.clone(),
            node_name: spec.node_name.clone().unwrap_or_default(),
            labels: meta.labels.unwrap_or_default(),
            container_name: None,
            container_image: None,
        };
        pods.insert(uid, ListedPod { facts, containers });
    }
    pods
}

/// The kubelet, shared by every Workload API call.
#[derive(Debug)]
pub struct Kubelet {
    client: Client,
    settings: KubeletSettings,
    listing: tokio::sync::Mutex<Option<Arc<Listing>>>,
    fetches: AtomicU64,
    arrived: AtomicU64,
}

impl Kubelet {
    /// A kubelet client; nothing is fetched yet.
    pub fn new(settings: KubeletSettings) -> Result<Self, KubeletError> {
        Ok(Self {
            client: Client::new(&settings.endpoint).map_err(KubeletError::Setup)?,
            settings,
            listing: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
        })
    }

    /// How long a list is reused.
    pub fn cache_for(&self) -> Duration {
        self.settings.cache_for
    }

    /// How long a caller not yet listed waits.
    pub fn wait(&self) -> Duration {
        self.settings.wait
    }

    /// How many pod lists were asked for so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Acquire)
    }

    /// A list whose request started at or after `fresh_after`, or that arrived after list
    /// number `newer_than`: the cached one, the one another caller was fetching while this one
    /// waited for the lock, or a new one.
    async fn listing(
        &self,
        fresh_after: Instant,
        newer_than: u64,
    ) -> Result<Arc<Listing>, KubeletError> {
        let mut cached = self.listing.lock().await;
        if let Some(listing) = cached
            .as_ref()
            .filter(|l| l.started >= fresh_after || l.generation > newer_than)
        {
            return Ok(Arc::clone(listing));
        }
        let started = Instant::now();
        self.fetches.fetch_add(1, Ordering::AcqRel);
        let list: List<Pod> = self.client.get("/pods").await.map_err(KubeletError::List)?;
        // Under the lock: lists arrive one at a time.
        let generation = self.arrived.load(Ordering::Acquire) + 1;
        let listing = Arc::new(Listing {
            started,
            generation,
            pods: listed_pods(list),
        });
        self.arrived.store(generation, Ordering::Release);
        *cached = Some(Arc::clone(&listing));
        tracing::debug!(pods = listing.pods.len(), "kubelet pod list fetched");
        Ok(listing)
    }

    /// The facts of the caller's pod and container. A pod listed without the container (its
    /// status not yet updated) gives the pod's facts without container once the wait is over.
    pub async fn attest(&self, caller: &PodContainer) -> Result<PodFacts, KubeletError> {
        let asked = Instant::now();
        let deadline = asked + self.settings.wait;
        let mut fresh_after = asked.checked_sub(self.settings.cache_for).unwrap_or(asked);
        // Any list arriving from now on will do, even one whose request is already in flight.
        let mut newer_than = self.arrived.load(Ordering::Acquire);
        loop {
            let listing = self.listing(fresh_after, newer_than).await?;
            let pod = listing.pods.get(&caller.pod_uid);
            if let Some(facts) = pod.and_then(|p| p.with_container(&caller.container_id)) {
                return Ok(facts);
            }
            if Instant::now() >= deadline {
                return match pod {
                    Some(p) => Ok(p.facts.clone()),
                    None => Err(KubeletError::NotListed {
                        pod_uid: caller.pod_uid.clone(),
                        waited: asked.elapsed(),
                    }),
                };
            }
            tokio::time::sleep(RETRY_EVERY.min(deadline.saturating_duration_since(Instant::now())))
                .await;
            fresh_after = Instant::now();
            newer_than = listing.generation;
        }
    }
}

#[cfg(test)]
mod tests {
    use meshcert_kube::api::api::core::v1::{Container, ContainerStatus, PodSpec, PodStatus};
    use meshcert_kube::api::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(uid: &str, container_id: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                uid: Some(uid.into()),
                labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("worker-1".into()),
                service_account_name: Some("web".into()),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("ghcr.io/example/web:1.0".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                container_statuses: container_id.map(|id| {
                    vec![ContainerStatus {
                        name: "app".into(),
                        container_id: Some(format!("containerd://{id}")),
                        image: "ghcr.io/example/web@sha256:00".into(),
                        ..ContainerStatus::default()
                    }]
                }),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn a_pod_list_gives_each_pods_facts_and_containers() {
        let list = List {
            items: vec![pod("u1", Some("ABC")), pod("u2", None), Pod::default()],
            metadata: Default::default(),
        };
        let pods = listed_pods(list);
        assert_eq!(pods.len(), 2, "a pod without UID is skipped");
        let facts = pods["u1"].with_container("abc").expect("container listed");
        assert_eq!(facts.namespace, "shop");
        assert_eq!(facts.service_account, "web");
        assert_eq!(facts.pod_name, "web-0");
        assert_eq!(facts.node_name, "worker-1");
        assert_eq!(facts.labels["app"], "web");
        assert_eq!(facts.container_name.as_deref(), Some("app"));
        assert_eq!(
            facts.container_image.as_deref(),
            Some("ghcr.io/example/web:1.0")
        );
        assert!(pods["u2"].with_container("abc").is_none());
    }

    /// A stand-in kubelet on loopback answering `GET /pods` with `pods`, each answer held until
    /// a permit of `release` is added; counts requests.
    struct HeldKubelet {
        url: String,
        dir: tempfile::TempDir,
        requests: Arc<AtomicU64>,
        release: Arc<tokio::sync::Semaphore>,
    }

    async fn held_kubelet(pods: Vec<Pod>) -> HeldKubelet {
        let dir = tempfile::tempdir().expect("tmp");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("leaf");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.path().join("token"), "kubelet-token").expect("write");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("tls");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let body = serde_json::to_vec(&List {
            items: pods,
            metadata: Default::default(),
        })
        .expect("json");
        let requests = Arc::new(AtomicU64::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (counted, held) = (Arc::clone(&requests), Arc::clone(&release));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (counted, held, body) = (Arc::clone(&counted), Arc::clone(&held), body.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let (counted, held, body) =
                            (Arc::clone(&counted), Arc::clone(&held), body.clone());
                        async move {
                            counted.fetch_add(1, Ordering::AcqRel);
                            held.acquire().await.expect("open").forget();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HeldKubelet {
            url,
            dir,
            requests,
            release,
        }
    }

    fn kubelet_for(held: &HeldKubelet, cache_for: Duration, wait: Duration) -> Arc<Kubelet> {
        let settings = KubeletSettings {
            endpoint: Endpoint {
                url: held.url.clone(),
                trust: ServerTrust::CaFile(held.dir.path().join("ca.pem")),
                token_file: Some(held.dir.path().join("token")),
            },
            cache_for,
            wait,
        };
        Arc::new(Kubelet::new(settings).expect("client"))
    }

    fn caller(uid: &str) -> PodContainer {
        PodContainer {
            pod_uid: uid.to_owned(),
            container_id: "abc".to_owned(),
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_pod_list_request() {
        let held = held_kubelet(vec![pod("u1", Some("abc"))]).await;
        // No reuse of finished lists: only the sharing of the one in flight counts here.
        let kubelet = kubelet_for(&held, Duration::ZERO, Duration::from_secs(5));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let kubelet = Arc::clone(&kubelet);
                tokio::spawn(async move { kubelet.attest(&caller("u1")).await })
            })
            .collect();
        while held.requests.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        held.release.add_permits(100);
        for c in callers {
            let facts = c.await.expect("task").expect("attested");
            assert_eq!(facts.container_name.as_deref(), Some("app"));
        }
        assert_eq!(
            held.requests.load(Ordering::Acquire),
            1,
            "one request for 8 callers"
        );
        assert_eq!(kubelet.fetches(), 1);
    }

    #[tokio::test]
    async fn an_unlisted_pod_is_looked_for_again_until_the_wait_ends() {
        let held = held_kubelet(vec![pod("u1", Some("abc"))]).await;
        held.release.add_permits(1000);
        let kubelet = kubelet_for(&held, Duration::from_secs(1), Duration::from_millis(600));
        kubelet.attest(&caller("u1")).await.expect("listed");
        assert_eq!(kubelet.fetches(), 1);
        kubelet.attest(&caller("u1")).await.expect("listed");
        assert_eq!(kubelet.fetches(), 1, "a list is reused within cacheFor");
        let err = kubelet
            .attest(&caller("u9"))
            .await
            .expect_err("never listed");
        assert!(matches!(err, KubeletError::NotListed { .. }), "{err}");
        assert!(
            kubelet.fetches() >= 3,
            "asked again while waiting: {}",
            kubelet.fetches()
        );
    }

    #[test]
    fn settings_need_a_trust_choice_and_the_environment_wins() {
        let mut problems = Vec::new();
        let s = KubeletSettings::resolve(
            KubeletFile {
                insecure_skip_verify: true,
                url: Some("https://10.0.0.1:10250".into()),
                ..KubeletFile::default()
            },
            Some("https://10.0.0.2:10250".into()),
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.endpoint.url, "https://10.0.0.2:10250");
        assert_eq!(s.endpoint.trust, ServerTrust::SkipVerify);
        KubeletSettings::resolve(KubeletFile::default(), None, &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
