//! Atomic file replacement: a reader sees either the old content or the new, never a mix, and
//! a crash after [`write_atomic`] returns keeps the new content.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file beside it (`<name>.tmp`) created with
/// `mode` (never a looser mode, even for an instant), fsync'd, renamed over `path`, and the
/// folder fsync'd so that the rename survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_path(path);
    // A leftover from a crash would keep its old mode: remove it so `mode` applies.
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a rename or a new entry in `dir` durable: fsync of the folder itself.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn replaces_content_with_the_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        write_atomic(&path, b"old", 0o644).expect("first write");
        write_atomic(&path, b"new", 0o600).expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
    }

    #[test]
    fn a_stale_temporary_file_does_not_lend_its_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let stale = dir.path().join("key.pem.tmp");
        std::fs::write(&stale, b"stale").expect("stale");
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        write_atomic(&path, b"secret", 0o600).expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!stale.exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        write_atomic(&path, b"old", 0o644).expect("first write");
        // The temporary name is taken by a folder: the write fails before any rename.
        std::fs::create_dir(dir.path().join("cert.pem.tmp")).expect("block the temp name");
        assert!(write_atomic(&path, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
    }

    #[test]
    fn readers_see_either_the_old_or_the_new_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bundle.pem");
        let old = vec![b'a'; 64 * 1024];
        let new = vec![b'b'; 64 * 1024];
        write_atomic(&path, &old, 0o644).expect("first write");
        let reader = {
            let (path, old, new) = (path.clone(), old.clone(), new.clone());
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    let seen = std::fs::read(&path).expect("read");
                    assert!(
                        seen == old || seen == new,
                        "a mixed or partial file was seen"
                    );
                }
            })
        };
        for i in 0..200 {
            write_atomic(&path, if i % 2 == 0 { &new } else { &old }, 0o644).expect("write");
        }
        reader.join().expect("reader");
    }
}
