//! The host's side of read-ahead and write-behind: sequential reads of a file at home
//! answered from data its deputy sent ahead, and writes to a file at home answered at once
//! and made at home behind (docs/transparency.md, "Bulk I/O").
//!
//! [`Streams`] is a state machine without I/O: the supervisor's [`crate::guest::Guest`]
//! asks it about each trapped read and write, tells it what it forwards and what the
//! deputy says, and sends what it returns. The rules that keep a process's view exact:
//!
//! - A read is answered here only from bytes read at home for a stream that nothing has
//!   touched since: any call on the descriptor that is forwarded ends its stream here
//!   (and at home, where the call ends it too); a change of the file at home (by anyone)
//!   reaches here as [`FromDeputy::Stale`] before anything that follows it.
//! - The descriptor's offset at home follows the reads answered here: each forwarded call
//!   carries the positions not yet known at home ([`Took`]), set at home before the call
//!   is made; they are kept until a reply shows they arrived, and sent again after a
//!   broken link, so that they are never lost; a position is idempotent.
//! - A write is answered here only under a grant of the deputy (a regular file with room,
//!   whose writes cannot fail but for the hardware), is made at home in the order it was
//!   answered and before any later call, is kept here until home says it was made, and
//!   sent again after a broken link (home makes each once).

use crate::gather::Mem;
use crate::notify::Notif;
use crate::spec::MAX_IO;
use crate::wire::{Begin, Bytes, FromDeputy, Kind, ToDeputy, Took};
use nix::errno::Errno;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// How far ahead of what the process has read a stream may run (bytes): the most a stream
/// holds here.
pub const WINDOW: u64 = 8 << 20;
/// Bytes read between two reports of a stream's position (its credit at home).
const REPORT: u64 = WINDOW / 4;
/// The most streams of each kind followed at once.
const MAX_STREAMS: usize = 16;

/// What to do with a trapped call.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours: forward it (or whatever the guest does).
    Pass,
    /// Answer it with this result; once the answer is taken, [`Streams::commit`] this.
    Answer(i64, Commit),
    /// Kept until data or credit comes (it stays trapped).
    Parked,
}

/// What an answer given here changes, once the process has it (a call whose thread was
/// interrupted before its answer did not happen).
#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    Nothing,
    /// A read of stream `stream` up to `end`; `moves`: a read (the offset moves).
    Read {
        stream: u64,
        end: u64,
        moves: bool,
    },
    /// A write behind.
    Write {
        stream: u64,
        behind: ToDeputy,
        len: u64,
    },
}

struct ReadStream {
    fd: i32,
    kind: Kind,
    file: (u64, u64),
    /// Read kind: the descriptor's offset as the process sees it.
    pos: u64,
    /// Bytes read at home, by offset, contiguous from the first.
    chunks: BTreeMap<u64, Bytes>,
    /// Where the data received so far ends.
    end: u64,
    /// The file ends at `end` (as read at home).
    eof: bool,
    /// How far the process has read (the stream's credit at home runs from there).
    consumed: u64,
    /// The last position reported to home.
    reported: u64,
}

impl ReadStream {
    /// The first byte held here.
    fn start(&self) -> u64 {
        self.chunks.keys().next().copied().unwrap_or(self.end)
    }

    /// Copies [at, at+len) (or up to the end of the file) into the process at `addr`:
    /// Some(bytes) when it is all here, None when some of it is still to come.
    fn copy_out(&self, at: u64, len: u64, addr: u64, mem: &dyn Mem) -> Option<Result<u64, Errno>> {
        if at < self.start() {
            return None;
        }
        let want_end = at.saturating_add(len);
        let end = if self.eof {
            want_end.min(self.end)
        } else if want_end <= self.end {
            want_end
        } else {
            return None;
        };
        if at >= end {
            // At or past the end of the file.
            return Some(Ok(0));
        }
        let first = self
            .chunks
            .range(..=at)
            .next_back()
            .map(|(o, _)| *o)
            .unwrap_or(at);
        for (&off, data) in self.chunks.range(first..end) {
            let from = at.max(off);
            let to = end.min(off + data.len() as u64);
            if from >= to {
                continue;
            }
            let slice = &data[(from - off) as usize..(to - off) as usize];
            if let Err(e) = mem.write(addr + (from - at), slice) {
                return Some(Err(e));
            }
        }
        Some(Ok(end - at))
    }

