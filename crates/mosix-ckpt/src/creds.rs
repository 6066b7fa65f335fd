//! Whose process a restore builds, and what it may do.
//!
//! An image is only a file: its checksums are not keyed, so whoever can write a file can
//! write an image that claims any uid, any groups and any paths. A restore therefore
//! decides the credentials of the new process by a [`CredPolicy`] given by the caller,
//! not by the image alone, and every path of the image is opened with the credentials
//! the process will have (its fs uid/gid and groups are set first, in the new process
//! itself), never with the restorer's.

use crate::error::{Error, Result};
use crate::image::Creds;
use crate::procfs;
use crate::restore::{Builder, AT_MISC};

/// A user: uid, primary gid and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Identity {
    /// The user `uid` as this machine's user database has them: primary gid from the
    /// passwd entry, supplementary groups by getgrouplist(3). A uid without a passwd
    /// entry is refused ([`Error::NoUser`]): there is no way to know its groups.
    pub fn of_uid(uid: u32) -> Result<Identity> {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .ok_or_else(|| Error::NoUser(format!("uid {uid}")))?;
        Self::of_user(&user)
    }

    /// The user called `name`, or with the uid `name` if it is a number.
    pub fn of_name(name: &str) -> Result<Identity> {
        if let Ok(uid) = name.parse::<u32>() {
            return Self::of_uid(uid);
        }
        let user = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| Error::NoUser(name.to_string()))?;
        Self::of_user(&user)
    }

    fn of_user(user: &nix::unistd::User) -> Result<Identity> {
        let name = std::ffi::CString::new(user.name.as_bytes())
            .map_err(|_| Error::NoUser(user.name.clone()))?;
        let groups = nix::unistd::getgrouplist(&name, user.gid)
            .map_err(|e| Error::NoUser(format!("{} (its groups: {e})", user.name)))?;
        Ok(Identity {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups: groups.iter().map(|g| g.as_raw()).collect(),
        })
    }

    /// Whether this user may have group `g` (primary or supplementary).
    pub fn has_gid(&self, g: u32) -> bool {
        g == self.gid || self.groups.contains(&g)
    }

    /// Whether `c` (uids, gids and groups of an image) are all this user's.
    pub fn covers(&self, c: &Creds) -> bool {
        c.uid.iter().all(|&u| u == self.uid)
            && c.gid.iter().all(|&g| self.has_gid(g))
            && c.groups.iter().all(|&g| self.has_gid(g))
    }
}

/// Who the restored process is.
///
/// `mosix restart` run by root uses [`CredPolicy::As`] with the owner of the image file
/// (or `--as-user`), and [`CredPolicy::FromImage`] only with `--trust-image` or for an
/// image file root owns that nobody else can write. A migration receiver passes the
/// user the (authenticated) home node says the process belongs to:
/// `CredPolicy::Within(Identity::of_uid(claimed_uid)?)` refuses an image that claims
/// anything else; `CredPolicy::As(..)` would run it as that user whatever it claims.
///
/// Whatever the policy, a restorer that is not root gets at most its own credentials:
/// an image whose uids or gids are not the caller's is refused before anything starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CredPolicy {
    /// The credentials the image records, as they are. Only for images the restorer
    /// wrote itself or otherwise knows to be genuine.
    #[default]
    FromImage,
    /// Run as this user whatever the image says (mapped, not refused): real, effective,
    /// saved and fs uid all become `uid`; each gid of the image is kept if the user has
    /// that group and becomes `gid` otherwise; supplementary groups are those of the
    /// image that the user has. An edited image cannot raise them; a genuine image of
    /// this user's process comes back as it was (a `newgrp` gid included). Capabilities
    /// are dropped unless `uid` is 0.
    As(Identity),
    /// The credentials the image records, but only if all of them are this user's
    /// (every uid equal to `uid`, every gid and group one the user has); otherwise the
    /// restore is refused ([`Error::Forbidden`]) before anything is created.
    /// Capabilities are dropped unless `uid` is 0.
    Within(Identity),
}

