//! DFSA (direct file system access): files under a path that both the process's home and
//! its host share (a cluster file system mounted at the same path everywhere) are opened
//! where the process runs and used there, not through home (docs/transparency.md, "DFSA").
//!
//! The supervisor opens such a file itself, with the process's own credentials (file
//! system IDs, groups, umask), resolving the path beneath the shared directory (a symbolic
//! link that leads out of it, or `..` above it, sends the open home instead); home reserves
//! the descriptor's number (it holds /dev/null there), and the file is put at that number
//! in the process. Its reads, writes, seeks, stats and mappings are then made on the host,
//! natively. What must be made at home (a lock, which must outlive a move; a call that
//! mixes it with descriptors of home) first makes it home's: the deputy opens the same
//! file at the same number and offset ([`crate::wire::ToDeputy::Adopt`]); so does every
//! move, before the process leaves.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// A descriptor of the process that is a file of a shared path, opened on its host.
pub struct SharedFile {
    /// Its path (absolute, as opened).
    pub path: PathBuf,
    /// The supervisor's own reference to the same open file (offset and flags are the
    /// process's).
    pub file: OwnedFd,
}

/// The DFSA state of one process on its host.
#[derive(Default)]
pub struct Dfsa {
    /// Directories shared by its home and this host.
    roots: Vec<PathBuf>,
    /// Its working directory at home, when known (it resolves relative paths).
    cwd: Option<PathBuf>,
    /// It changed its root at home: nothing is opened here any more.
    off: bool,
    /// Its descriptors that are shared files opened here.
    pub files: HashMap<i32, SharedFile>,
    /// Files opened here so far (for figures).
    pub opened: u64,
}

/// Whether `p` is absolute and free of `..`.
fn plain(p: &Path) -> bool {
    p.is_absolute() && !p.components().any(|c| c == Component::ParentDir)
}

impl Dfsa {
    /// For a process whose home shares `home` and whose host shares `host`, with working
    /// directory `cwd` at home. The shared directories are those both list (the deeper
    /// of two nested ones).
    pub fn new(home: &[String], host: &[PathBuf], cwd: Option<PathBuf>) -> Dfsa {
        let mut roots = Vec::new();
        for h in home.iter().map(PathBuf::from) {
            for o in host {
                if !plain(&h) || !plain(o) {
                    continue;
                }
                let r = if h.starts_with(o) {
                    h.clone()
                } else if o.starts_with(&h) {
                    o.clone()
                } else {
                    continue;
                };
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
        }
        Dfsa {
            roots,
            cwd: cwd.filter(|c| plain(c)),
            off: false,
            files: HashMap::new(),
            opened: 0,
        }
    }

    /// Whether anything is opened here at all.
    pub fn enabled(&self) -> bool {
        !self.roots.is_empty() && !self.off
    }

    /// The shared directory `path` (relative to the working directory at home unless
    /// absolute) lies beneath, the rest of it below that directory, and the whole path.
    /// None: not a shared file (or not known to be one).
    pub fn place(&self, path: &[u8]) -> Option<(PathBuf, PathBuf, PathBuf)> {
        if !self.enabled() || path.is_empty() {
            return None;
        }
        let p = Path::new(std::ffi::OsStr::from_bytes(path));
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.cwd.as_ref()?.join(p)
        };
        if !plain(&abs) {
            return None;
        }
        let root = self
            .roots
            .iter()
            .filter(|r| abs.starts_with(r))
            .max_by_key(|r| r.components().count())?;
        let rel = abs.strip_prefix(root).ok()?.to_path_buf();
        if rel.as_os_str().is_empty() {
            // The shared directory itself.
            return None;
        }
        Some((root.clone(), rel, abs))
    }

    /// It changed its working directory at home to `path` (or, with None, to somewhere
    /// not known here).
    pub fn chdir(&mut self, path: Option<&[u8]>) {
        self.cwd = match path {
            Some(p) => {
                let p = Path::new(std::ffi::OsStr::from_bytes(p));
                let next = if p.is_absolute() {
                    Some(p.to_path_buf())
                } else {
                    self.cwd.as_ref().map(|c| c.join(p))
                };
                next.filter(|c| plain(c))
            }
            None => None,
        };
    }

    /// Its working directory at home, as far as it is known here.
    pub fn cwd(&self) -> Option<&Path> {
        self.cwd.as_deref()
    }

    /// It changed its root directory at home.
    pub fn chroot(&mut self) {
        self.off = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_are_the_paths_both_share_and_only_what_lies_plainly_beneath() {
        let d = Dfsa::new(
            &["/shared".into(), "/data/x".into(), "relative".into()],
            &[PathBuf::from("/shared/work"), PathBuf::from("/data")],
            Some(PathBuf::from("/shared/work/job")),
        );
        let at = |p: &str| d.place(p.as_bytes());
        let (r, rel, a) = at("/shared/work/in.txt").unwrap();
        assert_eq!(r, Path::new("/shared/work"));
        assert_eq!(rel, Path::new("in.txt"));
        assert_eq!(a, Path::new("/shared/work/in.txt"));
        // Relative to its working directory at home.
        assert_eq!(
            at("data/out.bin").unwrap().2,
            Path::new("/shared/work/job/data/out.bin")
        );
        assert_eq!(at("/data/x/y").unwrap().0, Path::new("/data/x"));
        // Only one of them shares it, `..`, the directory itself, elsewhere: home's.
        assert!(at("/shared/other").is_none());
        assert!(at("/data/z").is_none());
        assert!(at("/shared/work/../../etc/passwd").is_none());
        assert!(at("../x").is_none());
        assert!(at("/shared/work").is_none());
        assert!(at("/etc/passwd").is_none());
    }

    #[test]
    fn the_working_directory_is_followed_and_a_new_root_ends_it_all() {
        let mut d = Dfsa::new(&["/s".into()], &[PathBuf::from("/s")], None);
        assert!(d.place(b"f").is_none(), "working directory unknown");
        d.chdir(Some(b"/s/a"));
        d.chdir(Some(b"b"));
        assert_eq!(d.place(b"f").unwrap().2, Path::new("/s/a/b/f"));
        d.chdir(Some(b".."));
        assert!(d.place(b"f").is_none());
        d.chdir(Some(b"/s"));
        d.chdir(None);
        assert!(d.place(b"f").is_none());
        assert!(d.place(b"/s/f").is_some());
        d.chroot();
        assert!(d.place(b"/s/f").is_none());
    }
}