    /// Forgets what lies wholly before `upto`.
    fn drop_before(&mut self, upto: u64) {
        while let Some((&off, data)) = self.chunks.iter().next() {
            if off + data.len() as u64 <= upto {
                self.chunks.remove(&off);
            } else {
                break;
            }
        }
    }
}

struct WriteStream {
    fd: i32,
    file: (u64, u64),
    /// Bytes it may write behind, in all since the grant began.
    credit: u64,
    used: u64,
    /// Writes sent behind and not yet made at home (kept to be sent again), by number.
    unacked: VecDeque<ToDeputy>,
    next_n: u64,
}

/// A call waiting here for data or credit.
struct Parked {
    notif: Notif,
    stream: u64,
}

/// Read-ahead and write-behind streams of one process, on its host.
#[derive(Default)]
pub struct Streams {
    reads: HashMap<u64, ReadStream>,
    read_fd: HashMap<i32, u64>,
    writes: HashMap<u64, WriteStream>,
    write_fd: HashMap<i32, u64>,
    /// The last forwarded call on each descriptor (a stream begun by an earlier call is
    /// out of date).
    last_call: HashMap<i32, u64>,
    /// Positions not yet known at home to be there: stream -> offset.
    took: BTreeMap<u64, u64>,
    /// Positions carried by calls and syncs in flight: seq -> what they carried.
    carried: HashMap<u64, Vec<Took>>,
    parked: Vec<Parked>,
    /// A sync in flight (its seq).
    sync: Option<u64>,
    /// Bytes answered here (for figures), and calls.
    pub served: u64,
    pub behind: u64,
    pub calls: u64,
}

/// The descriptor a read or write call is on, and its buffer, length and (pread/pwrite)
/// offset.
fn io_args(n: &Notif) -> Option<(i32, u64, u64, Option<u64>)> {
    match n.nr {
        libc::SYS_read | libc::SYS_write => Some((n.args[0] as i32, n.args[1], n.args[2], None)),
        libc::SYS_pread64 | libc::SYS_pwrite64 => {
            let off = n.args[3] as i64;
            if off < 0 {
                return None;
            }
            Some((n.args[0] as i32, n.args[1], n.args[2], Some(off as u64)))
        }
        _ => None,
    }
}

impl Streams {
    /// Whether anything of the process's is still to be made or known at home (writes
    /// behind not yet made there, positions not yet known there).
    pub fn unsettled(&self) -> bool {
        !self.took.is_empty() || self.writes.values().any(|w| !w.unacked.is_empty())
    }

    /// Calls kept here waiting.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// A trapped read or write (or lseek): answered here if a stream allows it.
    pub fn on_call(&mut self, n: &Notif, mem: &dyn Mem) -> Verdict {
        if n.nr == libc::SYS_lseek {
            return self.tell(n);
        }
        let Some((fd, buf, len, off)) = io_args(n) else {
            return Verdict::Pass;
        };
        match n.nr {
            libc::SYS_read | libc::SYS_pread64 => self.read(n, fd, buf, len, off, mem),
            _ => self.write(n, fd, buf, len, off, mem),
        }
    }

    /// lseek(fd, 0, SEEK_CUR) on a stream of reads: its position is known here.
    fn tell(&mut self, n: &Notif) -> Verdict {
        let fd = n.args[0] as i32;
        if n.args[1] != 0 || n.args[2] as i32 != libc::SEEK_CUR {
            return Verdict::Pass;
        }
        match self.read_fd.get(&fd).and_then(|s| self.reads.get(s)) {
            Some(r) if r.kind == Kind::Read => Verdict::Answer(r.pos as i64, Commit::Nothing),
            _ => Verdict::Pass,
        }
    }

    fn read(
        &mut self,
        n: &Notif,
        fd: i32,
        buf: u64,
        len: u64,
        off: Option<u64>,
        mem: &dyn Mem,
    ) -> Verdict {
        let Some(&sid) = self.read_fd.get(&fd) else {
            return Verdict::Pass;
        };
        let Some(r) = self.reads.get_mut(&sid) else {
            return Verdict::Pass;
        };
        let at = match (off, r.kind) {
            (Some(o), _) => o,
            (None, Kind::Read) => r.pos,
            // The stream follows preads: where a read starts is not known here.
            (None, Kind::Pread) => return Verdict::Pass,
        };
        let len = len.min(MAX_IO as u64);
        match r.copy_out(at, len, buf, mem) {
            Some(Ok(got)) => Verdict::Answer(
                got as i64,
                Commit::Read {
                    stream: sid,
                    end: at + got,
                    moves: off.is_none(),
                },
            ),
            Some(Err(e)) => Verdict::Answer(-(e as i64), Commit::Nothing),
            // Its bytes are on their way (home sends up to the window past the last
            // position it was told).
            None if at >= r.start() && at + len <= r.reported + WINDOW && !r.eof => {
                self.parked.push(Parked {
                    notif: *n,
                    stream: sid,
                });
                Verdict::Parked
            }
            None => Verdict::Pass,
        }
    }

