//! Restoring a process while its image arrives (pipelined restore): the process is made
//! as soon as its first layout (or, for a plain image, its final state) is read, and each
//! memory record is put in place as it comes, checked first (its own checksum, and what
//! the records before it declared). The whole stream's checksum is checked at its end,
//! before the process can run: it is stopped under our ptrace until then, and killed on
//! any error. A zstd image is read whole first (its decoder reads ahead).

use std::io::Read;
use std::os::fd::OwnedFd;

use crate::sum::Xxh3;

use crate::away::Away;
use crate::creds::CredOptions;
use crate::error::{bad, Error, Result};
use crate::image::{
    Chain, Compression, ProcessImage, CHAINED, HEADER_LEN, PAGES_RECORD_MAX, TAG_END, TAG_PAGES,
    TAG_SHMEM,
};
use crate::limits::ReadLimits;
use crate::parse::{Event, Parser};
use crate::read::{read_header, MAX_META};
use crate::restore::{Mode, RestoreOptions, Restored};
use crate::stage::Site;

/// Passes bytes through while hashing them (images before format 3.3, whose checksum is
/// of all their bytes).
struct HashRead<R: Read> {
    inner: R,
    h: Option<Xxh3>,
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        if let Some(h) = &mut self.h {
            h.update(&b[..n]);
        }
        Ok(n)
    }
}

fn eof(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        bad("truncated: the end record is missing")
    } else {
        Error::Io(e)
    }
}

/// A process restored from an image that arrived whole: stopped under our ptrace with
/// its memory in place, waiting for [`Incoming::complete`]. Dropped, it is killed.
pub struct Incoming {
    site: Site,
    meta: ProcessImage,
    /// Bytes of memory contents the image held (some pages more than once).
    pub memory_bytes: u64,
}

impl Incoming {
    /// The PID of the process being built, as we see it.
    pub fn pid(&self) -> i32 {
        self.site.pid
    }

    /// Its final state.
    pub fn meta(&self) -> &ProcessImage {
        &self.meta
    }

    /// Away: the seccomp program it gets (see [`crate::Away::filter`]), when it depends
    /// on its final state (the memory it shares at home).
    pub fn set_filter(&mut self, filter: Vec<u8>) {
        self.site.set_filter(filter);
    }

    /// Makes the rest of it (descriptors, signals, threads, credentials, registers; away:
    /// its descriptors of its own /proc are `proc_fds`), as [`crate::restore_away`] does.
    /// With `track` a userfaultfd of its memory is made too and returned (see
    /// [`crate::dirty::Tracker::adopt_ready`]). Returns the filter's listener away and
    /// the userfaultfd that watches the memory it shares at home (if any).
    pub fn complete(
        mut self,
        proc_fds: Option<Vec<(i32, String)>>,
        track: bool,
    ) -> Result<(Restored, crate::restore::Built, Option<OwnedFd>)> {
        if let Some(fds) = proc_fds {
            self.site.set_proc_fds(fds);
        }
        self.site.complete(&self.meta, track)
    }
}

/// Reads the image header from `r`: the reader (hashing what it reads, for images before
/// format 3.3), the header, its compression and version, and the chain of its records'
/// checksums (from 3.3).
#[allow(clippy::type_complexity)]
fn open<R: Read>(
    r: R,
) -> Result<(
    HashRead<R>,
    [u8; HEADER_LEN],
    Compression,
    crate::read::Version,
    Option<Chain>,
)> {
    let mut hr = HashRead {
        inner: r,
        h: Some(Xxh3::new()),
    };
    let mut head = [0u8; HEADER_LEN];
    hr.read_exact(&mut head).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad("truncated: shorter than the image header")
        } else {
            Error::Io(e)
        }
    })?;
    let (compression, v) = read_header(&head)?;
    // From 3.3 the image's checksum is the chain of its records, made as they come.
    let chain = (v >= CHAINED).then(|| {
        hr.h = None;
        Chain::new(&head)
    });
    Ok((hr, head, compression, v, chain))
}

/// Reads the image's own checksum, after its end record, and checks it.
fn check_sum<R: Read>(hr: &mut HashRead<R>, chain: &Option<Chain>) -> Result<()> {
    let sum = chain
        .as_ref()
        .map(Chain::digest)
        .or(hr.h.as_ref().map(Xxh3::digest));
    let mut trailer = [0u8; 8];
    hr.inner
        .read_exact(&mut trailer)
        .map_err(|_| bad("truncated: the image checksum is missing"))?;
    if Some(u64::from_le_bytes(trailer)) != sum {
        return Err(bad(crate::read::CHECKSUM_MISMATCH));
    }
    Ok(())
}

