//! Which pod and container a process belongs to, read from its `/proc/<pid>/cgroup`.
//!
//! Pure: [`pod_container`] takes the file's text. The kubelet names a pod's cgroup after its
//! UID and the container runtime names the container's after its ID, in shapes that depend on
//! the cgroup version (v1: one line per hierarchy; v2: one `0::` line), the kubelet's cgroup
//! driver (cgroupfs: `/kubepods/<qos>/pod<uid>/<id>`; systemd:
//! `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`)
//! and the runtime (containerd `cri-containerd-`, CRI-O `crio-`, Docker `docker-`, or a bare ID;
//! containerd under systemd may also write `...pod<uid>.slice:cri-containerd:<id>`). A
//! process outside any pod (the node's own services, CRI-O's `crio-conmon-` monitors) gives
//! `None`.

/// A pod UID and a container ID, as the kubelet reports them (UID with dashes, ID in hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID (`metadata.uid`).
    pub pod_uid: String,
    /// The container's ID without the runtime prefix (`containerID` after `://`).
    pub container_id: String,
}

/// The pod and container of the process whose `/proc/<pid>/cgroup` is `text`, if it runs in a
/// pod's container. Every line must agree: a process is in one container.
pub fn pod_container(text: &str) -> Option<PodContainer> {
    let mut found: Option<PodContainer> = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // hierarchy-ID:controllers:path; the path may itself hold `:`.
        let mut fields = line.splitn(3, ':');
        let path = fields.nth(2)?;
        let Some(this) = from_path(path) else {
            continue;
        };
        match &found {
            Some(other) if *other != this => return None,
            _ => found = Some(this),
        }
    }
    found
}

/// The pod and container named by one cgroup path.
fn from_path(path: &str) -> Option<PodContainer> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (pod_at, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(i, s)| pod_uid(s).map(|u| (i, u)))?;
    // containerd with the systemd driver may put the container after a `:` in the pod's slice.
    let pod_segment = segments[pod_at];
    let container = if let Some((_, rest)) = pod_segment.split_once(".slice:") {
        rest.rsplit(':').next()?
    } else {
        segments.get(pod_at + 1)?
    };
    let container_id = container_id(container)?;
    Some(PodContainer {
        pod_uid,
        container_id,
    })
}

/// The pod UID in a segment `pod<uid>` or `kubepods-<qos>-pod<uid>.slice` (systemd writes the
/// UID's dashes as underscores).
fn pod_uid(segment: &str) -> Option<String> {
    let start = segment.rfind("pod")? + 3;
    let rest = &segment[start..];
    let uid = rest.get(..36)?;
    let after = &rest[36..];
    if !(after.is_empty() || after.starts_with(".slice")) {
        return None;
    }
    let uid = uid.replace('_', "-");
    let shape_ok = uid.char_indices().all(|(i, c)| {
        if matches!(i, 8 | 13 | 18 | 23) {
            c == '-'
        } else {
            c.is_ascii_hexdigit()
        }
    });
    shape_ok.then(|| uid.to_ascii_lowercase())
}

/// The container ID in `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`,
/// `crio-<id>` or a bare `<id>`: 64 hex digits. CRI-O's `crio-conmon-<id>` is not a container.
fn container_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = name.rsplit('-').next()?;
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const ID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn want() -> Option<PodContainer> {
        Some(PodContainer {
            pod_uid: UID.to_owned(),
            container_id: ID.to_owned(),
        })
    }

    #[test]
    fn recorded_cgroup_files_of_every_shape() {
        let u = UID.replace('-', "_");
        let cases: Vec<(&str, String, Option<PodContainer>)> = vec![
            (
                "v2, systemd, containerd",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope\n"
                ),
                want(),
            ),
            (
                "v2, systemd, CRI-O",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{ID}.scope\n"
                ),
                want(),
            ),
            (
                "v2, systemd, Docker, guaranteed",
                format!("0::/kubepods.slice/kubepods-pod{u}.slice/docker-{ID}.scope\n"),
                want(),
            ),
            (
                "v2, cgroupfs, containerd",
                format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"),
                want(),
            ),
            (
                "v2, cgroupfs, CRI-O",
                format!("0::/kubepods/burstable/pod{UID}/crio-{ID}\n"),
                want(),
            ),
            (
                "v2, containerd's systemd colon form",
                format!(
                    "0::/system.slice/containerd.service/kubepods-burstable-pod{u}.slice:cri-containerd:{ID}\n"
                ),
                want(),
            ),
            (
                "v2, kind node (nested)",
                format!(
                    "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope\n"
                ),
                want(),
            ),
            (
                "v1, cgroupfs, Docker",
                format!(
                    "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n11:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
                 2:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n"
                ),
                want(),
            ),
            (
                "v1, systemd, containerd",
                format!(
                    "10:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n\
                 1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope\n"
                ),
                want(),
            ),
            (
                "hybrid: v1 lines and a 0:: line",
                format!("5:devices:/kubepods/pod{UID}/{ID}\n0::/kubepods/pod{UID}/{ID}\n"),
                want(),
            ),
            (
                "a node service",
                "0::/system.slice/containerd.service\n".to_owned(),
                None,
            ),
            (
                "a user session",
                "0::/user.slice/user-1000.slice/session-3.scope\n".to_owned(),
                None,
            ),
            (
                "CRI-O's conmon",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-conmon-{ID}.scope\n"
                ),
                None,
            ),
            (
                "the pod's own cgroup, no container",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice\n"
                ),
                None,
            ),
            (
                "a short ID",
                format!("0::/kubepods/besteffort/pod{UID}/abc123\n"),
                None,
            ),
            (
                "lines that disagree",
                format!(
                    "5:devices:/kubepods/pod{UID}/{ID}\n0::/kubepods/pod{UID}/{}\n",
                    "a".repeat(64)
                ),
                None,
            ),
            ("empty", String::new(), None),
        ];
        for (what, text, expected) in cases {
            assert_eq!(pod_container(&text), expected, "{what}: {text}");
        }
    }
}