/// Credentials of a restore: the policy, and the capability sets to give the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredOptions {
    pub policy: CredPolicy,
    /// The capability sets to give the process ([`Caps::of_pid`] before its
    /// checkpoint), instead of those the image records (format 1.2; older images have
    /// none). None: the image's; for an image without them, what the credential change
    /// leaves, i.e. full root for uid 0 and nothing otherwise. Under [`CredPolicy::As`]
    /// and [`CredPolicy::Within`] with a uid other than 0 only the bounding set is kept.
    /// A restorer that is not root ignores the image's sets (it cannot set them).
    pub caps: Option<Caps>,
}

impl CredOptions {
    /// Trusts the image (the behaviour of [`crate::restore`]).
    pub fn from_image() -> Self {
        CredOptions::default()
    }
    /// Runs the process as `who` (see [`CredPolicy::As`]).
    pub fn as_user(who: Identity) -> Self {
        CredOptions {
            policy: CredPolicy::As(who),
            caps: None,
        }
    }
    /// Refuses an image that is not `who`'s (see [`CredPolicy::Within`]).
    pub fn within(who: Identity) -> Self {
        CredOptions {
            policy: CredPolicy::Within(who),
            caps: None,
        }
    }
}

/// The five capability sets of a process, as bit masks (bit n = capability n), as
/// the image records them (`ProcessImage::caps`, format 1.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Caps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

impl Caps {
    /// The capability sets of process `pid`, from /proc/PID/status.
    pub fn of_pid(pid: i32) -> Result<Caps> {
        let st = procfs::status(pid)?;
        let get = |k: &str| -> Result<u64> {
            st.get(k)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .ok_or_else(|| Error::Unrestorable(format!("no {k} in /proc/{pid}/status")))
        };
        Ok(Caps {
            inheritable: get("CapInh")?,
            permitted: get("CapPrm")?,
            effective: get("CapEff")?,
            bounding: get("CapBnd")?,
            ambient: get("CapAmb")?,
        })
    }
}

/// What a restore gives the process, decided before anything is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub creds: Creds,
    pub caps: Option<Caps>,
    /// setgroups(2) is possible (we are root); otherwise the process keeps ours.
    pub set_groups: bool,
}

/// The restorer: whether it is root, and its own real/effective/saved ids (for a
/// restorer that is not root).
pub(crate) struct Restorer {
    pub root: bool,
    pub uids: [u32; 3],
    pub gids: [u32; 3],
}

impl Restorer {
    pub fn current() -> Restorer {
        let (u, g) = (nix::unistd::getresuid(), nix::unistd::getresgid());
        let (uids, gids) = match (u, g) {
            (Ok(u), Ok(g)) => (
                [u.real, u.effective, u.saved].map(|x| x.as_raw()),
                [g.real, g.effective, g.saved].map(|x| x.as_raw()),
            ),
            _ => {
                let (u, g) = (nix::unistd::geteuid(), nix::unistd::getegid());
                ([u.as_raw(); 3], [g.as_raw(); 3])
            }
        };
        Restorer {
            root: uids[1] == 0,
            uids,
            gids,
        }
    }
}

fn describe(c: &Creds) -> String {
    let uids = if c.uid.iter().all(|&u| u == c.uid[0]) {
        c.uid[0].to_string()
    } else {
        format!("{:?}", c.uid)
    };
    let gids = if c.gid.iter().all(|&g| g == c.gid[0]) {
        c.gid[0].to_string()
    } else {
        format!("{:?}", c.gid)
    };
    format!("uid {uids}, gid {gids}, groups {:?}", c.groups)
}

