//! Registration entries: which SPIFFE ID goes to which workloads on which nodes, and how it is
//! written to the shared volume.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;
use crate::id::SpiffeId;

/// Default SVID lifetime when an entry does not set one.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);

/// A registration entry as the CA holder stores it and an agent receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// Stable identifier of the entry (unique on the holder).
    pub id: String,
    /// The identity issued for this entry.
    pub spiffe_id: SpiffeId,
    /// Nodes the entry is assigned to, by name. Empty when assigned to a whole mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The mesh whose every node gets the entry, instead of a list of nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Workloads that may receive the SVID: all selectors must match the caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<Selector>,
    /// Requested SVID lifetime; the holder clamps it to its policy.
    #[serde(default = "default_ttl", with = "duration")]
    pub ttl: Duration,
    /// Folder of the shared volume the SVID is written to (one path segment).
    pub dir: String,
    /// Owner of the written files; the agent's own user when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// What to do after each rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    /// Gateways also receive an SVID chained to the shared root under limited trust.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

fn default_ttl() -> Duration {
    DEFAULT_SVID_TTL
}

impl Entry {
    /// Whether the entry is assigned to `node`, a member of `mesh`.
    pub fn is_assigned_to(&self, node: &str, mesh: &str) -> bool {
        self.nodes.iter().any(|n| n == node) || self.mesh.as_deref() == Some(mesh)
    }
}

/// Whether `dir` is usable as an entry's folder name: one plain path segment.
pub fn valid_dir(dir: &str) -> bool {
    !dir.is_empty()
        && dir.len() <= 128
        && !dir.starts_with('.')
        && dir
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Owner of an entry's files, as `uid:gid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Owner {
    /// Owning user id.
    pub uid: u32,
    /// Owning group id.
    pub gid: u32,
}

impl FromStr for Owner {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SelectorError::Owner(s.to_owned());
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        })
    }
}

impl TryFrom<String> for Owner {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Owner> for String {
    fn from(o: Owner) -> String {
        format!("{}:{}", o.uid, o.gid)
    }
}

/// What the agent does after it installs a rotated SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// Signal the process whose pid is in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// The signal to send (`SIGHUP` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// A command to run: program and arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// How long the command may run before it is killed.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

/// Why a selector or owner string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Not of the form `type:key:value`.
    #[error("selector `{0}` is not of the form type:key:value (e.g. unix:uid:1000)")]
    Form(String),
    /// A `unix:uid` or `unix:gid` value is not a number.
    #[error("selector `{0}` needs a numeric id")]
    Number(String),
    /// The `type:key` pair is not one we know.
    #[error(
        "selector `{0}` has an unknown kind; known: unix:uid, unix:gid, unix:user, unix:group, unix:path, k8s:ns, k8s:sa, k8s:pod-name, k8s:pod-uid, k8s:pod-label, k8s:container-name, k8s:container-image, k8s:node-name"
    )]
    Kind(String),
    /// A `unix:path` value is not absolute.
    #[error("selector `{0}` needs an absolute path")]
    Path(String),
    /// An owner is not `uid:gid`.
    #[error("owner `{0}` is not of the form uid:gid")]
    Owner(String),
}

