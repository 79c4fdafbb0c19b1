//! A throwaway PostgreSQL cluster per test run for the high-availability scenarios: the same
//! helper the holder's unit tests use (`initdb` + `pg_ctl` in a temporary folder, as the
//! `postgres` user when the tests run as root, on a Unix socket), and a replica configuration.
//!
//! ```no_run
//! use meshcert_tests::postgres::{Cluster, replica_config};
//! let pg = Cluster::start();
//! let url = pg.create_database("ha");
//! # let kek = std::path::Path::new("/tmp/kek");
//! let yaml = replica_config(meshcert_tests::ca::EXAMPLE_CONFIG, &url, kek);
//! ```

#[path = "../../ca/src/store/throwaway_pg.rs"]
mod throwaway;

use std::path::Path;

pub use throwaway::{Cluster, USER};

/// `config_yaml` (which has a `holder:` section) on the PostgreSQL database at `url`, sealing
/// its builtin root with the key-encryption key in `kek`.
pub fn replica_config(config_yaml: &str, url: &str, kek: &Path) -> String {
    config_yaml.replacen(
        "holder:\n",
        &format!(
            "holder:\n  datastore: \"{url}\"\n  keyEncryptionKeyFile: {}\n",
            kek.display()
        ),
        1,
    )
}

/// Writes a fresh key-encryption key (32 random bytes, base64) to `path`, mode 0600.
pub fn write_kek(path: &Path) -> anyhow::Result<()> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(
        f,
        "{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    )?;
    Ok(())
}
