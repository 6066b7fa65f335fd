//! Memory a supervisor shares with its mosixd for the data of its writes behind
//! (streams.rs): the supervisor reads a write's bytes from the process straight into it,
//! keeps them there until home made the write, and tells mosixd where they are; mosixd
//! copies them from there into the link's frame. Before, each megabyte crossed the socket
//! between them: a copy into the socket and one out of it, on a host whose CPU is what
//! bounds forwarded writes (docs/transparency.md).
//!
//! A memfd (`mosix-arena`), mapped by the supervisor (read and write) and by mosixd (the
//! data read-only; its first page, the header, read and write). Space is a ring of
//! positions that only grow; a piece is given back when its bytes are no longer kept
//! ([`Arena::alloc`]'s buffer dropped) **and** mosixd has taken them if they were sent to
//! it: mosixd writes into the header the number after the last message of this kind it
//! took ([`ArenaView::taken`]), and each piece sent knows the number of its last message
//! ([`Arena::sent`]). A piece is never written again before mosixd copied it, whatever
//! happens to the write it carried.
//!
//! Both processes are root and ours; the data mosixd reads are bytes it passes on, and
//! every position it is told is checked against the arena's size.

use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The header: the page before the data (the count of messages mosixd took, then the
/// arena's token).
pub const HEADER: usize = 4096;
/// The name of the memfd (in /proc/PID/fd of the supervisor).
pub const NAME: &str = "mosix-arena";
/// The size of an arena's data: two streams' windows of writes behind
/// (streams::WINDOW); a write that finds it full goes as before (in the heap, through
/// the socket).
pub const SIZE: usize = 16 << 20;
/// An arena unused this long gives its memory back ([`Arena::trim`]).
pub const QUIET: Duration = Duration::from_secs(2);
/// Writes smaller than this go through the socket: the arena saves copies of large ones.
pub const MIN_PIECE: usize = 64 << 10;

/// The header's counter (its first 8 bytes): how far the reader of the arena is done,
/// which only the reader stores to, atomically, and the writer loads.
fn counter(map: &memmap2::MmapRaw) -> &AtomicU64 {
    // SAFETY: every map of an arena starts at its header (page aligned, at least 8 bytes
    // long), so its first 8 bytes are an aligned u64 that lives as long as `map`; both
    // processes touch it only atomically.
    unsafe { &*(map.as_mut_ptr() as *const AtomicU64) }
}

/// One piece handed out, by position.
#[derive(Debug)]
struct Piece {
    pos: u64,
    len: usize,
    /// Its buffer was dropped.
    freed: bool,
    /// The number of the last message that told mosixd of it.
    sent: Option<u64>,
}

#[derive(Debug, Default)]
struct Ring {
    /// The position of the next piece (positions grow; `pos % cap` is the offset).
    tail: u64,
    pieces: VecDeque<Piece>,
    /// `tail` when the arena's memory was last given back (nothing handed out since).
    trimmed_at: Option<u64>,
    /// When a piece was last handed out.
    last_alloc: Option<Instant>,
}

impl Ring {
    /// Forgets the pieces at the front that may be written again: given back, and taken
    /// by mosixd (message number below `taken`) if they were sent.
    fn reclaim(&mut self, taken: u64) {
        while let Some(p) = self.pieces.front() {
            if p.freed && p.sent.is_none_or(|s| s < taken) {
                self.pieces.pop_front();
            } else {
                break;
            }
        }
    }
}

/// The supervisor's side.
pub struct Arena {
    file: File,
    /// The whole memfd, header first.
    map: memmap2::MmapRaw,
    cap: usize,
    /// A random number in its header, which mosixd checks: the arena it opened is the
    /// one it was told of.
    token: u64,
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arena({} bytes)", self.cap)
    }
}