    fn write(
        &mut self,
        n: &Notif,
        fd: i32,
        buf: u64,
        len: u64,
        off: Option<u64>,
        mem: &dyn Mem,
    ) -> Verdict {
        let Some(&sid) = self.write_fd.get(&fd) else {
            return Verdict::Pass;
        };
        let Some(w) = self.writes.get_mut(&sid) else {
            return Verdict::Pass;
        };
        let len = len.min(MAX_IO as u64);
        if len == 0 {
            return Verdict::Pass;
        }
        if w.used + len > w.credit {
            if len > WINDOW / 2 || w.unacked.is_empty() {
                // No credit is coming (none is waited for): made at home as it is.
                return Verdict::Pass;
            }
            // Room comes as the writes before it are made at home.
            self.parked.push(Parked {
                notif: *n,
                stream: sid,
            });
            return Verdict::Parked;
        }
        let data = match mem.read_bytes(buf, len as usize) {
            Ok(d) => d,
            Err(e) => return Verdict::Answer(-(e as i64), Commit::Nothing),
        };
        let behind = ToDeputy::Behind {
            stream: sid,
            n: w.next_n,
            off,
            data,
        };
        Verdict::Answer(
            len as i64,
            Commit::Write {
                stream: sid,
                behind,
                len,
            },
        )
    }

    /// The process has the answer given here: what it changes, and what to send home.
    pub fn commit(&mut self, c: Commit) -> Vec<ToDeputy> {
        self.calls += 1;
        match c {
            Commit::Nothing => Vec::new(),
            Commit::Read { stream, end, moves } => {
                let Some(r) = self.reads.get_mut(&stream) else {
                    return Vec::new();
                };
                let start = r.consumed;
                if moves {
                    // The descriptor's offset moves: home must follow.
                    r.pos = end;
                    r.consumed = end;
                    r.drop_before(end);
                    self.took.insert(stream, end);
                } else if r.kind == Kind::Pread {
                    r.consumed = r.consumed.max(end);
                    r.drop_before(end.min(r.consumed));
                }
                self.served += r.consumed.saturating_sub(start);
                if r.consumed >= r.reported + REPORT {
                    r.reported = r.consumed;
                    return vec![ToDeputy::Took {
                        took: vec![Took {
                            stream,
                            upto: r.consumed,
                        }],
                        stop: false,
                    }];
                }
                Vec::new()
            }
            Commit::Write {
                stream,
                behind,
                len,
            } => {
                let Some(w) = self.writes.get_mut(&stream) else {
                    return Vec::new();
                };
                w.next_n += 1;
                w.used += len;
                w.unacked.push_back(behind.clone());
                self.behind += len;
                // What was read ahead of the same file is changed by it.
                let file = w.file;
                self.end_reads_of_file(file);
                vec![behind]
            }
        }
    }

