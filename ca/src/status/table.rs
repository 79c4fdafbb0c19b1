//! The status document's table form, for a person (`meshcert-ca status`): one line per part
//! of the status, then one line per mesh, then one line per node and per identity.

use std::fmt::Write as _;
use std::time::Duration;

use super::{CertificateStatus, NodeStatus, Status, mode_name, printable};

impl Status {
    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut out = String::new();
        self.write_parts(&mut out);
        self.write_meshes(&mut out);
        write_nodes(&mut out, &self.certificate_status.nodes);
        out
    }

    /// The heading, one line per part of the status with its messages, the shared root and
    /// the server certificate.
    fn write_parts(&self, out: &mut String) {
        let c = &self.certificate_status;
        let f = &self.federation_status;
        let e = &self.access_control_enforcement_status;
        let _ = writeln!(
            out,
            "{}  listening on {}  {} trust  {} SVIDs issued",
            self.display_name, self.listen_address, c.trust, c.svids_issued
        );
        let parts = [
            (
                "config",
                self.config_status.state,
                String::new(),
                &self.config_status.messages,
            ),
            ("certificates", c.state, String::new(), &c.messages),
            (
                "federation",
                f.state,
                format!("  {}, bundle v{}", f.mode, f.bundle_version),
                &f.messages,
            ),
            ("access control", e.state, String::new(), &e.messages),
        ];
        for (name, state, detail, messages) in parts {
            let _ = writeln!(out, "{name:<16} {}{detail}", state.as_str());
            for m in messages {
                let _ = writeln!(out, "  ! {m}");
            }
        }
        write_certificates(out, c);
    }

    /// One line per mesh: its roots, its bundle's acknowledgement and its enforcement.
    fn write_meshes(&self, out: &mut String) {
        let c = &self.certificate_status;
        let e = &self.access_control_enforcement_status;
        let _ = writeln!(
            out,
            "\n{:<16} {:<24} {:<22} {:<22} {:<14} ENFORCEMENT",
            "MESH", "TRUST DOMAIN", "ROOT EXPIRES", "INTERMEDIATE EXPIRES", "BUNDLE"
        );
        for m in &self.federation_status.meshes {
            let root = c
                .mesh_roots
                .iter()
                .find(|r| r.mesh == m.mesh)
                .map_or("(shared)", |r| r.not_after.as_str());
            let inter = c
                .intermediates
                .iter()
                .find(|i| i.mesh == m.mesh && !i.gateway)
                .map_or("-", |i| i.not_after.as_str());
            let enf = e
                .meshes
                .iter()
                .find(|x| x.mesh == m.mesh)
                .map_or("-".to_owned(), |x| {
                    format!("{} {}/{}", mode_name(x.effective), x.applied, x.nodes)
                });
            let _ = writeln!(
                out,
                "{:<16} {:<24} {:<22} {:<22} {:<14} {}",
                m.mesh,
                m.trust_domain,
                root,
                inter,
                format!("v{} {}/{}", m.bundle_version, m.acknowledged, m.nodes),
                enf
            );
        }
    }
}

/// The shared root and the server certificate.
fn write_certificates(out: &mut String, c: &CertificateStatus) {
    let _ = writeln!(
        out,
        "shared root  {} bits  O={}  expires {}  sha256 {}",
        c.root.key_bits, c.root.org, c.root.not_after, c.root.fingerprint_sha256
    );
    if let Some(sc) = &c.server_certificate {
        let _ = writeln!(
            out,
            "server cert  expires {}  renews {}  sha256 {}",
            sc.not_after, sc.renew_at, sc.fingerprint_sha256
        );
    }
}

/// One line per node, then one indented line per identity it reports.
fn write_nodes(out: &mut String, nodes: &[NodeStatus]) {
    // One column wide enough for node names and indented SPIFFE IDs alike.
    let first = nodes
        .iter()
        .map(|n| n.name.len())
        .chain(
            nodes
                .iter()
                .flat_map(|n| &n.identities)
                .map(|i| i.spiffe_id.to_string().len() + 2),
        )
        .fold("NODE / IDENTITY".len(), usize::max);
    let _ = writeln!(
        out,
        "\n{:<first$} {:<12} {:<9} {:<8} {:<22} LAST REPORT / LAST ERROR",
        "NODE / IDENTITY", "MESH", "STATE", "BUNDLE", "NOT AFTER"
    );
    for n in nodes {
        write_node(out, n, first);
    }
}

fn write_node(out: &mut String, n: &NodeStatus, first: usize) {
    let state = if n.banned {
        "BANNED"
    } else if n.stale {
        "STALE"
    } else if !n.behind.is_empty() {
        "BEHIND"
    } else {
        "OK"
    };
    let behind = if n.behind.is_empty() {
        String::new()
    } else {
        format!(
            "  ({} of {} identities without a valid SVID)",
            n.behind.len(),
            n.identities.len()
        )
    };
    let _ = writeln!(
        out,
        "{:<first$} {:<12} {:<9} {:<8} {:<22} {}{behind}",
        n.name,
        n.mesh,
        state,
        n.bundle_version.map_or("-".into(), |v| format!("v{v}")),
        "",
        n.last_report.as_deref().unwrap_or("never")
    );
    for i in &n.identities {
        let not_after = i.not_after.map_or("-".into(), |s| {
            crate::authority::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s))
        });
        let _ = writeln!(
            out,
            "  {:<width$} {:<12} {:<9} {:<8} {:<22} {}",
            i.spiffe_id.to_string(),
            "",
            i.state.as_str(),
            "",
            not_after,
            printable(i.last_error.as_deref().unwrap_or("")),
            width = first - 2
        );
    }
}