impl Arena {
    /// A new arena of `cap` bytes of data.
    pub fn new(cap: usize) -> io::Result<Arc<Arena>> {
        let fd = memfd_create(
            c"mosix-arena",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len((HEADER + cap) as u64)?;
        // Its size is fixed for good: whoever else holds it (the deputy at home, a user's
        // process) cannot shrink it under our map (a SIGBUS here) nor seal it further.
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_SHRINK
                    | nix::fcntl::SealFlag::F_SEAL_GROW
                    | nix::fcntl::SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let map = memmap2::MmapOptions::new()
            .len(HEADER + cap)
            .map_raw(&file)?;
        use std::hash::BuildHasher;
        let token = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        // SAFETY: bytes 8..16 of the header, within the map, aligned; no one else
        // writes them (mosixd only reads the token).
        unsafe { (map.as_mut_ptr().add(8) as *mut u64).write(token) };
        Ok(Arc::new(Arena {
            file,
            map,
            cap,
            token,
            ring: Mutex::new(Ring::default()),
        }))
    }

    /// The number mosixd checks in the header it mapped.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The descriptor mosixd opens (through /proc/PID/fd) and the size of its data.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn taken(&self) -> u64 {
        counter(&self.map).load(Ordering::Acquire)
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for `len` bytes, or None (full: the caller keeps them elsewhere). Never
    /// split at the end of the ring: a piece is contiguous.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<ArenaBuf> {
        if len == 0 || len > self.cap {
            return None;
        }
        let taken = self.taken();
        let mut r = self.ring();
        r.reclaim(taken);
        let cap = self.cap as u64;
        let mut pos = r.tail;
        if pos % cap + len as u64 > cap {
            pos = pos.next_multiple_of(cap);
        }
        let head = r.pieces.front().map_or(pos, |p| p.pos);
        if pos + len as u64 - head > cap {
            return None;
        }
        r.tail = pos + len as u64;
        r.last_alloc = Some(Instant::now());
        r.pieces.push_back(Piece {
            pos,
            len,
            freed: false,
            sent: None,
        });
        let at = HEADER + (pos % cap) as usize;
        Some(ArenaBuf {
            arena: self.clone(),
            pos,
            // SAFETY: at + len <= HEADER + cap, within the map.
            ptr: unsafe { self.map.as_mut_ptr().add(at) },
            len,
        })
    }

    /// Where `data` lies in the arena's data (offset, length), if it does.
    pub fn locate(&self, data: &[u8]) -> Option<(u64, u64)> {
        let base = self.map.as_ptr() as usize + HEADER;
        let p = data.as_ptr() as usize;
        if data.is_empty() || p < base || p + data.len() > base + self.cap {
            return None;
        }
        Some(((p - base) as u64, data.len() as u64))
    }

    /// Message number `seq` tells mosixd of the bytes at offset `at`: their piece is
    /// kept until mosixd took it.
    pub fn sent(&self, at: u64, seq: u64) {
        let cap = self.cap as u64;
        let mut r = self.ring();
        if let Some(p) = r
            .pieces
            .iter_mut()
            .find(|p| (p.pos % cap..p.pos % cap + p.len as u64).contains(&at))
        {
            p.sent = Some(p.sent.map_or(seq, |s| s.max(seq)));
        }
    }

    fn free(&self, pos: u64) {
        let mut r = self.ring();
        if let Some(p) = r.pieces.iter_mut().find(|p| p.pos == pos) {
            p.freed = true;
        }
    }

    /// Gives the arena's memory back to the system (its pages read as zeros again) when
    /// no piece is held and none was handed out for `quiet`: a process that stopped
    /// writing does not keep its supervisor's pages. Whether it did.
    pub fn trim(&self, quiet: Duration) -> bool {
        let taken = self.taken();
        let mut r = self.ring();
        r.reclaim(taken);
        if !r.pieces.is_empty()
            || r.trimmed_at == Some(r.tail)
            || r.last_alloc.is_some_and(|t| t.elapsed() < quiet)
        {
            return false;
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.file, punch, HEADER as i64, self.cap as i64).is_err() {
            return false;
        }
        r.trimmed_at = Some(r.tail);
        true
    }

