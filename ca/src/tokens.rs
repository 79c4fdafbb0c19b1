//! Join tokens: random one-time secrets bound to a node name and a mesh. The datastore keeps
//! only their SHA-256, so a leaked database does not leak usable tokens.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Default token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);

/// Random bytes in a token (256 bits).
const TOKEN_BYTES: usize = 32;

/// Why a token cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The system random generator failed.
    #[error("the random generator failed")]
    Random,
}

/// A fresh token: 256 random bits as URL-safe base64 text.
pub fn generate() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TokenError::Random)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The stored form of a token: SHA-256, lowercase hex.
pub fn hash(token: &str) -> String {
    crate::authority::hex(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = generate().expect("token");
        let b = generate().expect("token");
        assert_ne!(a, b);
        assert!(a.len() >= 43);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a).len(), 64);
    }
}