/// Decides the credentials of the restored process from what the image records (its
/// credentials, and its capability sets if it has them: format 1.2).
pub(crate) fn plan(
    image: &Creds,
    image_caps: Option<Caps>,
    opts: &CredOptions,
    me: &Restorer,
) -> Result<Plan> {
    let creds = match &opts.policy {
        CredPolicy::FromImage => image.clone(),
        CredPolicy::As(who) => Creds {
            uid: [who.uid; 4],
            gid: image.gid.map(|g| if who.has_gid(g) { g } else { who.gid }),
            groups: image
                .groups
                .iter()
                .copied()
                .filter(|&g| who.has_gid(g))
                .collect(),
        },
        CredPolicy::Within(who) => {
            if !who.covers(image) {
                return Err(Error::Forbidden(format!(
                    "the image is of a process with {}, which are not all those of uid {}",
                    describe(image),
                    who.uid
                )));
            }
            image.clone()
        }
    };
    if !me.root {
        // What setresuid/setresgid allow without privilege (not a supplementary group).
        let ok = creds.uid.iter().all(|u| me.uids.contains(u))
            && creds.gid.iter().all(|g| me.gids.contains(g));
        if !ok {
            return Err(Error::Forbidden(format!(
                "the image is of a process with {}; you are uid {}: you can restore only your own processes",
                describe(image),
                me.uids[1]
            )));
        }
    }
    // The caller's sets, else the image's. A restorer that is not root cannot change
    // capability sets (dropping from the bounding set needs CAP_SETPCAP, capset cannot
    // raise): its process keeps the restorer's own, which is all a user can give.
    let caps = opts.caps.or(if me.root { image_caps } else { None });
    // A process that becomes a user other than root by the policy (mapped to, or checked
    // against, a user) gets no capabilities, whatever the image says: its owner could
    // not have had them. The bounding set is kept (it can only take away).
    let limited =
        !matches!(opts.policy, CredPolicy::FromImage) && creds.uid.iter().all(|&u| u != 0);
    let caps = caps.map(|c| {
        if limited {
            Caps {
                bounding: c.bounding,
                ..Caps::default()
            }
        } else {
            c
        }
    });
    Ok(Plan {
        creds,
        caps,
        set_groups: me.root,
    })
}

/// Sets fs uid/gid (and groups) to those of the process-to-be in the new process, so
/// that every path of the image is looked up and opened as that user. Other
/// capabilities stay (PR_SET_MM_MAP, setresuid need them): only the file-system ones go
/// with the fs uid, and come back for fs uid 0.
pub(crate) fn enter(b: &mut Builder, p: &Plan) -> Result<()> {
    let c = &p.creds;
    if p.set_groups {
        set_groups(b, &c.groups)?;
    }
    set_fs(b, c.uid[3], c.gid[3])
}

fn set_groups(b: &mut Builder, groups: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let at = b.put(AT_MISC, &bytes)?;
    b.call("setgroups", libc::SYS_setgroups, &[groups.len() as u64, at])?;
    Ok(())
}