    /// Pieces handed out and not yet given back (for tests and figures).
    pub fn pieces(&self) -> usize {
        self.ring().pieces.len()
    }

    /// mosixd at home: a copy of `data` in a piece that message `seq` tells the deputy
    /// of (its offset), kept until the deputy says it is done with it
    /// ([`ArenaMap`]); None when the arena is full.
    pub fn put(self: &Arc<Self>, data: &[u8], seq: u64) -> Option<u64> {
        let mut b = self.alloc(data.len())?;
        // SAFETY: the piece's own room, `data.len()` bytes, which no one else reads yet.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.as_mut_ptr(), data.len()) };
        let (at, _) = self.locate(b.as_ref())?;
        self.sent(at, seq);
        Some(at)
    }

    /// A descriptor of the arena, to hand to the process that reads it.
    pub fn share(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.file.as_fd().try_clone_to_owned()
    }
}

/// A piece of the arena, the supervisor's alone until dropped (then kept until mosixd
/// took it, if it was sent).
pub struct ArenaBuf {
    arena: Arc<Arena>,
    pos: u64,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the piece is memory of the arena's map, which its Arc keeps mapped; no other
// ArenaBuf covers it, and the only other process reading it (mosixd) never writes it.
unsafe impl Send for ArenaBuf {}
// SAFETY: as for Send; shared use is read-only.
unsafe impl Sync for ArenaBuf {}

impl ArenaBuf {
    /// The piece's room, to fill (before it is shared).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
}

impl AsRef<[u8]> for ArenaBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes of the map at `ptr` are this piece's alone (see Send).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for ArenaBuf {
    fn drop(&mut self) {
        self.arena.free(self.pos);
    }
}

/// mosixd's side: the supervisor's arena, mapped from its descriptor.
pub struct ArenaView {
    header: memmap2::MmapRaw,
    data: memmap2::Mmap,
}