/// A property a workload must have to receive an entry's SVID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Selector {
    /// `unix:uid:N`: the caller's effective uid.
    Uid(u32),
    /// `unix:gid:N`: the caller's gid or one of its supplementary groups.
    Gid(u32),
    /// `unix:user:NAME`: the caller's user name.
    User(String),
    /// `unix:group:NAME`: the caller's group name (primary or supplementary).
    Group(String),
    /// `unix:path:/abs/path`: the caller's executable.
    Path(PathBuf),
    /// `k8s:ns:NAME`: the pod's namespace (the agent reads the caller's pod from the kubelet).
    K8sNamespace(String),
    /// `k8s:sa:NAME`: the pod's service account.
    K8sServiceAccount(String),
    /// `k8s:pod-name:NAME`: the pod's name.
    K8sPodName(String),
    /// `k8s:pod-uid:UID`: the pod's UID.
    K8sPodUid(String),
    /// `k8s:pod-label:KEY:VALUE`: one of the pod's labels.
    K8sPodLabel(String, String),
    /// `k8s:container-name:NAME`: the caller's container's name in its pod.
    K8sContainerName(String),
    /// `k8s:container-image:IMAGE`: the caller's container's image, as the pod spec names it.
    K8sContainerImage(String),
    /// `k8s:node-name:NAME`: the Kubernetes node the pod runs on.
    K8sNodeName(String),
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(kind), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SelectorError::Form(s.to_owned()));
        };
        if value.is_empty() {
            return Err(SelectorError::Form(s.to_owned()));
        }
        let number = || {
            value
                .parse()
                .map_err(|_| SelectorError::Number(s.to_owned()))
        };
        Ok(match (kind, key) {
            ("unix", "uid") => Self::Uid(number()?),
            ("unix", "gid") => Self::Gid(number()?),
            ("unix", "user") => Self::User(value.to_owned()),
            ("unix", "group") => Self::Group(value.to_owned()),
            ("unix", "path") => {
                if !value.starts_with('/') {
                    return Err(SelectorError::Path(s.to_owned()));
                }
                Self::Path(PathBuf::from(value))
            }
            ("k8s", "ns") => Self::K8sNamespace(value.to_owned()),
            ("k8s", "sa") => Self::K8sServiceAccount(value.to_owned()),
            ("k8s", "pod-name") => Self::K8sPodName(value.to_owned()),
            ("k8s", "pod-uid") => Self::K8sPodUid(value.to_owned()),
            ("k8s", "pod-label") => match value.split_once(':') {
                Some((key, label)) if !key.is_empty() => {
                    Self::K8sPodLabel(key.to_owned(), label.to_owned())
                }
                _ => return Err(SelectorError::Form(s.to_owned())),
            },
            ("k8s", "container-name") => Self::K8sContainerName(value.to_owned()),
            ("k8s", "container-image") => Self::K8sContainerImage(value.to_owned()),
            ("k8s", "node-name") => Self::K8sNodeName(value.to_owned()),
            _ => return Err(SelectorError::Kind(s.to_owned())),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(n) => write!(f, "unix:uid:{n}"),
            Self::Gid(n) => write!(f, "unix:gid:{n}"),
            Self::User(s) => write!(f, "unix:user:{s}"),
            Self::Group(s) => write!(f, "unix:group:{s}"),
            Self::Path(p) => write!(f, "unix:path:{}", p.display()),
            Self::K8sNamespace(s) => write!(f, "k8s:ns:{s}"),
            Self::K8sServiceAccount(s) => write!(f, "k8s:sa:{s}"),
            Self::K8sPodName(s) => write!(f, "k8s:pod-name:{s}"),
            Self::K8sPodUid(s) => write!(f, "k8s:pod-uid:{s}"),
            Self::K8sPodLabel(k, v) => write!(f, "k8s:pod-label:{k}:{v}"),
            Self::K8sContainerName(s) => write!(f, "k8s:container-name:{s}"),
            Self::K8sContainerImage(s) => write!(f, "k8s:container-image:{s}"),
            Self::K8sNodeName(s) => write!(f, "k8s:node-name:{s}"),
        }
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_table() {
        let cases: &[(&str, Option<Selector>)] = &[
            ("unix:uid:1000", Some(Selector::Uid(1000))),
            ("unix:gid:50", Some(Selector::Gid(50))),
            ("unix:user:web", Some(Selector::User("web".into()))),
            (
                "unix:group:www-data",
                Some(Selector::Group("www-data".into())),
            ),
            (
                "unix:path:/usr/bin/nginx",
                Some(Selector::Path("/usr/bin/nginx".into())),
            ),
            (
                "k8s:ns:default",
                Some(Selector::K8sNamespace("default".into())),
            ),
            (
                "k8s:sa:web",
                Some(Selector::K8sServiceAccount("web".into())),
            ),
            (
                "k8s:pod-name:web-0",
                Some(Selector::K8sPodName("web-0".into())),
            ),
            (
                "k8s:pod-uid:2c48913c",
                Some(Selector::K8sPodUid("2c48913c".into())),
            ),
            (
                "k8s:pod-label:app.kubernetes.io/name:web",
                Some(Selector::K8sPodLabel(
                    "app.kubernetes.io/name".into(),
                    "web".into(),
                )),
            ),
            (
                "k8s:pod-label:tier:",
                Some(Selector::K8sPodLabel("tier".into(), String::new())),
            ),
            ("k8s:pod-label:tier", None),
            ("k8s:pod-label::web", None),
            (
                "k8s:container-name:app",
                Some(Selector::K8sContainerName("app".into())),
            ),
            (
                "k8s:container-image:ghcr.io/example/web:1.0",
                Some(Selector::K8sContainerImage(
                    "ghcr.io/example/web:1.0".into(),
                )),
            ),
            (
                "k8s:node-name:worker-1",
                Some(Selector::K8sNodeName("worker-1".into())),
            ),
            ("k8s:namespace:default", None),
            ("unix:uid:abc", None),
            ("unix:uid:", None),
            ("unix:path:nginx", None),
            ("unix:pid:1", None),
            ("uid:1000", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<Selector>().ok();
            assert_eq!(&got, want, "input {input}");
            if let Some(sel) = got {
                assert_eq!(sel.to_string(), *input);
            }
        }
    }

    #[test]
    fn entry_yaml_like_json() {
        let json = r#"{"id":"web","spiffeId":"spiffe://a.org/web","nodes":["n1"],
            "selectors":["unix:uid:1000"],"ttl":"10m","dir":"web","owner":"1000:1000"}"#;
        let e: Entry = serde_json::from_str(json).expect("valid entry");
        assert_eq!(e.ttl, Duration::from_secs(600));
        assert_eq!(
            e.owner,
            Some(Owner {
                uid: 1000,
                gid: 1000
            })
        );
        assert!(e.is_assigned_to("n1", "any"));
        assert!(!e.is_assigned_to("n2", "any"));
        let back: Entry =
            serde_json::from_str(&serde_json::to_string(&e).expect("ser")).expect("de");
        assert_eq!(back, e);
    }

    #[test]
    fn dir_names() {
        assert!(valid_dir("web-1.x_y"));
        assert!(!valid_dir(""));
        assert!(!valid_dir(".."));
        assert!(!valid_dir("..data"));
        assert!(!valid_dir("a/b"));
    }
}