/// Reads an image from `r` and restores it while it arrives (see the module
/// documentation), up to [`Incoming::complete`]. `admit` is asked first, with the bytes
/// of memory the process will take (as the image declares them), and may refuse; `limits`
/// bounds what reading the metadata may take. With `away`, restored as
/// [`crate::restore_away`] does. Reads exactly the image from `r`.
pub fn receive<R: Read>(
    r: R,
    opts: RestoreOptions,
    creds: &CredOptions,
    away: Option<&Away>,
    limits: ReadLimits,
    admit: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Incoming> {
    let mode = match away {
        Some(a) => Mode::Away(a),
        None => Mode::Plain,
    };
    let (mut hr, head, compression, v, mut chain) = open(r)?;
    let incoming = match compression {
        Compression::Zstd => {
            // Read whole: its decoder reads ahead, into the checksum that follows.
            let mut raw = head.to_vec();
            (&mut hr.inner)
                .take(limits.max_memory.saturating_add(1))
                .read_to_end(&mut raw)?;
            let img = crate::read::read_image_bytes_with(raw, &limits)?;
            admit(img.memory_bytes())?;
            let mut site = Site::begin(&img.meta, opts, creds, mode)?;
            crate::restore::build_loaded(&mut site, &img)?;
            return Ok(Incoming {
                site,
                memory_bytes: img.memory_bytes(),
                meta: img.meta,
            });
        }
        Compression::None => {
            let mut recs = Records::new(v, limits, &mut chain);
            let mut b = Build::new();
            records(&mut hr, &mut recs, &mut b, opts, creds, mode, admit, false)?;
            b.done()?
        }
        Compression::Lz4 => {
            let mut d = lz4_flex::frame::FrameDecoder::new(&mut hr);
            let mut recs = Records::new(v, limits, &mut chain);
            let mut b = Build::new();
            records(&mut d, &mut recs, &mut b, opts, creds, mode, admit, false)?;
            let inc = b.done()?;
            frame_end(&mut d)?;
            inc
        }
    };
    check_sum(&mut hr, &chain)?;
    Ok(incoming)
}

/// Reading the records of a body one by one, each checked (its own checksum, its place)
/// and its head and checksum added to `chain` (if any).
struct Records<'c> {
    parser: Parser,
    buf: Vec<u8>,
    n: u64,
    chain: &'c mut Option<Chain>,
}

impl<'c> Records<'c> {
    fn new(v: crate::read::Version, limits: ReadLimits, chain: &'c mut Option<Chain>) -> Self {
        Records {
            parser: Parser::new(v, limits),
            buf: Vec::new(),
            n: 0,
            chain,
        }
    }

    fn ended(&self) -> bool {
        self.parser.ended()
    }

    /// Reads the next record from `r`: its tag and payload go to `pre`, then what it
    /// means to `sink`.
    fn next<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        pre: &mut dyn FnMut(u8, &[u8]) -> Result<()>,
        sink: &mut dyn FnMut(Event<'_>) -> Result<()>,
    ) -> Result<()> {
        let n = self.n;
        let mut head = [0u8; 9];
        r.read_exact(&mut head).map_err(eof)?;
        let tag = head[0];
        let len = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let most = match tag {
            TAG_PAGES | TAG_SHMEM => 16 + PAGES_RECORD_MAX as u64,
            TAG_END => 16,
            _ => MAX_META,
        };
        if len > most {
            return Err(bad(format!(
                "record {n} of {len} bytes (a reader takes at most {most} here)"
            )));
        }
        let len = len as usize;
        // (The buffer keeps its largest size: it is not zeroed again for each record.)
        let whole = 9 + len + 8;
        if self.buf.len() < whole {
            self.buf.resize(whole, 0);
        }
        self.buf[..9].copy_from_slice(&head);
        r.read_exact(&mut self.buf[9..whole]).map_err(eof)?;
        let buf = &self.buf[..whole];
        if !crate::read::record_sum_ok(buf) {
            return Err(bad(format!(
                "checksum mismatch in record {n} (damaged image)"
            )));
        }
        if let Some(c) = self.chain.as_mut() {
            c.record(
                &head,
                u64::from_le_bytes(buf[9 + len..].try_into().expect("8 bytes")),
            );
        }
        self.n += 1;
        let payload = &buf[9..9 + len];
        pre(tag, payload)?;
        self.parser.record(tag, payload, 9, sink)
    }
}

