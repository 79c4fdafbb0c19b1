//! A benchmark node: a real agent's HTTPS client (`HttpsIssuer`) attested with a join token,
//! as an agent joins, so every scenario's nodes call the holder over mTLS with their own SVID.

use meshcert_agent::issuer::{HttpsIssuer, Issuer as _};
use meshcert_agent::keys::{KeyAlgorithm, PrivateKey};
use meshcert_protocol::api::{AttestRequest, Der};

/// A node joined with `token` through the holder at `addresses`, trusting `roots`: its client
/// (already holding its node SVID), the node SVID chain (leaf first) and its key.
pub async fn attest(
    addresses: &str,
    roots: &[Vec<u8>],
    token: String,
) -> anyhow::Result<(HttpsIssuer, Vec<Vec<u8>>, PrivateKey)> {
    let issuer = HttpsIssuer::new(addresses, "localhost", roots)?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let csr = meshcert_agent::csr::build(&key, None)?;
    let answer = issuer
        .attest(AttestRequest {
            token,
            csr: Der(csr),
        })
        .await?;
    let chain: Vec<Vec<u8>> = answer.svid.chain.into_iter().map(|d| d.0).collect();
    issuer.set_identity(&chain, &key)?;
    Ok((issuer, chain, key))
}
