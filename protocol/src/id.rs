//! SPIFFE identifiers: [`TrustDomain`] and [`SpiffeId`], validated on construction.
//!
//! The syntax follows the SPIFFE-ID standard: `spiffe://` + trust domain + path. A value of either
//! type is always valid: serde goes through `TryFrom<String>`, so an invalid ID cannot be
//! deserialised.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The URI scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// Longest trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID we accept, in bytes (the standard requires support up to 2048).
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a valid trust domain or SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string does not start with `spiffe://`.
    #[error("`{0}` does not start with spiffe://")]
    Scheme(String),
    /// The trust domain part is empty.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("the trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// The trust domain holds a character outside `a-z 0-9 . - _`.
    #[error(
        "the trust domain holds `{0}`; only lowercase letters, digits, `.`, `-` and `_` are allowed"
    )]
    TrustDomainChar(char),
    /// The whole ID is longer than 2048 bytes.
    #[error("the SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    /// A path segment is empty (`//`) or the path ends with `/`.
    #[error("the path has an empty segment or a trailing `/`")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("the path has a `.` or `..` segment")]
    DotSegment,
    /// A path segment holds a character outside `A-Z a-z 0-9 . - _`.
    #[error("the path holds `{0}`; only letters, digits, `.`, `-` and `_` are allowed")]
    PathChar(char),
    /// A leaf identity was required but the ID has no path.
    #[error("`{0}` has no path; a workload identity needs one")]
    NoPath(String),
}

/// A SPIFFE trust domain, such as `mesh-a.example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, IdError> {
        let name = name.strip_prefix(SCHEME).unwrap_or(name);
        validate_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    /// The bare name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`: the key of bundle maps and the URI SAN
    /// of signing certificates.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// Whether `id` belongs to this trust domain.
    pub fn contains(&self, id: &SpiffeId) -> bool {
        id.trust_domain() == self
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> String {
        td.0.as_ref().to_owned()
    }
}