/// A restore from records: the process being built, its final state once read, and what
/// was admitted and put in so far.
struct Build {
    site: Option<Site>,
    meta: Option<ProcessImage>,
    admitted: bool,
    memory_bytes: u64,
    /// After the lazy mark: the ranges it says memory may come for.
    coming: Option<Vec<(u64, u64)>>,
}

impl Build {
    fn new() -> Build {
        Build {
            site: None,
            meta: None,
            admitted: false,
            memory_bytes: 0,
            coming: None,
        }
    }

    fn done(self) -> Result<Incoming> {
        match (self.site, self.meta) {
            (Some(site), Some(meta)) => Ok(Incoming {
                site,
                meta,
                memory_bytes: self.memory_bytes,
            }),
            _ => Err(bad("no metadata record")),
        }
    }
}

/// Reads records from `r` and restores them as they come, until the body ends, or, with
/// `to_lazy`, until its lazy mark (true then).
#[allow(clippy::too_many_arguments)]
fn records<R: Read + ?Sized>(
    r: &mut R,
    recs: &mut Records,
    b: &mut Build,
    opts: RestoreOptions,
    creds: &CredOptions,
    mode: Mode,
    admit: &mut dyn FnMut(u64) -> Result<()>,
    to_lazy: bool,
) -> Result<bool> {
    let mut at_lazy = false;
    while !recs.ended() {
        let Build {
            site,
            meta,
            admitted,
            memory_bytes,
            coming,
        } = b;
        // A pre-copy record: admitted by what the process had when its rounds began.
        let mut resident = None;
        let mut pre = |tag: u8, payload: &[u8]| -> Result<()> {
            if tag == crate::records::TAG_PRECOPY {
                let pc: crate::records::PreCopy = crate::read::decode2(payload, "pre-copy")?;
                resident = Some(pc.resident);
            }
            Ok(())
        };
        let admit2 = &mut *admit;
        recs.next(r, &mut pre, &mut |ev| {
            match ev {
                Event::Layout(l) => match site {
                    None => *site = Some(Site::begin(&l.to_image(), opts, creds, mode)?),
                    Some(s) => s.reshape(&l.vmas)?,
                },
                Event::Final(m) => {
                    let s = match site {
                        Some(s) => s,
                        None => {
                            if !*admitted {
                                admit2(m.memory_estimate)?;
                                *admitted = true;
                            }
                            site.insert(Site::begin(&m, opts, creds, mode)?)
                        }
                    };
                    let t = std::time::Instant::now();
                    s.final_state(&m)?;
                    tracing::debug!("final state of {} taken in {:?}", s.pid, t.elapsed());
                    *meta = Some(*m);
                }
                Event::Drops(d) => {
                    // (After the lazy mark: pages that are zero, as they are here.)
                    if let (Some(s), None) = (site.as_mut(), &coming) {
                        s.drops(&d)?;
                    }
                }
                Event::Pages { vaddr, data, .. } => {
                    let s = site.as_mut().ok_or_else(|| bad("memory before metadata"))?;
                    if !s.holds(vaddr, data.len() as u64) {
                        return Err(bad(format!(
                            "memory at {vaddr:#x} outside the process's private memory"
                        )));
                    }
                    s.pages(&[(vaddr, data)])?;
                    *memory_bytes += data.len() as u64;
                }
                Event::Shmem {
                    ino, offset, data, ..
                } => {
                    let s = site.as_mut().ok_or_else(|| bad("memory before metadata"))?;
                    s.shmem_data(ino, offset, data)?;
                    *memory_bytes += data.len() as u64;
                }
                Event::Lazy(c) => {
                    at_lazy = true;
                    *coming = Some(c);
                }
            }
            Ok(())
        })?;
        if let Some(n) = resident.filter(|_| !b.admitted) {
            admit(n)?;
            b.admitted = true;
        }
        if at_lazy && to_lazy {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Restores a process from an image read from `r` while it arrives, and lets it run (or
/// holds it, `opts.hold`): [`crate::restore_with`] for a stream (`mosix restart -`).
/// `r` must end with the image.
pub fn restore_stream<R: Read>(
    r: R,
    opts: RestoreOptions,
    creds: &CredOptions,
) -> Result<Restored> {
    let limits = ReadLimits::system();
    let mut r = r;
    let inc = receive(&mut r, opts, creds, None, limits, &mut within(limits))?;
    no_more(&mut r)?;
    Ok(inc.complete(None, false)?.0)
}

/// A process restored by [`restore_stream_running`].
#[derive(Debug)]
pub struct RanEarly {
    pub restored: Restored,
    /// What was put in after it began to run (None: it ran only once all of it was in:
    /// the image has no lazy mark, or its memory could not be followed).
    pub filled: Option<crate::lazy::Filled>,
    /// How it ended, if it did while it was stopped a moment at the end of the fill (its
    /// wait status was taken then).
    pub ended: Option<crate::sys::Stop>,
    /// From the call until it ran (with `filled` None: until the call returned).
    pub running_after: std::time::Duration,
}

/// As [`restore_stream`], but the process runs as soon as everything except its private
/// anonymous memory has arrived (post-copy: an image of format 3.4 says where that
/// memory begins, and `mosix checkpoint` writes it last, the stacks first): the rest is
/// put in as it comes ([`crate::postcopy`]), and a page the process touches before its
/// bytes arrived waits for them. Returns once the whole image arrived and checked out.
///
/// The process runs before the image's last records and its checksum are read: if they
/// turn out damaged or missing, the process (which ran meanwhile) is killed and the
/// error returned. An image without the mark (or one compressed with zstd) is restored
/// as [`restore_stream`] does. `r` must end with the image.
pub fn restore_stream_running<R: Read + Send>(
    r: R,
    opts: RestoreOptions,
    creds: &CredOptions,
) -> Result<RanEarly> {
    let t_call = std::time::Instant::now();
    let limits = ReadLimits::system();
    let mut admit = within(limits);
    let (mut hr, head, compression, v, mut chain) = open(r)?;
    if compression == Compression::Zstd || v < crate::image::LAZY_MARK {
        let back = std::io::Cursor::new(head).chain(hr.inner);
        let restored = restore_stream(back, opts, creds)?;
        return Ok(RanEarly {
            restored,
            filled: None,
            ended: None,
            running_after: t_call.elapsed(),
        });
    }
    let mut body = |r: &mut dyn ReadSend| -> Result<Early> {
        let mode = Mode::Plain;
        let mut recs = Records::new(v, limits, &mut chain);
        let mut b = Build::new();
        if records(r, &mut recs, &mut b, opts, creds, mode, &mut admit, true)? {
            run_early(r, &mut recs, b, opts, creds, mode, &mut admit)
        } else {
            Ok(Early::No(Box::new(b.done()?)))
        }
    };
    let (ran, frame) = if compression == Compression::Lz4 {
        let mut d = lz4_flex::frame::FrameDecoder::new(&mut hr);
        let ran = body(&mut d)?;
        (ran, frame_end(&mut d))
    } else {
        (body(&mut hr)?, Ok(()))
    };
    let checked = frame
        .and_then(|()| check_sum(&mut hr, &chain))
        .and_then(|()| no_more(&mut hr.inner));
    match ran {
        Early::No(inc) => {
            checked?;
            Ok(RanEarly {
                restored: inc.complete(None, false)?.0,
                filled: None,
                ended: None,
                running_after: t_call.elapsed(),
            })
        }
        Early::Yes(restored, arrivals, ran) => {
            if let Err(e) = checked {
                drop(arrivals);
                end(&restored);
                return Err(e);
            }
            arrivals.all_arrived();
            let (filled, ended) = arrivals.finish();
            Ok(RanEarly {
                restored,
                filled: Some(filled),
                ended,
                running_after: ran - t_call,
            })
        }
    }
}

/// Admits a process whose memory fits `limits` (a restore of this machine's own).
fn within(limits: ReadLimits) -> impl FnMut(u64) -> Result<()> {
    move |need: u64| {
        if need > limits.max_memory {
            return Err(Error::Unrestorable(format!(
                "the image declares {} MiB of memory contents, more than the {} MiB available here",
                need >> 20,
                limits.max_memory >> 20
            )));
        }
        Ok(())
    }
}

/// A reader that may be handed to another thread.
trait ReadSend: Read + Send {}
impl<T: Read + Send> ReadSend for T {}

/// An lz4 frame ends with the end record (its end mark and checksum are read now).
fn frame_end<R: Read>(d: &mut R) -> Result<()> {
    let mut more = [0u8; 1];
    match d.read(&mut more) {
        Ok(0) => Ok(()),
        Ok(_) => Err(bad("trailing data after the end record")),
        Err(e) => Err(bad(format!("damaged compressed data: {e}"))),
    }
}

/// Nothing after the image.
fn no_more<R: Read>(r: &mut R) -> Result<()> {
    let mut more = [0u8; 1];
    loop {
        match r.read(&mut more) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(bad("trailing data after the image")),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

/// Kills a restored process that must not go on, and reaps it (and its namespace's init).
fn end(r: &Restored) {
    let _ = crate::sys::kill(r.pid, libc::SIGKILL);
    let _ = crate::sys::wait(r.pid);
    if let Some(i) = r.ns_init {
        let _ = crate::sys::wait(i);
    }
}

enum Early {
    /// Held, all of it in.
    No(Box<Incoming>),
    /// Running (since the instant), its private memory still arriving.
    Yes(Restored, crate::postcopy::Arrivals, std::time::Instant),
}

/// At the lazy mark: the process is made whole but for its private anonymous memory and
/// let run, while the rest of the records (memory only) are read from `r` and put in as
/// they come, up to the end record. If its memory cannot be followed (no userfaultfd
/// here, say), the records are put in first and it is made at the end, as without a mark.
#[allow(clippy::too_many_arguments)]
fn run_early<R: Read + Send + ?Sized>(
    r: &mut R,
    recs: &mut Records,
    mut b: Build,
    opts: RestoreOptions,
    creds: &CredOptions,
    mode: Mode,
    admit: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Early> {
    let (Some(mut site), Some(meta)) = (b.site.take(), b.meta.take()) else {
        return Err(bad("no metadata record"));
    };
    let coming = b.coming.clone().unwrap_or_default();
    let arrivals = match site.with(&meta, |bu| crate::postcopy::start(bu, &meta, &coming)) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(pid = site.pid, "it runs once all its memory is in: {e}");
            b.site = Some(site);
            b.meta = Some(meta);
            records(r, recs, &mut b, opts, creds, mode, admit, false)?;
            return Ok(Early::No(Box::new(b.done()?)));
        }
    };
    let t0 = std::time::Instant::now();
    // (This thread is kept on one CPU while it makes the process: see crate::cpu.)
    let cpus = crate::cpu::original();
    let (made, read) = std::thread::scope(|sc| {
        let reader = sc.spawn(|| -> Result<u64> {
            crate::cpu::free(cpus);
            let mut bytes = 0u64;
            while !recs.ended() {
                recs.next(r, &mut |_, _| Ok(()), &mut |ev| match ev {
                    Event::Pages { vaddr, data, .. } => {
                        let len = data.len() as u64;
                        if !crate::postcopy::within(arrivals.areas(), vaddr, len) {
                            return Err(bad(format!(
                                "memory at {vaddr:#x} after the lazy mark is not private anonymous memory"
                            )));
                        }
                        arrivals.arrive(vaddr, data)?;
                        bytes += len;
                        Ok(())
                    }
                    Event::Drops(d) => arrivals.zeros(&d),
                    _ => Err(bad("a record other than memory after the lazy mark")),
                })?;
            }
            Ok(bytes)
        });
        // Meanwhile (what it touches now may wait for the records above): the rest of it.
        let made = site.complete(&meta, false);
        let ran = std::time::Instant::now();
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(Error::Unrestorable("the image reader failed".into())));
        (made.map(|m| (m, ran)), read)
    });
    match (made, read) {
        (Ok(((restored, _, _), ran)), Ok(bytes)) => {
            tracing::debug!(
                pid = restored.pid,
                mib = (b.memory_bytes + bytes) >> 20,
                "ran after {:?}; all of its image arrived after {:?}",
                ran - t0,
                t0.elapsed()
            );
            Ok(Early::Yes(restored, arrivals, ran))
        }
        (Ok(((restored, _, _), _)), Err(e)) => {
            drop(arrivals);
            end(&restored);
            Err(e)
        }
        (Err(e), _) => Err(e),
    }
}
