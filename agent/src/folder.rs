//! A folder opened once, and every file operation the volume does relative to its descriptor
//! (`openat`, `mkdirat`, `unlinkat`, `renameat`, `symlinkat`, `readlinkat`), never following a
//! symlink: whatever someone plants in a folder (a symlink to `/etc/shadow` or `/dev/zero`, a
//! FIFO, a folder swapped for a symlink between two calls), the agent never reads, writes,
//! removes or chmods anything outside the folder it opened.
//!
//! Reads open with `O_NOFOLLOW | O_NONBLOCK`, take only a regular file (checked on the open
//! descriptor) and at most [`MAX_FILE`] bytes of it, so a FIFO or a device never blocks the
//! caller nor fills its memory. New files get their final mode with `fchmod` on the open
//! descriptor (whatever the umask) before they are handed to their owner and written.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};

/// The largest file the volume reads (a chain, a key, a bundle): anything larger is refused.
pub const MAX_FILE: u64 = 1 << 20;

/// How deep [`Folder::remove_tree`] descends (the agent's own trees are two levels deep).
const MAX_DEPTH: usize = 8;

/// The type of a file, from `fstat`/`fstatat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A folder.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else: FIFO, socket, device.
    Other,
}

/// What `fstat` says about a file: its kind, mode bits, owner and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Its type.
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
}

impl From<FileStat> for Meta {
    fn from(st: FileStat) -> Self {
        let format = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let kind = match format {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Self {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
        }
    }
}

fn err(e: Errno) -> io::Error {
    io::Error::from(e)
}

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits)
}

/// One open folder; its path is kept for messages only.
#[derive(Debug)]
pub struct Folder {
    fd: OwnedFd,
    path: PathBuf,
}

impl Folder {
    /// Opens the folder at `path` (the operator's configured path: symlinks in it are
    /// followed, as for any configured path).
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// The folder's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this folder, for messages.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `fstat` of the folder itself.
    pub fn meta(&self) -> io::Result<Meta> {
        stat::fstat(self.fd()).map(Meta::from).map_err(err)
    }

    /// `fstatat` of `name` without following a symlink; `None` when nothing is there.
    pub fn meta_of(&self, name: &str) -> io::Result<Option<Meta>> {
        match stat::fstatat(self.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st.into())),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Sets the folder's mode (on the descriptor).
    pub fn chmod(&self, bits: u32) -> io::Result<()> {
        stat::fchmod(self.fd(), mode(bits)).map_err(err)
    }