impl ArenaView {
    /// The arena the supervisor `pid` has at descriptor `fd`, of `cap` bytes of data:
    /// opened through /proc (it must be an arena memfd, of that size, whose header holds
    /// `token`).
    pub fn open(pid: i32, fd: i32, cap: u64, token: u64) -> io::Result<ArenaView> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let link = std::fs::read_link(&path)?;
        if !link
            .to_string_lossy()
            .starts_with(&format!("/memfd:{NAME} "))
        {
            return Err(io::Error::other(format!(
                "{path} is {}, not an arena",
                link.display()
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        if cap == 0 || len != HEADER as u64 + cap {
            return Err(io::Error::other("the arena's size is not the one told"));
        }
        let header = memmap2::MmapOptions::new().len(HEADER).map_raw(&file)?;
        // SAFETY: a shared map of the memfd; its bytes may change under us only where
        // the supervisor fills pieces not yet told (which we do not read), and we copy
        // what we read out at once.
        let data = unsafe {
            memmap2::MmapOptions::new()
                .offset(HEADER as u64)
                .len(cap as usize)
                .map(&file)?
        };
        // SAFETY: bytes 8..16 of the header map, aligned, written once by the
        // supervisor before it told of the arena.
        if unsafe { (header.as_ptr().add(8) as *const u64).read() } != token {
            return Err(io::Error::other("the arena's token is not the one told"));
        }
        Ok(ArenaView { header, data })
    }

    /// The `len` bytes at offset `at`, if within the arena.
    pub fn slice(&self, at: u64, len: u64) -> Option<&[u8]> {
        let end = at.checked_add(len)?;
        self.data.get(at as usize..usize::try_from(end).ok()?)
    }

    /// The message number `seq` was taken (its bytes copied out): its piece, and those
    /// of earlier messages, may be written again.
    pub fn taken(&self, seq: u64) {
        counter(&self.header).fetch_max(seq + 1, Ordering::Release);
    }
}

/// The deputy's side of the arena its mosixd at home keeps for it: the data of a write
/// behind arrives there ([`crate::wire::ToDeputy::BehindInArena`]) instead of through
/// the socket, and the deputy writes it to the file from there. Each piece is held until
/// its write is made (its [`bytes::Bytes`] dropped); the header then says how far every
/// piece is done, which is when mosixd may write that room again.
///
/// The deputy is the user's process: it could write into the arena (only data of its own
/// writes is there) or store any number in the header, which only makes mosixd reuse
/// room of this arena sooner or later. The memfd's size is sealed, so it cannot make
/// mosixd's map fault.
pub struct ArenaMap {
    map: memmap2::MmapRaw,
    cap: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// Pieces arrived and not yet done, by message number.
    pieces: std::collections::BTreeSet<u64>,
    /// The number after the last piece that arrived.
    next: u64,
}

impl ArenaMap {
    /// Maps the arena given as `fd` (the descriptor may be closed after).
    pub fn open(fd: &std::os::fd::OwnedFd) -> io::Result<Arc<ArenaMap>> {
        let len = nix::sys::stat::fstat(fd)?.st_size;
        let len = usize::try_from(len).unwrap_or(0);
        if len <= HEADER {
            return Err(io::Error::other("the arena is too small"));
        }
        let map = memmap2::MmapOptions::new().len(len).map_raw(fd)?;
        Ok(Arc::new(ArenaMap {
            map,
            cap: len - HEADER,
            held: Mutex::new(Held::default()),
        }))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `len` bytes at offset `at` that message `seq` told of, held until the last
    /// of their `Bytes` is dropped; None if they are not within the arena.
    pub fn piece(self: &Arc<Self>, at: u64, len: u64, seq: u64) -> Option<bytes::Bytes> {
        let end = at.checked_add(len)?;
        if len == 0 || end > self.cap as u64 {
            return None;
        }
        let mut h = self.held();
        h.pieces.insert(seq);
        h.next = h.next.max(seq + 1);
        drop(h);
        Some(bytes::Bytes::from_owner(MapPiece {
            map: self.clone(),
            // SAFETY: HEADER + end <= the map's length (checked above).
            ptr: unsafe { self.map.as_ptr().add(HEADER + at as usize) },
            len: len as usize,
            seq,
        }))
    }

    fn done(&self, seq: u64) {
        let mut h = self.held();
        h.pieces.remove(&seq);
        let upto = h.pieces.first().copied().unwrap_or(h.next);
        counter(&self.map).fetch_max(upto, Ordering::Release);
    }
}

/// A piece of the arena the deputy holds.
struct MapPiece {
    map: Arc<ArenaMap>,
    ptr: *const u8,
    len: usize,
    seq: u64,
}

// SAFETY: memory of the map, which the Arc keeps mapped; mosixd does not write it again
// before the piece is dropped (see ArenaMap), and we only read it.
unsafe impl Send for MapPiece {}
// SAFETY: as for Send; read-only.
unsafe impl Sync for MapPiece {}

impl AsRef<[u8]> for MapPiece {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes of the map at `ptr`, kept as long as this piece (see Send).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for MapPiece {
    fn drop(&mut self) {
        self.map.done(self.seq);
    }
}

/// Writes `line` on `sock` with `fd` attached (mosixd's answer to a deputy's hello that
/// gives it its arena).
pub fn send_line_with_fd(
    sock: &std::os::unix::net::UnixStream,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(line)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    // The descriptor went with the first bytes; the rest, if any, as usual.
    io::Write::write_all(&mut &*sock, &line[n..])
}

/// Reads one line from `sock` byte by byte (nothing after it is taken), with the
/// descriptor that came with it, if any (close-on-exec). An empty line: the other end
/// closed first.
pub fn recv_line_with_fd(
    sock: &std::os::unix::net::UnixStream,
) -> io::Result<(String, Option<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut line = Vec::new();
    let mut got: Option<std::os::fd::OwnedFd> = None;
    loop {
        let mut b = [0u8; 1];
        let mut cspace = nix::cmsg_space!([RawFd; 2]);
        let (n, fds) = {
            let mut iov = [io::IoSliceMut::new(&mut b)];
            let m = recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cspace),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for c in m.cmsgs()? {
                if let ControlMessageOwned::ScmRights(v) = c {
                    fds.extend(v);
                }
            }
            (m.bytes, fds)
        };
        for fd in fds {
            // SAFETY: a descriptor the kernel just installed for us; we own it.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            if got.is_none() {
                got = Some(fd);
            }
        }
        if n == 0 {
            break;
        }
        line.push(b[0]);
        if b[0] == b'\n' || line.len() > 64 << 10 {
            break;
        }
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), got))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(b: &mut ArenaBuf, v: u8) {
        // SAFETY: the piece's own room, len bytes.
        unsafe { std::ptr::write_bytes(b.as_mut_ptr(), v, b.len) };
    }

    #[test]
    fn pieces_are_reused_only_once_dropped_and_taken() {
        let a = Arena::new(1 << 20).unwrap();
        let view = ArenaView::open(std::process::id() as i32, a.fd(), 1 << 20, a.token()).unwrap();
        let mut x = a.alloc(600 << 10).unwrap();
        fill(&mut x, 7);
        let x: bytes::Bytes = bytes::Bytes::from_owner(x);
        let (at, len) = a.locate(&x).unwrap();
        assert_eq!((at, len), (0, 600 << 10));
        assert_eq!(view.slice(at, len).unwrap(), &x[..]);
        a.sent(at, 0);
        // No room for another 600 KiB while the first is kept.
        assert!(a.alloc(600 << 10).is_none());
        drop(x);
        // Dropped, but mosixd has not taken it: still kept.
        assert!(a.alloc(600 << 10).is_none());
        view.taken(0);
        let mut y = a.alloc(600 << 10).unwrap();
        fill(&mut y, 9);
        // Not split at the end: it starts over at the beginning.
        assert_eq!(a.locate(y.as_ref()).unwrap().0, 0);
        // A piece never sent is given back when dropped.
        let z = a.alloc(300 << 10).unwrap();
        let zpos = a.locate(z.as_ref()).unwrap().0;
        assert_eq!(zpos, 600 << 10);
        drop(y);
        drop(z);
        assert!(a.alloc(1 << 20).is_some());
        assert_eq!(a.pieces(), 1);
    }

    #[test]
    fn a_deputys_pieces_are_written_again_only_when_it_is_done_with_them() {
        let a = Arena::new(1 << 20).unwrap();
        let map = ArenaMap::open(&a.share().unwrap()).unwrap();
        let one = vec![1u8; 400 << 10];
        let two = vec![2u8; 400 << 10];
        let at1 = a.put(&one, 0).unwrap();
        let at2 = a.put(&two, 1).unwrap();
        let p1 = map.piece(at1, one.len() as u64, 0).unwrap();
        let p2 = map.piece(at2, two.len() as u64, 1).unwrap();
        assert_eq!(&p1[..], &one[..]);
        assert_eq!(&p2[..], &two[..]);
        // Full until a piece is done; the second done first frees nothing.
        assert!(a.put(&one, 2).is_none());
        drop(p2);
        assert!(a.put(&one, 2).is_none());
        assert_eq!(&p1[..], &one[..]);
        drop(p1);
        let at3 = a.put(&[3u8; 400 << 10], 2).unwrap();
        assert_eq!(at3, 0);
        let p3 = map.piece(at3, 400 << 10, 2).unwrap();
        assert!(p3.iter().all(|&b| b == 3));
        // Out of the arena: refused.
        assert!(map.piece(1 << 20, 1, 3).is_none());
        assert!(map.piece(u64::MAX, 2, 3).is_none());
        assert!(map.piece(0, 0, 3).is_none());
        // The size cannot change under mosixd's map.
        let f = File::from(a.share().unwrap());
        assert!(f.set_len(4096).is_err());
        assert!(f.set_len(4 << 20).is_err());
    }

    #[test]
    fn the_arena_goes_with_the_line_and_nothing_after_it_is_taken() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let arena = Arena::new(64 << 10).unwrap();
        let fd = arena.share().unwrap();
        send_line_with_fd(
            &a,
            b"{\"type\":\"deputy_ok\"}\n",
            std::os::fd::AsFd::as_fd(&fd),
        )
        .unwrap();
        io::Write::write_all(&mut &a, b"after").unwrap();
        let (line, got) = recv_line_with_fd(&b).unwrap();
        assert_eq!(line, "{\"type\":\"deputy_ok\"}\n");
        let map = ArenaMap::open(&got.unwrap()).unwrap();
        let at = arena.put(b"seen", 0).unwrap();
        assert_eq!(&map.piece(at, 4, 0).unwrap()[..], b"seen");
        let mut rest = [0u8; 5];
        io::Read::read_exact(&mut &b, &mut rest).unwrap();
        assert_eq!(&rest, b"after");
        // A line without a descriptor, then the end.
        io::Write::write_all(&mut &a, b"no\n").unwrap();
        drop(a);
        let (line, got) = recv_line_with_fd(&b).unwrap();
        assert_eq!((line.as_str(), got.is_none()), ("no\n", true));
        assert_eq!(recv_line_with_fd(&b).unwrap().0, "");
    }

