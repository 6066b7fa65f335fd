//! The rights a process runs with, read from /proc/PID/status in one place: its user and
//! group IDs, capabilities and no_new_privs. A process that runs with more rights than its
//! user (a set-user-ID or set-group-ID program, capabilities) is not moved, checkpointed
//! into its user's file, nor frozen by its user (docs/security.md).

use super::MoveError;

/// What /proc/PID/status says of a process's rights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rights {
    /// Real, effective, saved and file-system user IDs; the same for groups.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub cap_eff: Option<u64>,
    pub cap_prm: Option<u64>,
    pub no_new_privs: bool,
}

impl Rights {
    /// The rights of process `pid` now (None: it is gone).
    pub fn of(pid: i32) -> Option<Rights> {
        let st = mosix_ckpt::procfs::status(pid).ok()?;
        let cap = |k: &str| {
            st.get(k)
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        Some(Rights {
            uid: mosix_ckpt::procfs::ids(st.get("Uid")),
            gid: mosix_ckpt::procfs::ids(st.get("Gid")),
            cap_eff: cap("CapEff"),
            cap_prm: cap("CapPrm"),
            no_new_privs: st.get("NoNewPrivs").map(String::as_str) == Some("1"),
        })
    }

    /// Whether these are exactly user `uid`'s rights: every user ID `uid`, its group IDs
    /// all one, and (unless `uid` is root) no capabilities; why not.
    pub fn only_users(&self, uid: u32) -> Result<(), String> {
        if self.uid.iter().any(|&x| x != uid) {
            return Err(format!("user IDs {:?}, its user is {uid}", self.uid));
        }
        if self.gid.iter().any(|&x| x != self.gid[0]) {
            return Err(format!("group IDs {:?}", self.gid));
        }
        if uid != 0 {
            for (k, v) in [("CapEff", self.cap_eff), ("CapPrm", self.cap_prm)] {
                if v != Some(0) {
                    return Err(format!(
                        "capabilities {k} {}",
                        v.map_or("unknown".into(), |v| format!("{v:016x}"))
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether process `pid` runs with exactly its user's rights ([`Rights::only_users`]). A
/// set-user-ID program of another user, a set-group-ID one or a process given
/// capabilities fails: away it would be restored with its user's rights only while its
/// deputy here kept the others; its image written into its user's file would give its user
/// the memory of a process with more rights; frozen by its user, it would be held by
/// someone who may not stop it.
pub(crate) fn own_rights_only(pid: i32, uid: u32) -> Result<(), MoveError> {
    let r = Rights::of(pid).ok_or(MoveError::Ended)?;
    r.only_users(uid).map_err(MoveError::Rights)
}

/// Process `pid`'s own no_new_privs.
pub(crate) fn no_new_privs(pid: i32) -> bool {
    Rights::of(pid).is_some_and(|r| r.no_new_privs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_are_the_users_own_or_not() {
        let me = Rights::of(std::process::id() as i32).unwrap();
        let uid = me.uid[0];
        // A test run by root has capabilities, as root may; a user's, none.
        assert_eq!(me.only_users(uid), Ok(()));
        let mut suid = me.clone();
        suid.uid = [65534, 0, 0, 65534];
        assert!(suid.only_users(65534).unwrap_err().contains("user IDs"));
        let mut sgid = me.clone();
        sgid.uid = [65534; 4];
        sgid.cap_eff = Some(0);
        sgid.cap_prm = Some(0);
        sgid.gid = [65534, 42, 42, 65534];
        assert!(sgid.only_users(65534).unwrap_err().contains("group IDs"));
        let mut caps = sgid.clone();
        caps.gid = [65534; 4];
        assert_eq!(caps.only_users(65534), Ok(()));
        caps.cap_prm = Some(1 << 21);
        assert!(caps.only_users(65534).unwrap_err().contains("CapPrm"));
        assert!(Rights::of(-1).is_none());
    }
}
