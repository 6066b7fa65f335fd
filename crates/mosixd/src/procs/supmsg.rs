//! What mosixd and a supervisor (supervisor.rs) say to each other over the supervisor's
//! connection.

use mosix_proto::wire::{self, Frame, MigrateHeader};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What the supervisor restores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum SupMode {
    /// A guest: restored away, supervised until it ends or moves on.
    Guest,
    /// A process coming home: rebuilt inside its deputy `pid`; `deputy` is the deputy's
    /// exec (path, argv, envp) in case it must be made the deputy again.
    Into {
        pid: i32,
        deputy: (String, Vec<String>, Vec<String>),
        /// `mosrun -R`: descriptors held at home in the image that are reopened instead
        /// (regular files, at their offsets): (number, path, flags, offset).
        #[serde(default)]
        reopen: Vec<(i32, String, i32, u64)>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SupStart {
    pub header: MigrateHeader,
    pub mode: SupMode,
    /// The most bytes of image it may hold.
    pub limit: u64,
    /// Where it listens for mosixd once it supervises (after a restart of mosixd).
    pub socket: PathBuf,
    /// This node's shared paths (DFSA: with the home's, where files are used here).
    pub shared_paths: Vec<PathBuf>,
    /// The link's receiving side, lent: the image is read from the link itself, whose
    /// socket follows `Start` (SCM_RIGHTS), not relayed by mosixd; what was read beyond
    /// it is given back ([`FromSup::ImageRead`]) before the tail.
    pub link: Option<mosix_proto::transport::RecvLend>,
}

/// mosixd to supervisor. After `Start` come the image's chunks and its [`Tail`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ToSup {
    Start(Box<SupStart>),
    Commit,
    Abort,
    /// A frame from the deputy.
    Deputy(Frame),
    /// The process is frozen for a move: cancel its calls at home, say what was done.
    Quiesce,
    /// The move failed: it goes on here.
    Thaw,
    /// It moved on (its copy here is ended by the mover): exit quietly.
    Moved,
    /// End it (its deputy is gone).
    Kill,
    /// The way home was broken and is back: send the waiting calls again.
    Relinked,
    /// mosixd mapped the arena ([`FromSup::Arena`]): data of writes behind may be left
    /// there from now on.
    ArenaTaken,
}

/// Supervisor to mosixd.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromSup {
    Ready {
        host_pid: i32,
    },
    Refused(String),
    Running,
    /// A frame for the deputy.
    Deputy(Frame),
    /// It made a call that can only be made at home: bring it home.
    GoHome {
        why: String,
    },
    /// Its calls at home cannot be settled: the move cannot be made.
    Unquiesced {
        why: String,
    },
    /// Its calls at home are settled: those done meanwhile (TID, result) and the next
    /// sequence number.
    Quiesced {
        completed: Vec<(i32, i64)>,
        next_seq: u64,
        proc_fds: Vec<(i32, String)>,
        /// Its working directory at home, as known here (see [`Tail::cwd`]).
        cwd: Option<String>,
    },
    /// It ended (the deputy was told).
    Exited,
    /// Coming home: its memory is all in (it may move again).
    Filled,
    /// Who it supervises (first message on a new connection, after a restart of mosixd).
    Hello {
        header: MigrateHeader,
        host_pid: i32,
    },
    /// The image was read from the lent link: the number of the link's next frame, and
    /// what was read beyond the image (plaintext, then bytes of frames not opened).
    ImageRead {
        nonce: u64,
        plain: Vec<u8>,
        raw: Vec<u8>,
    },
    /// Reading the image from the lent link failed: the link can only be dropped.
    LinkLost(String),
    /// Its arena (mosix_remote::arena): descriptor `fd` of the supervisor (process
    /// `pid`), `cap` bytes of data, `token` in its header. Sent first on each connection.
    Arena {
        pid: i32,
        fd: i32,
        cap: u64,
        token: u64,
    },
    /// A frame for the deputy whose data is in the arena: `head`, the `len` bytes at
    /// offset `at` of the arena, then `tail`. Message number `seq` of this kind (mosixd
    /// tells the arena it took it once it copied them out).
    DeputyInArena {
        seq: u64,
        head: Vec<u8>,
        at: u64,
        len: u64,
        tail: Vec<u8>,
    },
}

impl ToSup {
    /// The index of [`ToSup::Deputy`] (for `wire::recv_framed`).
    pub const DEPUTY: u32 = 3;
    /// Reads one message from mosixd (a deputy's frame without a copy).
    pub fn recv<R: std::io::Read>(r: &mut R) -> std::io::Result<Option<ToSup>> {
        wire::recv_framed(r, Self::DEPUTY, ToSup::Deputy)
    }
}

impl FromSup {
    /// The index of [`FromSup::Deputy`] (for `wire::send_wrapped`).
    pub const DEPUTY: u32 = 3;
    /// Reads one message from a supervisor (a frame for the deputy without a copy).
    pub fn recv<R: std::io::Read>(r: &mut R) -> std::io::Result<FromSup> {
        wire::recv_framed(r, Self::DEPUTY, FromSup::Deputy)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )
        })
    }
}

#[cfg(test)]
#[test]
fn deputy_frames_have_the_indexes_the_fast_paths_use() {
    let f: Frame = b"xyz".to_vec().into();
    let mut a = Vec::new();
    wire::send(&mut a, &ToSup::Deputy(f.clone())).unwrap();
    let mut b = Vec::new();
    wire::send_frame(&mut b, ToSup::DEPUTY, &f).unwrap();
    assert_eq!(a, b);
    let m = mosix_remote::wire::ToDeputy::Cancel { seq: 7 };
    let mut a = Vec::new();
    wire::send(
        &mut a,
        &FromSup::Deputy(mosix_remote::wire::encode(&m).into()),
    )
    .unwrap();
    let mut b = Vec::new();
    wire::send_wrapped(&mut b, FromSup::DEPUTY, &m).unwrap();
    assert_eq!(a, b);
}