    /// Blocks of the arena's memfd in use (512-byte units).
    fn blocks(a: &Arena) -> i64 {
        nix::sys::stat::fstat(&a.file).unwrap().st_blocks
    }

    #[test]
    fn an_idle_arena_gives_its_memory_back() {
        let a = Arena::new(4 << 20).unwrap();
        let mut x = a.alloc(1 << 20).unwrap();
        fill(&mut x, 5);
        let before = blocks(&a);
        assert!(before >= 2048, "{before}");
        // Held: kept.
        assert!(!a.trim(Duration::ZERO));
        drop(x);
        // Given back, but handed out a moment ago.
        assert!(!a.trim(Duration::from_secs(3600)));
        assert!(a.trim(Duration::ZERO));
        assert!(blocks(&a) < before, "{} {before}", blocks(&a));
        // Nothing handed out since: not again.
        assert!(!a.trim(Duration::ZERO));
        // It is used as before, from zeros.
        let mut y = a.alloc(1 << 20).unwrap();
        assert!(y.as_ref().iter().all(|&b| b == 0));
        fill(&mut y, 6);
        assert!(y.as_ref().iter().all(|&b| b == 6));
    }

    #[test]
    fn bytes_elsewhere_are_not_located_and_views_are_checked() {
        let a = Arena::new(64 << 10).unwrap();
        assert!(a.locate(&[1, 2, 3]).is_none());
        assert!(a.alloc(0).is_none());
        assert!(a.alloc((64 << 10) + 1).is_none());
        let pid = std::process::id() as i32;
        let t = a.token();
        let view = ArenaView::open(pid, a.fd(), 64 << 10, t).unwrap();
        assert!(view.slice(60 << 10, 8 << 10).is_none());
        assert!(view.slice(u64::MAX, 2).is_none());
        // The wrong size or token, another arena, a descriptor that is not an arena.
        assert!(ArenaView::open(pid, a.fd(), 4096, t).is_err());
        assert!(ArenaView::open(pid, a.fd(), 64 << 10, t ^ 1).is_err());
        let b = Arena::new(64 << 10).unwrap();
        assert!(ArenaView::open(pid, b.fd(), 64 << 10, t).is_err());
        let f = tempfile::tempfile().unwrap();
        assert!(ArenaView::open(pid, f.as_raw_fd(), 64 << 10, t).is_err());
    }
}