    fn end_reads_of_file(&mut self, file: (u64, u64)) {
        let gone: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.file == file)
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            self.end_read(s);
        }
    }

    fn end_read(&mut self, sid: u64) {
        if let Some(r) = self.reads.remove(&sid) {
            if self.read_fd.get(&r.fd) == Some(&sid) {
                self.read_fd.remove(&r.fd);
            }
        }
    }

    /// A call on descriptors `fds` (or, with `range`, every descriptor in it) is forwarded
    /// as call `seq`: their streams end here (they end at home as the call is made). The
    /// positions it must carry home.
    pub fn forwarding(
        &mut self,
        seq: u64,
        fds: &[i32],
        range: Option<(u64, u64)>,
        closes: bool,
    ) -> Vec<Took> {
        for &fd in fds {
            self.last_call.insert(fd, seq);
            if let Some(s) = self.read_fd.get(&fd).copied() {
                self.end_read(s);
            }
        }
        let touched = |fd: i32| {
            fds.contains(&fd) || range.is_some_and(|(a, b)| (a..=b).contains(&(fd as u64)))
        };
        if let Some((a, b)) = range {
            let rs: Vec<u64> = self
                .reads
                .iter()
                .filter(|(_, r)| (a..=b).contains(&(r.fd as u64)))
                .map(|(s, _)| *s)
                .collect();
            for s in rs {
                self.end_read(s);
            }
        }
        if closes {
            // The descriptor may be another file after it: no writing behind on it.
            let ws: Vec<u64> = self
                .writes
                .iter()
                .filter(|(_, w)| touched(w.fd) && w.unacked.is_empty())
                .map(|(s, _)| *s)
                .collect();
            for s in ws {
                self.end_write(s);
            }
            for (_, w) in self.writes.iter_mut().filter(|(_, w)| touched(w.fd)) {
                // Still making what it wrote: kept until that is done, but no more.
                w.credit = w.used;
            }
            self.write_fd.retain(|fd, _| !touched(*fd));
        }
        let took: Vec<Took> = self
            .took
            .iter()
            .map(|(&stream, &upto)| Took { stream, upto })
            .collect();
        if !took.is_empty() {
            self.carried.insert(seq, took.clone());
        }
        took
    }

    fn end_write(&mut self, sid: u64) {
        if let Some(w) = self.writes.remove(&sid) {
            if self.write_fd.get(&w.fd) == Some(&sid) {
                self.write_fd.remove(&w.fd);
            }
        }
    }

    /// Call `seq`, on descriptor `fd`, was answered with the beginning of a stream: it is
    /// followed from now on, unless a call on the descriptor was forwarded after it (the
    /// stream then ended at home with that call).
    pub fn begin(&mut self, seq: u64, fd: i32, b: Begin) {
        if self.last_call.get(&fd) != Some(&seq) {
            return;
        }
        match b {
            Begin::Ahead { kind, file, from } => {
                if self.reads.contains_key(&seq) || self.reads.len() >= MAX_STREAMS {
                    return;
                }
                if let Some(old) = self.read_fd.get(&fd).copied() {
                    self.end_read(old);
                }
                self.reads.insert(
                    seq,
                    ReadStream {
                        fd,
                        kind,
                        file,
                        pos: from,
                        chunks: BTreeMap::new(),
                        end: from,
                        eof: false,
                        consumed: from,
                        reported: from,
                    },
                );
                self.read_fd.insert(fd, seq);
            }
            Begin::Behind { file, credit } => {
                if self.writes.contains_key(&seq) || self.writes.len() >= MAX_STREAMS {
                    return;
                }
                if let Some(old) = self.write_fd.remove(&fd) {
                    // Ended at home: what it still has to make is waited for.
                    if let Some(w) = self.writes.get_mut(&old) {
                        w.credit = w.used;
                    }
                    if self.writes.get(&old).is_some_and(|w| w.unacked.is_empty()) {
                        self.writes.remove(&old);
                    }
                }
                self.writes.insert(
                    seq,
                    WriteStream {
                        fd,
                        file,
                        credit,
                        used: 0,
                        unacked: VecDeque::new(),
                        next_n: 0,
                    },
                );
                self.write_fd.insert(fd, seq);
            }
        }
    }

    /// The way home was broken and is back: what was read ahead may have been lost on
    /// the way, so reads go home again (parked ones are offered again); positions,
    /// credits and writes not known to be made are sent again.
    pub fn relinked(&mut self) -> (Vec<ToDeputy>, Vec<Notif>) {
        let out = self.resend();
        let ids: Vec<u64> = self.reads.keys().copied().collect();
        let mut again = Vec::new();
        for s in ids {
            self.end_read(s);
            again.extend(self.unpark(s));
        }
        (out, again)
    }

    /// Home answered call (or sync) `seq`: the positions it carried are known there.
    pub fn answered(&mut self, seq: u64) {
        if let Some(took) = self.carried.remove(&seq) {
            for t in took {
                if self.took.get(&t.stream) == Some(&t.upto) {
                    self.took.remove(&t.stream);
                }
            }
        }
        if self.sync == Some(seq) {
            self.sync = None;
        }
    }

    /// A sync to send (the process is about to be frozen, or has ended): every position
    /// not yet known at home, as call `seq`. None: nothing to sync.
    pub fn sync(&mut self, seq: u64) -> Option<ToDeputy> {
        if self.took.is_empty() || self.sync.is_some() {
            return None;
        }
        let took: Vec<Took> = self
            .took
            .iter()
            .map(|(&stream, &upto)| Took { stream, upto })
            .collect();
        self.carried.insert(seq, took.clone());
        self.sync = Some(seq);
        Some(ToDeputy::Sync { seq, took })
    }

    /// The process is frozen for a move: every stream ends (what was read ahead is
    /// dropped; writes behind are still waited for), parked calls are let go (they are
    /// made again after the move). The message that stops the streams at home.
    pub fn quiesce(&mut self) -> Vec<ToDeputy> {
        self.parked.clear();
        let had = !self.reads.is_empty() || !self.writes.is_empty();
        self.reads.clear();
        self.read_fd.clear();
        self.write_fd.clear();
        for w in self.writes.values_mut() {
            w.credit = w.used;
        }
        self.writes.retain(|_, w| !w.unacked.is_empty());
        if had {
            vec![ToDeputy::Took {
                took: Vec::new(),
                stop: true,
            }]
        } else {
            Vec::new()
        }
    }

    /// What to send again after the way home was broken: positions and credits, then the
    /// writes not known to be made (home makes each once).
    pub fn resend(&self) -> Vec<ToDeputy> {
        let mut out = Vec::new();
        if let Some(seq) = self.sync {
            let took = self.carried.get(&seq).cloned().unwrap_or_default();
            out.push(ToDeputy::Sync { seq, took });
        }
        let mut took: Vec<Took> = self
            .took
            .iter()
            .map(|(&stream, &upto)| Took { stream, upto })
            .collect();
        for (&s, r) in &self.reads {
            if !self.took.contains_key(&s) {
                took.push(Took {
                    stream: s,
                    upto: r.consumed,
                });
            }
        }
        if !took.is_empty() {
            out.push(ToDeputy::Took { took, stop: false });
        }
        let mut ws: Vec<(&u64, &WriteStream)> = self.writes.iter().collect();
        ws.sort_by_key(|(s, _)| **s);
        for (_, w) in ws {
            out.extend(w.unacked.iter().cloned());
        }
        out
    }

    /// Positions to report now (time passed: home's offsets follow the process even when
    /// it makes no call).
    pub fn tick(&mut self) -> Vec<ToDeputy> {
        let mut took = Vec::new();
        for (&s, r) in self.reads.iter_mut() {
            if r.consumed > r.reported {
                r.reported = r.consumed;
                took.push(Took {
                    stream: s,
                    upto: r.consumed,
                });
            }
        }
        for (&s, &upto) in &self.took {
            if !took.iter().any(|t| t.stream == s) && !self.reads.contains_key(&s) {
                took.push(Took { stream: s, upto });
            }
        }
        if took.is_empty() {
            Vec::new()
        } else {
            vec![ToDeputy::Took { took, stop: false }]
        }
    }

    /// Parked calls whose thread stopped waiting (interrupted): forgotten.
    pub fn forget_parked(&mut self, valid: &dyn Fn(u64) -> bool) {
        self.parked.retain(|p| valid(p.notif.id));
    }

    /// A message of the deputy about streams; the parked calls it lets go on, to be
    /// offered again (`on_call`), and whether it was one.
    pub fn on_deputy(&mut self, m: FromDeputy) -> Option<Vec<Notif>> {
        match &m {
            FromDeputy::Ahead { stream, .. } => {
                let stream = *stream;
                let FromDeputy::Ahead {
                    fd,
                    kind,
                    file,
                    off,
                    data,
                    eof,
                    ..
                } = m
                else {
                    unreachable!("matched")
                };
                self.ahead(stream, fd, kind, file, off, data, eof);
                Some(self.unpark(stream))
            }
            FromDeputy::Stale { streams } => {
                let mut again = Vec::new();
                for s in streams {
                    self.end_read(*s);
                    again.extend(self.unpark(*s));
                }
                Some(again)
            }
            FromDeputy::Grant {
                stream,
                fd,
                credit,
                applied,
                ..
            } => {
                self.grant(*stream, *fd, *credit, *applied);
                Some(self.unpark(*stream))
            }
            FromDeputy::Revoke { stream } => {
                if let Some(w) = self.writes.get_mut(stream) {
                    // What it wrote behind after the failure is dropped at home.
                    w.unacked.clear();
                }
                self.end_write(*stream);
                Some(self.unpark(*stream))
            }
            FromDeputy::Synced { seq } => {
                self.answered(*seq);
                Some(Vec::new())
            }
            _ => None,
        }
    }

    fn unpark(&mut self, stream: u64) -> Vec<Notif> {
        let mut out = Vec::new();
        self.parked.retain(|p| {
            if p.stream == stream {
                out.push(p.notif);
                false
            } else {
                true
            }
        });
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn ahead(
        &mut self,
        sid: u64,
        fd: i32,
        kind: Kind,
        file: (u64, u64),
        off: u64,
        data: Bytes,
        eof: bool,
    ) {
        // Only streams this host took (a stream of a past residence, or one ended here,
        // is not followed).
        let Some(r) = self.reads.get_mut(&sid) else {
            return;
        };
        if r.fd != fd || r.kind != kind || r.file != file {
            self.end_read(sid);
            return;
        }
        if off != r.end || r.eof {
            // Not the next bytes: this stream is not followed any more.
            self.end_read(sid);
            return;
        }
        r.end = off + data.len() as u64;
        if !data.is_empty() {
            r.chunks.insert(off, data);
        }
        r.eof = eof;
    }

    fn grant(&mut self, sid: u64, fd: i32, credit: u64, applied: u64) {
        let Some(w) = self.writes.get_mut(&sid) else {
            return;
        };
        while let Some(ToDeputy::Behind { n, .. }) = w.unacked.front() {
            if *n < applied {
                w.unacked.pop_front();
            } else {
                break;
            }
        }
        if self.write_fd.get(&fd) == Some(&sid) {
            w.credit = w.credit.max(credit);
        }
        if !self.write_fd.values().any(|s| *s == sid) && w.unacked.is_empty() {
            self.writes.remove(&sid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gather::tests::Fake;
    use std::cell::RefCell;

    const BASE: u64 = 0x1000;

    fn mem() -> Fake {
        Fake {
            base: BASE,
            mem: RefCell::new(vec![0; 1 << 16]),
        }
    }

    fn notif(id: u64, nr: i64, args: [u64; 6]) -> Notif {
        Notif {
            id,
            pid: 1,
            nr,
            arch: 0,
            ip: 0,
            args,
        }
    }

    /// Call `seq` on descriptor 5 was forwarded and began a stream of reads from `from`.
    fn begun(s: &mut Streams, seq: u64, from: u64) {
        s.forwarding(seq, &[5], None, false);
        s.begin(
            seq,
            5,
            Begin::Ahead {
                kind: Kind::Read,
                file: (1, 2),
                from,
            },
        );
    }

    /// Call `seq` on descriptor `fd` was forwarded and began write-behind.
    fn granted(s: &mut Streams, seq: u64, fd: i32, file: (u64, u64), credit: u64) {
        s.forwarding(seq, &[fd], None, false);
        s.begin(seq, fd, Begin::Behind { file, credit });
    }

    fn ahead(stream: u64, off: u64, data: &[u8], eof: bool) -> FromDeputy {
        FromDeputy::Ahead {
            stream,
            fd: 5,
            kind: Kind::Read,
            file: (1, 2),
            off,
            data: Bytes::copy_from_slice(data),
            eof,
        }
    }

    /// What became of a call offered to the streams (answered calls committed).
    #[derive(Debug, PartialEq)]
    enum Got {
        Pass,
        Parked,
        Answer(i64, Vec<ToDeputy>),
    }

    fn call(s: &mut Streams, n: &Notif, m: &Fake) -> Got {
        match s.on_call(n, m) {
            Verdict::Pass => Got::Pass,
            Verdict::Parked => Got::Parked,
            Verdict::Answer(r, c) => Got::Answer(r, s.commit(c)),
        }
    }

    #[test]
    fn reads_are_answered_from_what_came_ahead_and_their_position_goes_home() {
        let m = mem();
        let mut s = Streams::default();
        // The read that began the stream was call 7 (forwarded), which ended at offset 4.
        begun(&mut s, 7, 4);
        s.on_deputy(ahead(7, 4, b"efgh", false));
        s.on_deputy(ahead(7, 8, b"ij", true));
        let r = |id, len| notif(id, libc::SYS_read, [5, BASE, len, 0, 0, 0]);
        assert_eq!(call(&mut s, &r(1, 3), &m), Got::Answer(3, vec![]));
        assert_eq!(&m.mem.borrow()[..3], b"efg");
        assert_eq!(call(&mut s, &r(2, 100), &m), Got::Answer(3, vec![]));
        assert_eq!(&m.mem.borrow()[..3], b"hij");
        // At the end of the file: 0, as a read there gives.
        assert_eq!(call(&mut s, &r(3, 100), &m), Got::Answer(0, vec![]));
        // lseek(fd, 0, SEEK_CUR) is known here.
        let tell = notif(4, libc::SYS_lseek, [5, 0, libc::SEEK_CUR as u64, 0, 0, 0]);
        assert_eq!(call(&mut s, &tell, &m), Got::Answer(10, vec![]));
        assert!(s.unsettled());
        // The next call (on any descriptor) carries the position home; its answer settles it.
        let took = s.forwarding(9, &[1], None, false);
        assert_eq!(
            took,
            vec![Took {
                stream: 7,
                upto: 10
            }]
        );
        s.answered(9);
        assert!(!s.unsettled());
        // A call on the descriptor ends the stream: the next read goes home.
        s.forwarding(10, &[5], None, false);
        assert_eq!(call(&mut s, &r(5, 1), &m), Got::Pass);
    }

    #[test]
    fn an_answer_the_process_did_not_take_changes_nothing() {
        let m = mem();
        let mut s = Streams::default();
        begun(&mut s, 7, 0);
        s.on_deputy(ahead(7, 0, b"abcd", false));
        let r = notif(1, libc::SYS_read, [5, BASE, 2, 0, 0, 0]);
        // Its thread was interrupted before the answer: not committed.
        assert!(matches!(s.on_call(&r, &m), Verdict::Answer(2, _)));
        assert!(!s.unsettled());
        assert_eq!(call(&mut s, &r, &m), Got::Answer(2, vec![]));
        assert_eq!(&m.mem.borrow()[..2], b"ab");
    }

    #[test]
    fn a_stream_begun_before_the_last_call_on_its_descriptor_is_not_taken() {
        let m = mem();
        let mut s = Streams::default();
        s.forwarding(7, &[5], None, false);
        s.forwarding(8, &[5], None, false);
        // The answer of 7 comes after 8 was sent: its stream ended at home with 8.
        s.begin(
            7,
            5,
            Begin::Ahead {
                kind: Kind::Read,
                file: (1, 2),
                from: 4,
            },
        );
        s.on_deputy(ahead(7, 4, b"stale", false));
        let r = notif(1, libc::SYS_read, [5, BASE, 2, 0, 0, 0]);
        assert_eq!(call(&mut s, &r, &m), Got::Pass);
    }

    #[test]
    fn a_read_waits_for_bytes_on_their_way_and_a_change_at_home_sends_it_home() {
        let m = mem();
        let mut s = Streams::default();
        begun(&mut s, 7, 0);
        // Nothing came yet: it waits.
        let r = notif(1, libc::SYS_read, [5, BASE, 4, 0, 0, 0]);
        assert_eq!(call(&mut s, &r, &m), Got::Parked);
        let again = s.on_deputy(ahead(7, 0, b"ab", false)).unwrap();
        assert_eq!(again, vec![r]);
        assert_eq!(call(&mut s, &r, &m), Got::Parked);
        let again = s.on_deputy(ahead(7, 2, b"cd", false)).unwrap();
        assert_eq!(again, vec![r]);
        assert_eq!(call(&mut s, &r, &m), Got::Answer(4, vec![]));
        // Parked again; the file changes at home: it goes home.
        let r2 = notif(2, libc::SYS_read, [5, BASE, 4, 0, 0, 0]);
        assert_eq!(call(&mut s, &r2, &m), Got::Parked);
        let again = s.on_deputy(FromDeputy::Stale { streams: vec![7] }).unwrap();
        assert_eq!(again, vec![r2]);
        assert_eq!(call(&mut s, &r2, &m), Got::Pass);
        // What it read is still owed to home.
        assert_eq!(
            s.forwarding(11, &[5], None, false),
            vec![Took { stream: 7, upto: 4 }]
        );
    }

    #[test]
    fn preads_are_answered_anywhere_in_what_came_and_leave_no_position() {
        let m = mem();
        let mut s = Streams::default();
        s.forwarding(3, &[5], None, false);
        s.begin(
            3,
            5,
            Begin::Ahead {
                kind: Kind::Pread,
                file: (1, 2),
                from: 100,
            },
        );
        s.on_deputy(FromDeputy::Ahead {
            stream: 3,
            fd: 5,
            kind: Kind::Pread,
            file: (1, 2),
            off: 100,
            data: b"0123456789".to_vec().into(),
            eof: false,
        });
        let p = |id, off, len| notif(id, libc::SYS_pread64, [5, BASE, len, off, 0, 0]);
        assert_eq!(call(&mut s, &p(1, 102, 3), &m), Got::Answer(3, vec![]));
        assert_eq!(&m.mem.borrow()[..3], b"234");
        // Before the stream: not here.
        assert_eq!(call(&mut s, &p(2, 50, 3), &m), Got::Pass);
        // A plain read on a stream of preads: where it starts is not known here.
        let r = notif(3, libc::SYS_read, [5, BASE, 1, 0, 0, 0]);
        assert_eq!(call(&mut s, &r, &m), Got::Pass);
        assert!(!s.unsettled());
    }

    #[test]
    fn writes_behind_need_a_grant_credit_and_are_kept_until_made() {
        let m = mem();
        m.write(BASE, b"hello world").unwrap();
        let mut s = Streams::default();
        let w = |id, len| notif(id, libc::SYS_write, [6, BASE, len, 0, 0, 0]);
        assert_eq!(call(&mut s, &w(1, 5), &m), Got::Pass);
        granted(&mut s, 20, 6, (1, 3), 8);
        assert_eq!(
            call(&mut s, &w(2, 5), &m),
            Got::Answer(
                5,
                vec![ToDeputy::Behind {
                    stream: 20,
                    n: 0,
                    off: None,
                    data: b"hello".to_vec().into()
                }]
            )
        );
        // Over the credit: it waits for room.
        assert_eq!(call(&mut s, &w(3, 5), &m), Got::Parked);
        assert!(s.unsettled());
        assert_eq!(s.resend().len(), 1);
        let again = s
            .on_deputy(FromDeputy::Grant {
                stream: 20,
                fd: 6,
                file: (1, 3),
                credit: 13,
                applied: 1,
            })
            .unwrap();
        assert_eq!(again, vec![w(3, 5)]);
        assert!(!s.unsettled());
        let Got::Answer(5, sent) = call(&mut s, &w(3, 5), &m) else {
            panic!("answered here");
        };
        assert!(matches!(sent.as_slice(), [ToDeputy::Behind { n: 1, .. }]));
        // A close of the descriptor: no more writing behind on it, but what was written
        // is still waited for.
        s.forwarding(30, &[6], None, true);
        assert_eq!(call(&mut s, &w(4, 1), &m), Got::Pass);
        assert!(s.unsettled());
        s.on_deputy(FromDeputy::Grant {
            stream: 20,
            fd: 6,
            file: (1, 3),
            credit: 100,
            applied: 2,
        });
        assert!(!s.unsettled());
    }

    #[test]
    fn a_write_not_taken_is_not_sent() {
        let m = mem();
        let mut s = Streams::default();
        granted(&mut s, 20, 6, (1, 3), 100);
        let w = notif(1, libc::SYS_write, [6, BASE, 5, 0, 0, 0]);
        assert!(matches!(s.on_call(&w, &m), Verdict::Answer(5, _)));
        assert!(!s.unsettled());
        let Got::Answer(5, sent) = call(&mut s, &w, &m) else {
            panic!("answered here");
        };
        assert!(matches!(sent.as_slice(), [ToDeputy::Behind { n: 0, .. }]));
    }

    #[test]
    fn a_write_behind_ends_what_was_read_ahead_of_the_same_file() {
        let m = mem();
        let mut s = Streams::default();
        begun(&mut s, 7, 0);
        s.on_deputy(ahead(7, 0, b"abcd", false));
        granted(&mut s, 8, 6, (1, 2), 100);
        let w = notif(1, libc::SYS_pwrite64, [6, BASE, 2, 0, 0, 0]);
        assert!(matches!(call(&mut s, &w, &m), Got::Answer(2, _)));
        let r = notif(2, libc::SYS_read, [5, BASE, 2, 0, 0, 0]);
        assert_eq!(call(&mut s, &r, &m), Got::Pass);
    }

    #[test]
    fn a_freeze_ends_streams_and_syncs_settle_positions() {
        let m = mem();
        let mut s = Streams::default();
        begun(&mut s, 7, 0);
        s.on_deputy(ahead(7, 0, b"abcd", false));
        let r = notif(1, libc::SYS_read, [5, BASE, 2, 0, 0, 0]);
        assert_eq!(call(&mut s, &r, &m), Got::Answer(2, vec![]));
        assert_eq!(
            s.quiesce(),
            vec![ToDeputy::Took {
                took: vec![],
                stop: true
            }]
        );
        assert!(s.unsettled());
        let Some(ToDeputy::Sync { seq: 40, took }) = s.sync(40) else {
            panic!("a sync");
        };
        assert_eq!(took, vec![Took { stream: 7, upto: 2 }]);
        assert!(s.sync(41).is_none(), "one at a time");
        s.on_deputy(FromDeputy::Synced { seq: 40 });
        assert!(!s.unsettled());
        assert_eq!(call(&mut s, &r, &m), Got::Pass);
    }
}
