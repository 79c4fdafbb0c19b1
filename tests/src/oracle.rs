//! Independent oracles: how the tests read certificates and judge installed SVIDs without the
//! product's own code. SANs are read here with x509-parser; chains are verified and keys are
//! matched by the `openssl` command line. A bug shared by the product's reading and its
//! checking cannot hide behind them.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use x509_parser::prelude::*;

/// How far the holder backdates a leaf's notBefore: `notBefore + ISSUED_AFTER_NOT_BEFORE` is
/// the moment the leaf was signed.
pub const ISSUED_AFTER_NOT_BEFORE: Duration = Duration::from_secs(10);

/// Every URI SAN of `cert`, in order. An unreadable or repeated SAN extension is an error,
/// never an empty list.
pub fn uri_sans(cert: &X509Certificate<'_>) -> anyhow::Result<Vec<String>> {
    let mut uris = Vec::new();
    let mut seen = 0;
    for ext in cert.extensions() {
        if ext.oid != x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME {
            continue;
        }
        seen += 1;
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|g| match g {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                }));
            }
            other => bail!("unreadable subjectAltName: {other:?}"),
        }
    }
    ensure!(seen <= 1, "{seen} subjectAltName extensions");
    Ok(uris)
}

/// The URI SANs of a DER certificate (see [`uri_sans`]).
pub fn uri_sans_der(der: &[u8]) -> anyhow::Result<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).context("the certificate does not parse")?;
    uri_sans(&cert)
}

/// The serial of a DER certificate as the product's statuses and logs show it: lowercase hex,
/// leading zero bytes dropped.
pub fn serial_hex(der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) = X509Certificate::from_der(der).context("the certificate does not parse")?;
    let hex: String = cert
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(if hex.is_empty() { "00".into() } else { hex })
}

/// The files of one installed SVID, as read from one data folder.
pub struct SvidFiles<'a> {
    /// `svid.pem`: the leaf, then its intermediates.
    pub chain_pem: &'a [u8],
    /// `svid.key`: the leaf's private key, PKCS#8 PEM.
    pub key_pem: &'a [u8],
    /// `bundle.pem`: the trust domain's roots.
    pub bundle_pem: &'a [u8],
}

/// When a judged chain must be valid.
#[derive(Debug, Clone, Copy)]
pub enum At {
    /// Now.
    Now,
    /// When the leaf was signed (its notBefore plus [`ISSUED_AFTER_NOT_BEFORE`]): a short-lived
    /// SVID that expired since still counts as a valid pair.
    Issued,
}

/// What the oracle read from a leaf it accepted.
#[derive(Debug, Clone)]
pub struct Judged {
    /// Serial, as [`serial_hex`].
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

fn unix(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

/// Judges an installed SVID independently of the product: the chain verifies with
/// `openssl verify` against `bundle.pem` at `at`, the key's public key (`openssl pkey`) is the
/// leaf's, and the leaf carries exactly one URI SAN, `expected`.
pub fn judge_svid(files: &SvidFiles<'_>, expected: &str, at: At) -> anyhow::Result<Judged> {
    let chain = certs_of(files.chain_pem).context("svid.pem")?;
    ensure!(!chain.is_empty(), "svid.pem holds no certificate");
    ensure!(
        !certs_of(files.bundle_pem).context("bundle.pem")?.is_empty(),
        "bundle.pem holds no certificate"
    );
    let (_, leaf) = X509Certificate::from_der(&chain[0]).context("the leaf does not parse")?;
    let uris = uri_sans(&leaf)?;
    ensure!(
        uris == [expected],
        "the leaf's URI SANs are {uris:?}, not exactly [{expected}]"
    );
    let judged = Judged {
        serial: serial_hex(&chain[0])?,
        not_before: unix(leaf.validity().not_before.timestamp()),
        not_after: unix(leaf.validity().not_after.timestamp()),
    };
    let when = match at {
        At::Now => SystemTime::now(),
        At::Issued => judged.not_before + ISSUED_AFTER_NOT_BEFORE,
    };
    ensure!(
        judged.not_before <= when && when <= judged.not_after,
        "the leaf is not valid at the time judged"
    );
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // `openssl verify` takes the first certificate of svid.pem as the one to verify, and the
    // whole file as untrusted candidates for the path.
    std::fs::write(dir.join("svid.pem"), files.chain_pem)?;
    std::fs::write(dir.join("bundle.pem"), files.bundle_pem)?;
    std::fs::write(dir.join("svid.key"), files.key_pem)?;
    let secs = when.duration_since(UNIX_EPOCH)?.as_secs().to_string();
    let mut verify = Command::new("openssl");
    verify
        .current_dir(dir)
        .args(["verify", "-x509_strict", "-attime", &secs]);
    verify.args(["-CAfile", "bundle.pem"]);
    let out = openssl(verify.args(["-untrusted", "svid.pem", "svid.pem"]))?;
    ensure!(
        String::from_utf8_lossy(&out).trim_end() == "svid.pem: OK",
        "openssl verify: {}",
        String::from_utf8_lossy(&out)
    );
    let key_spki = openssl(
        Command::new("openssl")
            .current_dir(dir)
            .args(["pkey", "-in", "svid.key", "-pubout", "-outform", "DER"]),
    )?;
    ensure!(
        key_spki == leaf.public_key().raw,
        "svid.key is not the key of the leaf (serial {})",
        judged.serial
    );
    Ok(judged)
}

/// Runs an openssl command; its standard output, or an error with its standard error.
fn openssl(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = crate::output_within(cmd, crate::COMMAND_TIMEOUT).context("openssl runs")?;
    ensure!(
        out.status.success(),
        "openssl failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The DER certificates of a PEM text; a block that is not a certificate is an error.
fn certs_of(pem: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block?;
        ensure!(
            block.label == "CERTIFICATE",
            "a {} block among the certificates",
            block.label
        );
        out.push(block.contents);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair, KeyUsagePurpose, SanType,
    };

    const ID: &str = "spiffe://example.org/web";

    fn root() -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name
            .push(DnType::CommonName, "oracle test root");
        CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("root")
    }

    /// A leaf PEM for `uris` signed by `root`, and its key PEM.
    fn leaf(root: &CertifiedIssuer<'static, KeyPair>, uris: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("ia5")))
            .collect();
        p.distinguished_name = DistinguishedName::new();
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, root).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn judge(chain: &str, key: &str, bundle: &str) -> anyhow::Result<Judged> {
        let files = SvidFiles {
            chain_pem: chain.as_bytes(),
            key_pem: key.as_bytes(),
            bundle_pem: bundle.as_bytes(),
        };
        judge_svid(&files, ID, At::Now)
    }

    #[test]
    fn a_good_pair_passes_and_each_fault_is_named() {
        let ca = root();
        let bundle = ca.pem();
        let (chain, key) = leaf(&ca, &[ID]);
        let judged = judge(&chain, &key, &bundle).expect("a good pair");
        assert!(judged.not_before < judged.not_after);

        let (_, other_key) = leaf(&ca, &[ID]);
        let e = judge(&chain, &other_key, &bundle).expect_err("another key");
        assert!(e.to_string().contains("not the key"), "{e}");

        let (two, two_key) = leaf(&ca, &[ID, "spiffe://example.org/db"]);
        let e = judge(&two, &two_key, &bundle).expect_err("two URI SANs");
        assert!(e.to_string().contains("not exactly"), "{e}");

        let e = judge(&chain, &key, &root().pem()).expect_err("another root");
        assert!(e.to_string().contains("openssl"), "{e}");
    }
}
