//! The image's files, opened in the new process as the user it belongs to, and checked
//! after opening: fstat of the opened descriptor, not a look at the path before (which
//! could be raced, and made as root would tell about files the user cannot see).

use crate::error::{Error, Result};
use crate::image::FileId;
use crate::restore::{Builder, AT_MISC, AT_STR};
use crate::sys;

/// What fstat(2) in the new process says of one of its descriptors.
struct Stat {
    dev: u64,
    ino: u64,
    mode: u32,
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
}

impl Builder<'_> {
    /// Opens `path` in the new process (with its fs credentials, see [`crate::creds::enter`]),
    /// without blocking on a FIFO or device and without taking a terminal as its
    /// controlling one. Then checks the opened file (fstat of the descriptor): a FIFO,
    /// socket or block device is refused, and with `want` it must be that regular file
    /// (same device and inode; with `strict` also size and mtime). Returns the descriptor
    /// with the blocking mode of `flags`.
    pub(crate) fn open(
        &mut self,
        path: &str,
        flags: i32,
        want: Option<(&FileId, bool)>,
    ) -> Result<u64> {
        let p = self.put_str(AT_STR, path)?;
        let how = flags | libc::O_NONBLOCK | libc::O_NOCTTY;
        let args = [libc::AT_FDCWD as u64, p, how as u64, 0];
        let fd = match self.r.call("open", libc::SYS_openat, &args) {
            Err(Error::Remote { errno, .. }) => {
                return Err(Error::Open {
                    path: path.to_string(),
                    uid: self.fs_uid,
                    errno,
                })
            }
            r => r?,
        };
        let st = self.fstat(fd, path)?;
        let fmt = st.mode & libc::S_IFMT;
        let kind = match fmt {
            libc::S_IFIFO => Some("a FIFO"),
            libc::S_IFSOCK => Some("a socket"),
            libc::S_IFBLK => Some("a block device"),
            _ => None,
        };
        if let Some(kind) = kind {
            return Err(Error::Unrestorable(format!(
                "{path} is {kind}, not a file that can be reopened"
            )));
        }
        if let Some((id, strict)) = want {
            let here = FileId {
                dev: st.dev,
                ino: st.ino,
                size: st.size,
                mtime_sec: st.mtime_sec,
                mtime_nsec: st.mtime_nsec,
            };
            // A move between nodes finds the same programs and libraries as other inodes
            // of the same size and time; a restart on one machine wants the very file.
            let moving = !matches!(self.mode, crate::restore::Mode::Plain);
            let same = fmt == libc::S_IFREG
                && if moving {
                    id.matches(&here)
                } else {
                    st.dev == id.dev
                        && st.ino == id.ino
                        && (!strict
                            || (st.size == id.size
                                && st.mtime_sec == id.mtime_sec
                                && st.mtime_nsec == id.mtime_nsec))
                };
            if !same {
                return Err(Error::Unrestorable(format!(
                    "{path} is not the file it was at checkpoint time (it was replaced or changed)"
                )));
            }
        }
        // (F_SETFL does not apply to an O_PATH descriptor.)
        if flags & (libc::O_NONBLOCK | libc::O_PATH) == 0 {
            let keep = flags & (libc::O_APPEND | libc::O_DIRECT | libc::O_NOATIME);
            self.call(
                &format!("fcntl(F_SETFL) of {path}"),
                libc::SYS_fcntl,
                &[fd, libc::F_SETFL as u64, keep as u64],
            )?;
        }
        Ok(fd)
    }
    fn fstat(&mut self, fd: u64, path: &str) -> Result<Stat> {
        let at = self.scratch + AT_MISC;
        self.call(&format!("fstat of {path}"), libc::SYS_fstat, &[fd, at])?;
        // struct stat of x86_64.
        let mut b = [0u8; 144];
        if !sys::read_mem(self.pid, at, &mut b)? {
            return Err(Error::Unrestorable("the work area cannot be read".into()));
        }
        let word = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Ok(Stat {
            dev: word(0),
            ino: word(8),
            mode: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
            size: word(48),
            mtime_sec: word(88) as i64,
            mtime_nsec: word(96) as i64,
        })
    }
}