/// setfsgid/setfsuid report no error: the id is read back to be sure it took.
fn set_fs(b: &mut Builder, uid: u32, gid: u32) -> Result<()> {
    for (nr, id, what) in [
        (libc::SYS_setfsgid, gid, "setfsgid"),
        (libc::SYS_setfsuid, uid, "setfsuid"),
    ] {
        b.r.raw(nr, &[id as u64])?;
        let now = b.r.raw(nr, &[u32::MAX as u64])?;
        if now != id as i64 {
            return Err(Error::Remote {
                pid: b.pid,
                what: format!("{what}({id})"),
                errno: libc::EPERM,
            });
        }
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The process's final credentials and capabilities; last of the restore steps.
pub(crate) fn finish(b: &mut Builder, p: &Plan) -> Result<()> {
    let c = &p.creds;
    let prctl = |b: &mut Builder, what: &str, args: [u64; 3]| {
        b.call(what, libc::SYS_prctl, &[args[0], args[1], args[2], 0, 0])
    };
    if let Some(caps) = &p.caps {
        // The bounding set while we are still root (needs CAP_SETPCAP).
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        for cap in 0..=last {
            if caps.bounding & (1 << cap) == 0 {
                let what = format!("dropping capability {cap} from the bounding set");
                prctl(b, &what, [libc::PR_CAPBSET_DROP as u64, cap as u64, 0])?;
            }
        }
        prctl(
            b,
            "prctl(PR_SET_KEEPCAPS)",
            [libc::PR_SET_KEEPCAPS as u64, 1, 0],
        )?;
    }
    if p.set_groups {
        set_groups(b, &c.groups)?;
    }
    b.call(
        "setresgid",
        libc::SYS_setresgid,
        &[c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64],
    )?;
    b.call(
        "setresuid",
        libc::SYS_setresuid,
        &[c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64],
    )?;
    // setres*id made the fs ids the effective ones; the image may have had others.
    if c.uid[3] != c.uid[1] || c.gid[3] != c.gid[1] {
        set_fs(b, c.uid[3], c.gid[3])?;
    }
    if let Some(caps) = &p.caps {
        let mut data = Vec::with_capacity(32);
        data.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_le_bytes());
        data.extend_from_slice(&0i32.to_le_bytes());
        for half in [0, 32] {
            for set in [caps.effective, caps.permitted, caps.inheritable] {
                data.extend_from_slice(&((set >> half) as u32).to_le_bytes());
            }
        }
        let hdr = b.put(AT_MISC, &data)?;
        b.call("capset", libc::SYS_capset, &[hdr, hdr + 8])?;
        for cap in (0..64).filter(|c| caps.ambient & (1u64 << c) != 0) {
            prctl(
                b,
                &format!("raising ambient capability {cap}"),
                [
                    libc::PR_CAP_AMBIENT as u64,
                    libc::PR_CAP_AMBIENT_RAISE as u64,
                    cap,
                ],
            )?;
        }
        prctl(
            b,
            "prctl(PR_SET_KEEPCAPS)",
            [libc::PR_SET_KEEPCAPS as u64, 0, 0],
        )?;
    }
    // A change of user makes the process undumpable; a normally started one is not.
    prctl(
        b,
        "prctl(PR_SET_DUMPABLE)",
        [libc::PR_SET_DUMPABLE as u64, 1, 0],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(uid: u32, gid: u32, groups: &[u32]) -> Creds {
        Creds {
            uid: [uid; 4],
            gid: [gid; 4],
            groups: groups.to_vec(),
        }
    }
    fn root() -> Restorer {
        Restorer {
            root: true,
            uids: [0; 3],
            gids: [0; 3],
        }
    }
    fn user(uid: u32) -> Identity {
        Identity {
            uid,
            gid: uid,
            groups: vec![uid, 27],
        }
    }
    const FULL: Caps = Caps {
        inheritable: 0,
        permitted: 0x1ff_ffff_ffff,
        effective: 0x1ff_ffff_ffff,
        bounding: 0xff,
        ambient: 0,
    };

    #[test]
    fn from_image_is_the_image() {
        let c = creds(0, 0, &[0, 6]);
        let opts = CredOptions {
            caps: Some(FULL),
            ..Default::default()
        };
        let p = plan(&c, None, &opts, &root()).unwrap();
        assert_eq!(p.creds, c);
        assert_eq!(p.caps, Some(FULL));
        assert!(p.set_groups);
    }

    #[test]
    fn as_user_maps_an_edited_image_down() {
        let opts = CredOptions {
            caps: Some(FULL),
            ..CredOptions::as_user(user(1000))
        };
        let p = plan(&creds(0, 0, &[0, 6, 27]), None, &opts, &root()).unwrap();
        assert_eq!(p.creds, creds(1000, 1000, &[27]));
        // No capabilities for a user, but the bounding set is kept.
        assert_eq!(
            p.caps,
            Some(Caps {
                bounding: 0xff,
                ..Caps::default()
            })
        );
        // A genuine image of the user's process, with a newgrp gid, is kept as it was.
        let mut mine = creds(1000, 27, &[1000, 27]);
        mine.uid[3] = 1000;
        let p = plan(&mine, None, &CredOptions::as_user(user(1000)), &root()).unwrap();
        assert_eq!(p.creds, mine);
    }

    #[test]
    fn within_refuses_anything_else() {
        let opts = CredOptions::within(user(1000));
        assert_eq!(
            plan(&creds(1000, 27, &[27]), None, &opts, &root())
                .unwrap()
                .creds,
            creds(1000, 27, &[27])
        );
        for bad in [
            creds(0, 1000, &[]),
            creds(1000, 0, &[]),
            creds(1000, 1000, &[6]),
        ] {
            let e = plan(&bad, None, &opts, &root()).unwrap_err().to_string();
            assert!(e.contains("not all those of uid 1000"), "{e}");
        }
        let mut half = creds(1000, 1000, &[]);
        half.uid[1] = 0;
        assert!(plan(&half, None, &opts, &root()).is_err());
    }

    #[test]
    fn a_user_restores_only_their_own() {
        let me = Restorer {
            root: false,
            uids: [1000; 3],
            gids: [1000; 3],
        };
        let p = plan(
            &creds(1000, 1000, &[27]),
            None,
            &CredOptions::default(),
            &me,
        )
        .unwrap();
        assert!(!p.set_groups);
        // A supplementary group is no gid a user can switch to.
        assert!(plan(&creds(1000, 27, &[]), None, &CredOptions::default(), &me).is_err());
        let e = plan(&creds(0, 0, &[0]), None, &CredOptions::default(), &me)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uid 0") && e.contains("you are uid 1000") && e.lines().count() == 1,
            "{e}"
        );
        assert!(plan(&creds(1000, 0, &[]), None, &CredOptions::default(), &me).is_err());
    }

    #[test]
    fn caps_of_the_image_apply_as_the_policy_allows() {
        const REDUCED: Caps = Caps {
            inheritable: 0,
            permitted: 0xe3,
            effective: 0xe3,
            bounding: 0xe3,
            ambient: 0,
        };
        let bounding_only = Some(Caps {
            bounding: 0xe3,
            ..Caps::default()
        });
        // A root process restored as it was, or within root: its reduced sets.
        let img = creds(0, 0, &[0]);
        let from_image = CredOptions::from_image();
        let p = plan(&img, Some(REDUCED), &from_image, &root()).unwrap();
        assert_eq!(p.caps, Some(REDUCED));
        let within_root = CredOptions::within(Identity {
            uid: 0,
            gid: 0,
            groups: vec![0],
        });
        let p = plan(&img, Some(REDUCED), &within_root, &root()).unwrap();
        assert_eq!(p.caps, Some(REDUCED));
        // The caller's sets win over the image's.
        let given = CredOptions {
            caps: Some(FULL),
            ..CredOptions::from_image()
        };
        assert_eq!(
            plan(&img, Some(REDUCED), &given, &root()).unwrap().caps,
            Some(FULL)
        );
        // An image of root's process (edited or not) restored as a user: no capabilities,
        // whatever the image claims; only its bounding set (which can only take away).
        let p = plan(
            &img,
            Some(REDUCED),
            &CredOptions::as_user(user(1000)),
            &root(),
        )
        .unwrap();
        assert_eq!(p.creds.uid, [1000; 4]);
        assert_eq!(p.caps, bounding_only);
        // A user's process that claims capabilities, checked within that user: the same.
        let mine = creds(1000, 1000, &[27]);
        let p = plan(&mine, Some(FULL), &CredOptions::within(user(1000)), &root()).unwrap();
        assert_eq!(
            p.caps,
            Some(Caps {
                bounding: 0xff,
                ..Caps::default()
            })
        );
        // A restorer that is not root leaves its process its own sets.
        let me = Restorer {
            root: false,
            uids: [1000; 3],
            gids: [1000; 3],
        };
        assert_eq!(
            plan(&mine, Some(FULL), &from_image, &me).unwrap().caps,
            None
        );
        // An image without them (format 1.1 and older): what the credential change leaves.
        assert_eq!(plan(&img, None, &from_image, &root()).unwrap().caps, None);
    }

    #[test]
    fn caps_of_this_process() {
        let c = Caps::of_pid(std::process::id() as i32).unwrap();
        assert_eq!(c.effective & !c.permitted, 0);
    }
}
