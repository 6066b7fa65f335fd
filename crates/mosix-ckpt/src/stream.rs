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
    let mut chain = (v >= CHAINED).then(|| {
        hr.h = None;
        Chain::new(&head)
    });
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
        Compression::None => records(&mut hr, v, opts, creds, mode, limits, admit, &mut chain)?,
        Compression::Lz4 => {
            let mut d = lz4_flex::frame::FrameDecoder::new(&mut hr);
            let inc = records(&mut d, v, opts, creds, mode, limits, admit, &mut chain)?;
            // The frame ends with the end record (its end mark and checksum read now).
            let mut more = [0u8; 1];
            match d.read(&mut more) {
                Ok(0) => {}
                Ok(_) => return Err(bad("trailing data after the end record")),
                Err(e) => return Err(bad(format!("damaged compressed data: {e}"))),
            }
            inc
        }
    };
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
    Ok(incoming)
}

/// Reads the records of a body from `r` and restores them as they come (each record's
/// head and checksum into `chain`, if any).
#[allow(clippy::too_many_arguments)]
fn records<R: Read>(
    r: &mut R,
    v: crate::read::Version,
    opts: RestoreOptions,
    creds: &CredOptions,
    mode: Mode,
    limits: ReadLimits,
    admit: &mut dyn FnMut(u64) -> Result<()>,
    chain: &mut Option<Chain>,
) -> Result<Incoming> {
    let mut parser = Parser::new(v, limits);
    let mut buf: Vec<u8> = Vec::new();
    let mut site: Option<Site> = None;
    let mut meta: Option<ProcessImage> = None;
    let mut admitted = false;
    let mut memory_bytes = 0u64;
    let mut n = 0u64;
    while !parser.ended() {
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
        if buf.len() < whole {
            buf.resize(whole, 0);
        }
        buf[..9].copy_from_slice(&head);
        r.read_exact(&mut buf[9..whole]).map_err(eof)?;
        let buf = &buf[..whole];
        if !crate::read::record_sum_ok(buf) {
            return Err(bad(format!(
                "checksum mismatch in record {n} (damaged image)"
            )));
        }
        if let Some(c) = chain {
            c.record(
                &head,
                u64::from_le_bytes(buf[9 + len..].try_into().expect("8 bytes")),
            );
        }
        n += 1;
        let payload = &buf[9..9 + len];
        if tag == crate::records::TAG_PRECOPY && !admitted {
            let pc: crate::records::PreCopy = crate::read::decode2(payload, "pre-copy")?;
            admit(pc.resident)?;
            admitted = true;
        }
        parser.record(tag, payload, 9, &mut |ev| {
            match ev {
                Event::Layout(l) => match &mut site {
                    None => site = Some(Site::begin(&l.to_image(), opts, creds, mode)?),
                    Some(s) => s.reshape(&l.vmas)?,
                },
                Event::Final(m) => {
                    let s = match &mut site {
                        Some(s) => s,
                        None => {
                            if !admitted {
                                admit(m.memory_estimate)?;
                                admitted = true;
                            }
                            site.insert(Site::begin(&m, opts, creds, mode)?)
                        }
                    };
                    let t = std::time::Instant::now();
                    s.final_state(&m)?;
                    tracing::debug!("final state of {} taken in {:?}", s.pid, t.elapsed());
                    meta = Some(*m);
                }
                Event::Drops(d) => {
                    if let Some(s) = &mut site {
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
                    memory_bytes += data.len() as u64;
                }
                Event::Shmem {
                    ino, offset, data, ..
                } => {
                    let s = site.as_mut().ok_or_else(|| bad("memory before metadata"))?;
                    s.shmem_data(ino, offset, data)?;
                    memory_bytes += data.len() as u64;
                }
            }
            Ok(())
        })?;
    }
    match (site, meta) {
        (Some(site), Some(meta)) => Ok(Incoming {
            site,
            meta,
            memory_bytes,
        }),
        _ => Err(bad("no metadata record")),
    }
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
    let inc = receive(&mut r, opts, creds, None, limits, &mut |need| {
        if need > limits.max_memory {
            return Err(Error::Unrestorable(format!(
                "the image declares {} MiB of memory contents, more than the {} MiB available here",
                need >> 20,
                limits.max_memory >> 20
            )));
        }
        Ok(())
    })?;
    let mut more = [0u8; 1];
    loop {
        match r.read(&mut more) {
            Ok(0) => break,
            Ok(_) => return Err(bad("trailing data after the image")),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(inc.complete(None, false)?.0)
}