    /// Gives the folder to `uid:gid` (on the descriptor).
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        unistd::fchown(
            self.fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )
        .map_err(err)
    }

    /// Flushes the folder's entries to disk.
    pub fn fsync(&self) -> io::Result<()> {
        unistd::fsync(self.fd()).map_err(err)
    }

    /// Creates the folder `name` (0700 until the caller sets its mode); `false` when something
    /// already exists there.
    pub fn create_dir(&self, name: &str) -> io::Result<bool> {
        match stat::mkdirat(self.fd(), name, mode(0o700)) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Opens the folder `name`; a symlink (or anything but a folder) there is an error.
    pub fn open_dir(&self, name: &str) -> io::Result<Folder> {
        let fd = fcntl::openat(
            self.fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        Ok(Folder {
            fd,
            path: self.join(name),
        })
    }

    /// Creates the file `name` (it must not exist), gives it `bits` with `fchmod` (whatever the
    /// umask), then to `owner` when given, and returns it open for writing.
    pub fn create_file(
        &self,
        name: &str,
        bits: u32,
        owner: Option<(u32, u32)>,
    ) -> io::Result<File> {
        let fd = fcntl::openat(
            self.fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            mode(0o600),
        )
        .map_err(err)?;
        // The mode first, while the agent owns the file: no CAP_FOWNER needed.
        stat::fchmod(fd.as_fd(), mode(bits)).map_err(err)?;
        if let Some((uid, gid)) = owner {
            unistd::fchown(
                fd.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
            .map_err(err)?;
        }
        Ok(File::from(fd))
    }

    /// Reads the regular file `name` (at most [`MAX_FILE`] bytes) and what `fstat` says of it,
    /// from the same descriptor. `None` when nothing is there. A symlink, a FIFO, a device or a
    /// larger file is an error, found without blocking.
    pub fn read_file(&self, name: &str) -> io::Result<Option<(Vec<u8>, Meta)>> {
        let fd = match fcntl::openat(
            self.fd(),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(io::Error::other(format!(
                    "{} is a symlink",
                    self.join(name).display()
                )));
            }
            Err(e) => return Err(err(e)),
        };
        let meta = Meta::from(stat::fstat(fd.as_fd()).map_err(err)?);
        if meta.kind != Kind::File {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                self.join(name).display()
            )));
        }
        if meta.size > MAX_FILE {
            return Err(io::Error::other(format!(
                "{} is larger than {MAX_FILE} bytes",
                self.join(name).display()
            )));
        }
        let mut bytes = Vec::new();
        File::from(fd).take(MAX_FILE + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(io::Error::other(format!(
                "{} grew past {MAX_FILE} bytes",
                self.join(name).display()
            )));
        }
        Ok(Some((bytes, meta)))
    }

    /// The target of the symlink `name`; `None` when there is none (or it is not a symlink).
    pub fn read_link(&self, name: &str) -> Option<PathBuf> {
        fcntl::readlinkat(self.fd(), name).ok().map(PathBuf::from)
    }

    /// Creates the symlink `name` pointing at `target`.
    pub fn symlink(&self, target: &Path, name: &str) -> io::Result<()> {
        unistd::symlinkat(target, self.fd(), name).map_err(err)
    }

    /// Renames `from` to `to` inside this folder, replacing what `to` was (not a folder).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fcntl::renameat(self.fd(), from, self.fd(), to).map_err(err)
    }

    /// Removes the non-folder `name`; nothing there is fine.
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        match unistd::unlinkat(self.fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// The names in this folder (without `.` and `..`) and whether each is a folder (as
    /// `lstat` says: a symlink to a folder is not one).
    pub fn list(&self) -> io::Result<Vec<(String, bool)>> {
        let mut dir = nix::dir::Dir::openat(
            self.fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(err)?;
            let bytes = entry.file_name().to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let Some(name) = OsStr::from_bytes(bytes).to_str() else {
                // Not UTF-8: never one of the agent's names; listed so it can be removed.
                names.push((String::from_utf8_lossy(bytes).into_owned(), false));
                continue;
            };
            let is_dir = match entry.file_type() {
                Some(nix::dir::Type::Directory) => true,
                Some(_) => false,
                None => self.meta_of(name)?.is_some_and(|m| m.kind == Kind::Dir),
            };
            names.push((name.to_owned(), is_dir));
        }
        Ok(names)
    }

    /// Removes `name` and, when it is a folder, everything under it, each step relative to an
    /// open folder and never through a symlink. A folder that is not the agent's is first taken
    /// back (chown, needs `CAP_CHOWN` when the agent is not root) so that it can be emptied.
    /// Nothing there is fine.
    pub fn remove_tree(&self, name: &str) -> io::Result<()> {
        self.remove_tree_at(name, 0)
    }

    fn remove_tree_at(&self, name: &str, depth: usize) -> io::Result<()> {
        match unistd::unlinkat(self.fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
            Err(e) => return Err(err(e)),
        }
        if depth >= MAX_DEPTH {
            return Err(io::Error::other(format!(
                "{} is nested deeper than {MAX_DEPTH} folders",
                self.join(name).display()
            )));
        }
        let sub = self.open_dir(name)?;
        let (uid, gid) = crate::sys::current_owner();
        let meta = sub.meta()?;
        if meta.uid != uid {
            let _ = sub.chown(uid, gid);
        }
        if meta.mode & 0o700 != 0o700 {
            sub.chmod(0o700)?;
        }
        for (child, _) in sub.list()? {
            sub.remove_tree_at(&child, depth + 1)?;
        }
        match unistd::unlinkat(self.fd(), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn new_files_get_their_mode_whatever_the_umask() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let folder = Folder::open(tmp.path()).expect("open");
        // 0666 is what any umask but 0 would cut (the e2e tests run the agent under 077).
        let mut file = folder.create_file("cert.pem", 0o666, None).expect("create");
        file.write_all(b"x").expect("write");
        let meta = std::fs::metadata(tmp.path().join("cert.pem")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
        assert!(
            folder.create_file("cert.pem", 0o444, None).is_err(),
            "never reopened"
        );
    }

    /// A key's file has its final mode before its first byte: the descriptor handed back for
    /// writing already carries it (never chmod-ed once something readable is in it).
    #[test]
    fn a_file_has_its_final_mode_before_its_first_byte() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let folder = Folder::open(tmp.path()).expect("open");
        for bits in [0o400, 0o440] {
            let name = format!("key-{bits:o}");
            let file = folder.create_file(&name, bits, None).expect("create");
            let meta = file.metadata().expect("fstat");
            assert_eq!(meta.len(), 0, "nothing written yet");
            assert_eq!(meta.permissions().mode() & 0o7777, bits, "{name}");
        }
    }

    #[test]
    fn reads_refuse_symlinks_fifos_devices_and_large_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), b"secret").expect("write");
        let dir = tmp.path().join("folder");
        std::fs::create_dir(&dir).expect("mkdir");
        std::os::unix::fs::symlink(outside.join("secret"), dir.join("link")).expect("symlink");
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).expect("symlink");
        nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o644)).expect("fifo");
        std::fs::write(dir.join("big"), vec![0_u8; MAX_FILE as usize + 1]).expect("write");
        std::fs::write(dir.join("ok"), b"fine").expect("write");
        let folder = Folder::open(&dir).expect("open");
        for name in ["link", "zero", "fifo", "big"] {
            assert!(folder.read_file(name).is_err(), "{name} was read");
        }
        assert_eq!(folder.read_file("missing").expect("no error"), None);
        let (bytes, meta) = folder.read_file("ok").expect("read").expect("present");
        assert_eq!(bytes, b"fine");
        assert_eq!(meta.kind, Kind::File);
    }

    #[test]
    fn remove_tree_never_leaves_the_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"keep").expect("write");
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
        std::fs::write(tree.join("a/b/file"), b"x").expect("write");
        std::os::unix::fs::symlink(&outside, tree.join("a/to-outside")).expect("symlink");
        std::fs::set_permissions(tree.join("a"), std::fs::Permissions::from_mode(0o500))
            .expect("chmod");
        let root = Folder::open(tmp.path()).expect("open");
        root.remove_tree("tree").expect("removed");
        assert!(!tree.exists());
        assert_eq!(std::fs::read(outside.join("keep")).expect("kept"), b"keep");
        // A symlink named like the tree is removed, not followed.
        std::os::unix::fs::symlink(&outside, tmp.path().join("tree")).expect("symlink");
        root.remove_tree("tree").expect("removed");
        assert!(outside.join("keep").exists());
        root.remove_tree("tree").expect("nothing there is fine");
    }
}