/// A SPIFFE ID, `spiffe://<trust domain><path>`. The path may be empty (a trust domain's own ID).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or starts with `/`. (Both parts are shared on clone: an agent copies each
    /// identity into its status, its report and its served SVIDs.)
    path: Arc<str>,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn new(id: &str) -> Result<Self, IdError> {
        if id.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdError::Scheme(truncate(id)))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain: TrustDomain(td.into()),
            path: path.into(),
        })
    }

    /// Builds `spiffe://<trust domain><path>`; `path` must start with `/` or be empty.
    pub fn from_parts(trust_domain: &TrustDomain, path: &str) -> Result<Self, IdError> {
        validate_path(path)?;
        let id = Self {
            trust_domain: trust_domain.clone(),
            path: path.into(),
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        Ok(id)
    }

    /// Parses an ID that must name a workload (a non-empty path), as every leaf SVID does.
    pub fn new_leaf(id: &str) -> Result<Self, IdError> {
        let parsed = Self::new(id)?;
        if parsed.path.is_empty() {
            return Err(IdError::NoPath(truncate(id)));
        }
        Ok(parsed)
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path part: empty, or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the ID has a path (a workload or node identity rather than a trust domain's).
    pub fn is_leaf(&self) -> bool {
        !self.path.is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain.0, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(IdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first `/`, so a non-empty path starts with one.
    let Some(segments) = path.strip_prefix('/') else {
        return Err(IdError::EmptySegment);
    };
    for segment in segments.split('/') {
        if segment.is_empty() {
            return Err(IdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::PathChar(c));
        }
    }
    Ok(())
}

/// Keeps error messages bounded when the input is hostile.
fn truncate(s: &str) -> String {
    const MAX: usize = 128;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases: &[(&str, Result<(), IdError>)] = &[
            ("spiffe://example.org", Ok(())),
            ("spiffe://example.org/ns/default/sa/web", Ok(())),
            ("spiffe://a_b-c.9/x.y-z_0", Ok(())),
            (
                "http://example.org/web",
                Err(IdError::Scheme("http://example.org/web".into())),
            ),
            ("spiffe:///web", Err(IdError::EmptyTrustDomain)),
            (
                "spiffe://Example.org/web",
                Err(IdError::TrustDomainChar('E')),
            ),
            (
                "spiffe://example.org:8080/web",
                Err(IdError::TrustDomainChar(':')),
            ),
            (
                "spiffe://user@example.org/web",
                Err(IdError::TrustDomainChar('@')),
            ),
            ("spiffe://example.org/", Err(IdError::EmptySegment)),
            ("spiffe://example.org//web", Err(IdError::EmptySegment)),
            ("spiffe://example.org/web/", Err(IdError::EmptySegment)),
            ("spiffe://example.org/./web", Err(IdError::DotSegment)),
            ("spiffe://example.org/../web", Err(IdError::DotSegment)),
            ("spiffe://example.org/web%20", Err(IdError::PathChar('%'))),
            ("spiffe://example.org/web?q=1", Err(IdError::PathChar('?'))),
            ("spiffe://example.org/web#f", Err(IdError::PathChar('#'))),
        ];
        for (input, want) in cases {
            let got = SpiffeId::new(input).map(|_| ());
            assert_eq!(&got, want, "input {input}");
        }
    }

    #[test]
    fn leaf_needs_a_path() {
        assert!(SpiffeId::new_leaf("spiffe://example.org/web").is_ok());
        assert!(matches!(
            SpiffeId::new_leaf("spiffe://example.org"),
            Err(IdError::NoPath(_))
        ));
    }

    #[test]
    fn long_ids() {
        let td = "a".repeat(255);
        assert!(SpiffeId::new(&format!("spiffe://{td}/x")).is_ok());
        let td = "a".repeat(256);
        assert_eq!(
            SpiffeId::new(&format!("spiffe://{td}/x")),
            Err(IdError::TrustDomainTooLong)
        );
        let path = "/a".repeat(1100);
        assert_eq!(
            SpiffeId::new(&format!("spiffe://example.org{path}")),
            Err(IdError::TooLong)
        );
    }

    #[test]
    fn serde_refuses_invalid_ids() {
        let ok: SpiffeId = serde_json::from_str("\"spiffe://example.org/web\"").expect("valid");
        assert_eq!(ok.path(), "/web");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/../x\"").is_err());
        assert!(serde_json::from_str::<TrustDomain>("\"Bad\"").is_err());
    }

    #[test]
    fn trust_domain_accepts_id_form() {
        let td = TrustDomain::new("spiffe://example.org").expect("valid");
        assert_eq!(td.as_str(), "example.org");
        assert_eq!(td.id_string(), "spiffe://example.org");
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(
            td in "[a-z0-9._-]{1,40}",
            segs in proptest::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", 0..6),
        ) {
            let segs: Vec<String> = segs.into_iter().filter(|s| s != "." && s != "..").collect();
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let text = format!("spiffe://{td}{path}");
            let id = SpiffeId::new(&text).expect("generated IDs are valid");
            prop_assert_eq!(id.to_string(), text.clone());
            let json = serde_json::to_string(&id).expect("serialises");
            let back: SpiffeId = serde_json::from_str(&json).expect("deserialises");
            prop_assert_eq!(back, id);
        }

        #[test]
        fn arbitrary_input_is_refused_or_kept_exactly(s in "\\PC{0,300}") {
            assert_accepted_ids_are_exact(&s)?;
            if let Ok(td) = TrustDomain::new(&s) {
                // A trust domain is kept as given and only of the allowed characters.
                prop_assert_eq!(td.as_str(), s.as_str());
                prop_assert!(s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)), "{}", s);
            }
        }

        #[test]
        fn arbitrary_bytes_are_refused_or_kept_exactly(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            assert_accepted_ids_are_exact(&String::from_utf8_lossy(&b))?;
        }
    }

    /// An accepted SPIFFE ID is the input itself (no normalisation), round-trips through its
    /// text, and holds only the characters the SPIFFE standard allows; anything else is
    /// refused with a reason.
    fn assert_accepted_ids_are_exact(s: &str) -> Result<(), TestCaseError> {
        match SpiffeId::new(s) {
            Ok(id) => {
                prop_assert_eq!(id.to_string(), s);
                prop_assert_eq!(SpiffeId::new(&id.to_string()), Ok(id.clone()));
                let rest = s.strip_prefix("spiffe://").expect("the scheme");
                prop_assert!(
                    rest.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c)),
                    "{}",
                    s
                );
                // No empty trust domain or segment.
                prop_assert!(
                    !rest.starts_with('/') && !rest.ends_with('/') && !rest.contains("//"),
                    "{}",
                    s
                );
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    }
}
