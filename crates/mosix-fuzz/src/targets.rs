//! The fuzz targets: each a function of the input bytes that feeds them to one parser the
//! way a file or a peer would, plus the seeds its mutations start from.
//!
//! A target never checks results: it only has to return. Its return value classes the
//! outcome (which error, with the numbers taken out) so the runner can keep inputs that
//! reach somewhere new.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use chitchat::{ChitchatId, ChitchatMessage, Deserializable, Serializable};
use mosix_ckpt::image::{
    read_image_bytes_with, Compression, Fd, FdKind, FileId, ImageWriter, PendingSignal,
    ProcessImage, ReadLimits, SigAction, Vma, VmaKind,
};
use mosix_proto::channel::{Channel, ChannelKeys, KeyRing, PrivateKey};
use mosix_proto::control::{Client, Request, Response};
use mosix_proto::seal::Sealer;
use mosix_proto::wire;
use mosix_proto::{LoadVector, ProtocolVersion, PROTOCOL_VERSION};

use crate::craft;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// What it feeds, and to what.
    pub about: &'static str,
    /// Inputs to start from (valid ones, mostly).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input; returns the class of the outcome.
    pub run: fn(&[u8]) -> u64,
    /// Mutated inputs are cut to this length.
    pub max_len: usize,
    /// The most bytes one input of `len` bytes may make the target's thread allocate.
    pub alloc_bound: fn(usize) -> u64,
}

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "image_raw",
            about: "read_image_bytes on mutated images (all checksums as mutated)",
            seeds: image_seeds,
            run: image_raw,
            max_len: 8 << 20,
            alloc_bound: image_bound,
        },
        Target {
            name: "image_sums",
            about: "read_image_bytes on mutated images whose header and file checksums are then fixed (reaches the decompressors)",
            seeds: image_seeds,
            run: image_sums,
            max_len: 8 << 20,
            alloc_bound: image_bound,
        },
        Target {
            name: "image_body",
            about: "read_image_bytes on images built from a mutated uncompressed body with every record checksum fixed (reaches the record and metadata parsers)",
            seeds: body_seeds,
            run: image_body,
            max_len: 8 << 20,
            alloc_bound: image_bound,
        },
        Target {
            name: "wire",
            about: "wire::recv/expect of every message type, and read_chunks, on a byte stream",
            seeds: wire_seeds,
            run: wire_frames,
            max_len: 4 << 20,
            alloc_bound: wire_bound,
        },
        Target {
            name: "channel",
            about: "the Noise channel: handshake from arbitrary bytes (both roles), and frames after a real handshake",
            seeds: channel_seeds,
            run: channel,
            max_len: 1 << 20,
            alloc_bound: |n| (1 << 20) + 8 * n as u64,
        },
        Target {
            name: "lent_frames",
            about: "a channel's receiving side lent to a supervisor: FrameReader over the stream, with bytes the lender had read, then what it gives back",
            seeds: lent_seeds,
            run: lent_frames,
            max_len: 1 << 20,
            alloc_bound: |n| (2 << 20) + 8 * n as u64,
        },
        Target {
            name: "control",
            about: "control Request and Response parsing from JSON lines",
            seeds: control_seeds,
            run: control,
            max_len: 1 << 20,
            alloc_bound: |n| (1 << 20) + 64 * n as u64,
        },
        Target {
            name: "control_client",
            about: "Client::call against a socket that answers with the input",
            seeds: control_answer_seeds,
            run: control_client,
            max_len: 1 << 20,
            alloc_bound: |n| (1 << 20) + 64 * n as u64,
        },
        Target {
            name: "gossip_open",
            about: "Sealer::open of a datagram, then the chitchat parser on what opens",
            seeds: datagram_seeds,
            run: gossip_open,
            max_len: 65_507,
            alloc_bound: gossip_bound,
        },
        Target {
            name: "gossip_payload",
            about: "an authenticated gossip payload: gossip::check_payload then ChitchatMessage::deserialize (as mosixd), LoadVector JSON, ProtocolVersion",
            seeds: payload_seeds,
            run: gossip_payload,
            max_len: 65_507,
            alloc_bound: gossip_bound,
        },
    ]
}

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// The class of an outcome: a hash of its text without digits (so "byte 12" and
/// "byte 13" are one class).
pub fn class(s: &str) -> u64 {
    let mut h = mosix_ckpt::sum::Xxh3::new();
    for b in s.bytes().filter(|b| !b.is_ascii_digit()) {
        h.update(&[b]);
    }
    h.digest()
}

// ------------------------------------------------------------------------------ images

/// The memory a fuzzed image may take: small enough that the allocation bound catches
/// anything that does not respect it.
pub const IMAGE_LIMIT: u64 = 64 << 20;

fn image_bound(n: usize) -> u64 {
    // The reader's limit covers the decompressed body and the metadata decoded from it;
    // beyond it, copies of the input.
    IMAGE_LIMIT + 16 * n as u64 + (4 << 20)
}

fn read_image(b: Vec<u8>) -> u64 {
    match read_image_bytes_with(b, &ReadLimits::bytes(IMAGE_LIMIT)) {
        Ok(img) => {
            // Touch what a restore would use.
            let mut sum = img.memory_bytes();
            for p in img.pages() {
                sum = sum.wrapping_add(p.vaddr ^ p.data.first().copied().unwrap_or(0) as u64);
            }
            std::hint::black_box(sum);
            class("ok")
        }
        Err(e) => class(&e.to_string()),
    }
}

fn image_raw(d: &[u8]) -> u64 {
    read_image(d.to_vec())
}

fn image_sums(d: &[u8]) -> u64 {
    let mut b = d.to_vec();
    craft::fix_sums(&mut b);
    read_image(b)
}

/// First byte: compression (low 2 bits: 0 none, 1 lz4, 2 zstd) and format (bit 6 set:
/// the current one, else 1.x; bit 7 set: 1.0, else 1.2); the rest: the uncompressed body.
fn image_body(d: &[u8]) -> u64 {
    let Some((&sel, body)) = d.split_first() else {
        return class("empty");
    };
    let code = (sel & 3) % 3;
    let version = if sel & 0x40 != 0 {
        (
            mosix_ckpt::image::FORMAT_MAJOR,
            mosix_ckpt::image::FORMAT_MINOR,
        )
    } else if sel & 0x80 != 0 {
        (1, 0)
    } else {
        (1, mosix_ckpt::records::V1_LAST_MINOR)
    };
    let mut body = body.to_vec();
    craft::fix_record_sums(&mut body);
    read_image(craft::image_of(
        code,
        version,
        &craft::compress(code, &body),
    ))
}

fn sample_meta(pages: u64) -> ProcessImage {
    let id = FileId {
        dev: 2049,
        ino: 1234,
        size: 8192,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
    };
    ProcessImage {
        arch: "x86_64".into(),
        kernel: "6.18.0".into(),
        hostname: "node1".into(),
        pid: 4242,
        comm: "fuzz".into(),
        exe: "/usr/bin/fuzz".into(),
        exe_id: Some(id.clone()),
        cwd: "/tmp".into(),
        umask: 0o22,
        creds: mosix_ckpt::image::Creds {
            uid: [1000; 4],
            gid: [1000; 4],
            groups: vec![1000, 27],
        },
        rlimits: vec![(7, 1024, 4096), (3, 8 << 20, u64::MAX)],
        vmas: vec![
            Vma {
                start: 0x40_0000,
                end: 0x40_2000,
                prot: 5,
                shared: false,
                growsdown: false,
                kind: VmaKind::File {
                    path: "/usr/bin/fuzz".into(),
                    offset: 0,
                    id,
                },
                anon_name: None,
            },
            Vma {
                start: 0x1000,
                end: 0x1000 + pages * 4096,
                prot: 3,
                shared: false,
                growsdown: false,
                kind: VmaKind::Anon,
                anon_name: Some("heap".into()),
            },
            Vma {
                start: 0x7fff_f000,
                end: 0x8000_1000,
                prot: 1,
                shared: false,
                growsdown: false,
                kind: VmaKind::Special("[vdso]".into()),
                anon_name: None,
            },
        ],
        regs: vec![0x11; 27 * 8],
        xstate: vec![0; 576],
        sigactions: vec![SigAction {
            signo: 2,
            handler: 0x40_1000,
            flags: 0x0400_0000,
            restorer: 0x40_1100,
            mask: 0,
        }],
        pending: vec![PendingSignal {
            shared: true,
            siginfo: vec![10; 128],
        }],
        itimers: vec![[0, 0, 1, 500]],
        rseq: Some(mosix_ckpt::image::Rseq {
            addr: 0x2000,
            len: 32,
            sig: 0x53053053,
        }),
        fds: vec![
            Fd {
                fd: 0,
                cloexec: false,
                kind: FdKind::Inherit { was: "pipe".into() },
            },
            Fd {
                fd: 3,
                cloexec: true,
                kind: FdKind::File {
                    path: "/tmp/out".into(),
                    flags: 0o101,
                    pos: 17,
                    id: None,
                },
            },
        ],
        memory_estimate: pages * 4096,
        clocks: Some(mosix_ckpt::image::Clocks {
            monotonic_ns: 1,
            boottime_ns: 2,
        }),
        caps: Some(mosix_ckpt::Caps {
            inheritable: 0,
            permitted: 0xe3,
            effective: 0xe3,
            bounding: 0xe3,
            ambient: 0,
        }),
        ..Default::default()
    }
}

/// Images made by the writer API, in every compression, and a few hand-made ones.
pub fn writer_images() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        for pages in [0u64, 1, 3] {
            let meta = sample_meta(pages);
            let Ok(mut w) = ImageWriter::new(Vec::new(), c, &meta) else {
                continue;
            };
            let data: Vec<u8> = (0..pages * 4096).map(|i| (i * 7 % 251) as u8).collect();
            if pages > 0 {
                let _ = w.pages(0x1000, &data[..4096]);
                let _ = w.pages(0x1000 + 4096, &data[4096..]);
            }
            if let Ok(b) = w.finish() {
                out.push(b);
            }
        }
    }
    // Format 1.0 (metadata without clocks and caps, the last two fields), uncompressed,
    // by hand.
    let full = postcard::to_stdvec(&mosix_ckpt::records::ProcessImageV1::from(&ProcessImage {
        clocks: None,
        caps: None,
        memory_estimate: 4096,
        ..sample_meta(1)
    }))
    .unwrap_or_default();
    let old = &full[..full.len().saturating_sub(2)];
    let mut body = craft::record(craft::TAG_META, old);
    let mut page = 0x1000u64.to_le_bytes().to_vec();
    page.extend_from_slice(&[0x5a; 4096]);
    body.extend(craft::record(craft::TAG_PAGES, &page));
    body.extend(craft::end_record(3, (old.len() + page.len()) as u64));
    out.push(craft::image(craft::C_NONE, 0, &body));
    // Small bombs, for the mutations to grow.
    out.push(craft::zeros_bomb(1 << 20));
    out.push(craft::meta_then_zeros_bomb(4096, 1 << 20));
    out.push(craft::valid_records_bomb(16 << 20, 3));
    out
}

/// Images of a real process (`sleep`), checkpointed in every compression; empty if this
/// process may not trace it (not root, ptrace forbidden).
pub fn checkpoint_images() -> Vec<Vec<u8>> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("1000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: close_range is async-signal-safe and touches no memory. Descriptors we were
    // given without close-on-exec (pipes of whatever started us) would make the process
    // one that cannot be checkpointed.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    };
    let Ok(mut child) = cmd.spawn() else {
        return Vec::new();
    };
    // Let it get to its sleep (an image of a half-started process is as good, but this
    // makes the seeds alike from run to run).
    std::thread::sleep(Duration::from_millis(50));
    let mut out = Vec::new();
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let opts = mosix_ckpt::DumpOptions {
            leave_running: true,
            compression: c,
        };
        match mosix_ckpt::checkpoint(child.id() as i32, Vec::new(), opts, &mut |_, _| {}) {
            Ok((b, _)) => out.push(b),
            Err(e) => {
                if std::env::var_os("MOSIX_FUZZ_VERBOSE").is_some() {
                    eprintln!("checkpoint of a sleep for seeds: {e}");
                }
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    out
}

fn image_seeds() -> Vec<Vec<u8>> {
    writer_images()
}

/// `[selector] body` of every seed image.
pub fn bodies_of(images: &[Vec<u8>]) -> Vec<Vec<u8>> {
    images
        .iter()
        .filter_map(|i| {
            let (code, body) = craft::body_of(i)?;
            let major = u16::from_le_bytes([i[8], i[9]]);
            let minor = u16::from_le_bytes([i[10], i[11]]);
            let sel = code
                | match (major, minor) {
                    (1, 0) => 0x80,
                    (1, _) => 0,
                    _ => 0x40,
                };
            Some([&[sel][..], &body].concat())
        })
        .collect()
}

fn body_seeds() -> Vec<Vec<u8>> {
    // Not the bombs: megabytes to compress again at every execution.
    let imgs = writer_images();
    let n = imgs.len() - 3;
    bodies_of(&imgs[..n])
}

// -------------------------------------------------------------------------------- wire

/// The most a fuzzed migration stream may bring (the receiver's limit).
pub const CHUNK_LIMIT: u64 = 8 << 20;

fn wire_bound(n: usize) -> u64 {
    // What arrived, held at most twice (a buffer that doubles), plus what serde
    // pre-allocates for a sequence whose length a frame claims (at most 1 MiB, and a
    // frame may legitimately hold that much).
    (2 << 20) + 4 * n as u64
}

const WIRE_KINDS: u8 = 12;

fn drain<T: serde::de::DeserializeOwned>(r: &mut &[u8]) -> u64 {
    for _ in 0..10_000 {
        match wire::recv::<_, T>(r) {
            Ok(Some(m)) => {
                std::hint::black_box(&m);
            }
            Ok(None) => return class("end"),
            Err(e) => return class(&format!("{:?} {e}", e.kind())),
        }
    }
    class("many")
}

/// Frames of the supervisor/deputy protocol (mosix-remote's own framing).
/// Frames read and decoded as the deputy and the supervisor do (from the frame kept:
/// `decode_shared`).
fn drain_remote<T>(
    r: &mut &[u8],
    decode: impl Fn(mosix_remote::wire::Bytes) -> Result<T, mosix_remote::wire::FrameError>,
) -> u64 {
    for _ in 0..10_000 {
        match mosix_remote::wire::recv_bytes(r)
            .and_then(|f| f.map(|f| decode(f.into())).transpose())
        {
            Ok(Some(m)) => {
                std::hint::black_box(&m);
            }
            Ok(None) => return class("end"),
            Err(e) => return class(&format!("{e}")),
        }
    }
    class("many")
}

/// First byte: which message type (or stream) to read; the rest: the bytes a peer sent.
fn wire_frames(d: &[u8]) -> u64 {
    let Some((&sel, mut r)) = d.split_first() else {
        return class("empty");
    };
    let sel = sel % WIRE_KINDS;
    let c = match sel {
        0 => drain::<wire::Hello>(&mut r),
        1 => drain::<wire::ToHome>(&mut r),
        2 => drain::<wire::ToHost>(&mut r),
        3 => drain_remote(&mut r, mosix_remote::wire::ToDeputy::decode_shared),
        4 => drain_remote(&mut r, mosix_remote::wire::FromDeputy::decode_shared),
        5 => drain::<wire::Verdict>(&mut r),
        6 => drain::<wire::Decision>(&mut r),
        7 => drain::<wire::Tail>(&mut r),
        8 => drain::<wire::MigrateHeader>(&mut r),
        9 => drain::<wire::LinkHello>(&mut r),
        10 => match wire::read_chunks(&mut r, CHUNK_LIMIT) {
            Ok(b) => {
                std::hint::black_box(&b);
                drain::<wire::Tail>(&mut r)
            }
            Err(e) => class(&format!("{:?} {e}", e.kind())),
        },
        // A migration as the receiver reads it: hello, image chunks, tail, decision.
        _ => match wire::expect::<_, wire::Hello>(&mut r) {
            Ok(wire::Hello::Migrate(h)) => {
                std::hint::black_box(&h);
                match wire::read_chunks(&mut r, CHUNK_LIMIT) {
                    Ok(img) => {
                        let c = wire::expect::<_, wire::Tail>(&mut r)
                            .and_then(|_| wire::expect::<_, wire::Decision>(&mut r));
                        let i = read_image(img);
                        class(&format!("{} {i}", c.is_ok()))
                    }
                    Err(e) => class(&format!("{:?} {e}", e.kind())),
                }
            }
            Ok(wire::Hello::Link(_)) => drain::<wire::ToHome>(&mut r),
            Ok(wire::Hello::Resolve(q)) => class(&format!("resolve {}", q.epoch)),
            // A checkpoint as home reads it: hello, image chunks, its end.
            Ok(wire::Hello::Checkpoint(h)) => {
                std::hint::black_box(&h);
                match wire::copy_chunks(&mut r, &mut std::io::sink(), CHUNK_LIMIT) {
                    Ok(n) => {
                        let e = wire::expect::<_, wire::CkptEnd>(&mut r);
                        class(&format!("{n} {}", e.is_ok()))
                    }
                    Err(e) => class(&format!("{:?} {e}", e.kind())),
                }
            }
            Err(e) => class(&format!("{:?} {e}", e.kind())),
        },
    };
    c ^ sel as u64
}

fn remote_framed<T: serde::Serialize>(sel: u8, msgs: &[T]) -> Vec<u8> {
    let mut b = vec![sel];
    for m in msgs {
        let _ = mosix_remote::wire::send(&mut b, m);
    }
    b
}

fn framed<T: serde::Serialize>(sel: u8, msgs: &[T]) -> Vec<u8> {
    let mut b = vec![sel];
    for m in msgs {
        let _ = wire::send(&mut b, m);
    }
    b
}

fn migrate_header() -> wire::MigrateHeader {
    wire::MigrateHeader {
        home: 1,
        home_pid: 4242,
        from: 2,
        epoch: 3,
        uid: 1000,
        cmd: "sleep 10".into(),
        pinned: false,
        avoid: vec![3, 4],
        migrations: 2,
        reason: "load".into(),
        offer: Some("{\"gain\":1.5}".into()),
        hostname: "home".into(),
        no_new_privs: false,
        shared_paths: vec!["/shared".into()],
    }
}

fn wire_seeds() -> Vec<Vec<u8>> {
    use wire::*;
    let link = LinkHello {
        home_pid: 7,
        epoch: 2,
        node: 3,
    };
    let mut v = vec![
        framed(
            0,
            &[
                Hello::Migrate(migrate_header()),
                Hello::Link(link.clone()),
                Hello::Checkpoint(wire::CkptHello {
                    home_pid: 7,
                    epoch: 2,
                    node: 3,
                    id: 4,
                }),
            ],
        ),
        framed(
            1,
            &[
                ToHome::Deputy(b"frame".to_vec().into()),
                ToHome::Left {
                    to: 2,
                    frozen_ms: 5,
                    memory_bytes: 4096,
                    rounds: vec![4096, 0],
                },
                ToHome::MigrateFailed {
                    to: 3,
                    reason: "refused".into(),
                },
                ToHome::CheckpointFailed {
                    id: 4,
                    reason: mosix_proto::wire::CkptError::Busy,
                },
                ToHome::Frozen {
                    freeze: true,
                    error: None,
                },
            ],
        ),
        framed(
            2,
            &[
                ToHost::Deputy(b"frame".to_vec().into()),
                ToHost::Migrate { to: 0 },
                ToHost::Kill,
                ToHost::Checkpoint {
                    id: 4,
                    then: mosix_proto::control::After::Stop,
                },
                ToHost::Freeze { freeze: false },
            ],
        ),
        remote_framed(
            3,
            &[
                mosix_remote::wire::ToDeputy::Call(mosix_remote::wire::Call {
                    seq: 1,
                    tid: 2,
                    nr: 1,
                    args: [1, 0, 5, 0, 0, 0],
                    bufs: vec![
                        mosix_remote::wire::Buf::None,
                        mosix_remote::wire::Buf::In(b"hello".to_vec()),
                    ],
                    took: vec![mosix_remote::wire::Took { stream: 4, upto: 9 }],
                }),
                mosix_remote::wire::ToDeputy::Cancel { seq: 1 },
                mosix_remote::wire::ToDeputy::Mark { id: 3 },
                mosix_remote::wire::ToDeputy::Rewind {
                    id: 3,
                    message: "back".into(),
                },
                mosix_remote::wire::ToDeputy::Took {
                    took: vec![mosix_remote::wire::Took {
                        stream: 4,
                        upto: 10,
                    }],
                    stop: true,
                },
                mosix_remote::wire::ToDeputy::Behind {
                    stream: 4,
                    n: 0,
                    off: Some(7),
                    data: b"behind".to_vec().into(),
                },
                mosix_remote::wire::ToDeputy::Sync {
                    seq: 5,
                    took: vec![],
                },
                mosix_remote::wire::ToDeputy::Adopt {
                    seq: 6,
                    fd: 3,
                    path: b"/shared/f".to_vec(),
                    flags: 2,
                    offset: 100,
                    cloexec: true,
                },
                mosix_remote::wire::ToDeputy::Exited(mosix_remote::wire::ExitStatus::Code(3)),
            ],
        ),
        remote_framed(
            4,
            &[
                mosix_remote::wire::FromDeputy::Signal { sig: 2 },
                mosix_remote::wire::FromDeputy::Rewound {
                    id: 3,
                    result: Ok(9),
                },
                mosix_remote::wire::FromDeputy::Reply(mosix_remote::wire::Reply::Done {
                    seq: 1,
                    ret: 5,
                    outs: vec![],
                    sigs: 0,
                    begin: Some(mosix_remote::wire::Begin::Ahead {
                        kind: mosix_remote::wire::Kind::Read,
                        file: (1, 2),
                        from: 5,
                    }),
                }),
                mosix_remote::wire::FromDeputy::Ahead {
                    stream: 1,
                    fd: 3,
                    kind: mosix_remote::wire::Kind::Pread,
                    file: (1, 2),
                    off: 5,
                    data: b"ahead".to_vec().into(),
                    eof: true,
                },
                mosix_remote::wire::FromDeputy::Stale { streams: vec![1] },
                mosix_remote::wire::FromDeputy::Grant {
                    stream: 4,
                    fd: 5,
                    file: (1, 3),
                    credit: 1 << 20,
                    applied: 1,
                },
                mosix_remote::wire::FromDeputy::Revoke { stream: 4 },
                mosix_remote::wire::FromDeputy::Synced { seq: 5 },
                mosix_remote::wire::FromDeputy::Adopted { seq: 6, ret: -2 },
            ],
        ),
        framed(
            5,
            &[
                Verdict::Ready,
                Verdict::Refused("no".into()),
                Verdict::Running { host_pid: 99 },
            ],
        ),
        framed(6, &[Decision::Commit, Decision::Abort]),
        framed(
            7,
            &[Tail {
                next_seq: 1 << 40,
                proc_fds: vec![(4, "status".into())],
                figures: wire::MoveFigures {
                    frozen_ms: 3,
                    memory_bytes: 1 << 30,
                    rounds: vec![1 << 29, 4096],
                },
                cwd: Some("/home/u/work".into()),
            }],
        ),
        framed(8, &[migrate_header()]),
        framed(9, &[link]),
    ];
    // Image chunks and the rest of a migration.
    let img = writer_images().swap_remove(2);
    for sel in [10u8, 11] {
        let mut b = vec![sel];
        if sel == 11 {
            let _ = wire::send(&mut b, &Hello::Migrate(migrate_header()));
        }
        let mut w = ChunkWriter::new(b);
        let _ = w.write_all(&img);
        let Ok(mut b) = w.finish() else { continue };
        let _ = wire::send(
            &mut b,
            &Tail {
                next_seq: 3,
                proc_fds: vec![],
                figures: Default::default(),
                cwd: None,
            },
        );
        let _ = wire::send(&mut b, &Decision::Commit);
        v.push(b);
    }
    v
}

// ----------------------------------------------------------------------------- channel

const SECRET: &[u8] = b"fuzz cluster secret";

/// Reads from the input, writes to nowhere.
struct Duplex<'a>(&'a [u8]);
impl Read for Duplex<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}
impl Write for Duplex<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keys of node `node` of a two-node cluster (fixed keys), or the shared secret alone.
fn channel_keys(keyed: bool, node: u32) -> ChannelKeys {
    if !keyed {
        return ChannelKeys::shared_secret_only(SECRET);
    }
    let private =
        |n: u32| PrivateKey::from_hex(&format!("{:02x}", n).repeat(32)).expect("a valid fixed key");
    let mut ring = KeyRing::default();
    for n in 1..=2 {
        ring.insert(n, private(n).public()).expect("distinct keys");
    }
    ChannelKeys::new(SECRET, node, private(node), ring).expect("the node's own key")
}

/// First byte: `% 3` is 0 accept, 1 connect (the handshake read from the input), 2 frames
/// sent after a real handshake; `/ 3 % 2` selects per-node keys or the shared secret alone;
/// the rest: what the peer sends.
fn channel(d: &[u8]) -> u64 {
    let Some((&sel, rest)) = d.split_first() else {
        return class("empty");
    };
    let keyed = (sel / 3) % 2 == 1;
    let (k1, k2) = (channel_keys(keyed, 1), channel_keys(keyed, 2));
    match sel % 3 {
        0 | 1 => {
            let ch = if sel % 3 == 0 {
                Channel::accept(Duplex(rest), &k1)
            } else {
                Channel::connect(Duplex(rest), &k1, 2)
            };
            match ch {
                Ok(mut c) => {
                    let mut out = Vec::new();
                    let r = c.read_to_end(&mut out);
                    class(&format!("open {}", r.is_ok()))
                }
                Err(e) => class(&e.to_string()),
            }
        }
        _ => {
            let Ok((a, b)) = std::os::unix::net::UnixStream::pair() else {
                return class("no socket");
            };
            let raw = rest.to_vec();
            let peer = std::thread::spawn(move || {
                if let Ok(c) = Channel::connect(a, &k2, 1) {
                    let mut s = c.get_ref();
                    let _ = s.write_all(&raw);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            });
            let c = match Channel::accept(b, &k1) {
                Ok(mut c) => {
                    let mut out = Vec::new();
                    match c.read_to_end(&mut out) {
                        Ok(_) => class("read"),
                        Err(e) => class(&format!("{:?} {e}", e.kind())),
                    }
                }
                Err(e) => class(&e.to_string()),
            };
            if let Err(p) = peer.join() {
                std::panic::resume_unwind(p);
            }
            c
        }
    }
}

/// The key of the lent receiving side in [`lent_frames`].
const LENT_KEY: [u8; 32] = [0x42; 32];

/// First two bytes: how many of the rest the lender had read (BE, at most the rest); the
/// rest: the stream. Read to its end frame (or an error), then given back.
fn lent_frames(d: &[u8]) -> u64 {
    use mosix_proto::transport::{FrameReader, LentKey, RecvLend};
    if d.len() < 2 {
        return class("short");
    }
    let rest = &d[2..];
    let k = (u16::from_be_bytes([d[0], d[1]]) as usize).min(rest.len());
    let lend = RecvLend {
        key: LentKey {
            key: LENT_KEY,
            nonce: 0,
        },
        plain: Vec::new(),
        raw: rest[..k].to_vec(),
    };
    let mut r = FrameReader::new(&rest[k..], lend);
    let mut out = Vec::new();
    let got = r.read_to_end(&mut out);
    let (_, plain, raw) = r.give_back();
    match got {
        Ok(_) => class(&format!(
            "read, back {} {}",
            plain.is_empty(),
            raw.is_empty()
        )),
        Err(e) => class(&format!("{:?} {e}", e.kind())),
    }
}

fn lent_seeds() -> Vec<Vec<u8>> {
    use mosix_proto::transport::{FrameWriter, LentKey};
    let mut out = Vec::new();
    for (n, split) in [(10usize, 0u16), (70_000, 7), (200_000, 65_000)] {
        let mut w = FrameWriter::new(
            Vec::new(),
            &LentKey {
                key: LENT_KEY,
                nonce: 0,
            },
        );
        let _ = w.write_all(&vec![0x5a; n]);
        let Ok((mut wire, nonce)) = w.finish() else {
            continue;
        };
        // The end frame (empty), then bytes beyond it.
        let mut c = mosix_proto::transport::Cipher::new(LENT_KEY, nonce);
        let mut end = mosix_proto::transport::Filling::default();
        if end.seal(&mut c).is_ok() {
            wire.extend_from_slice(end.take_sealed());
        }
        wire.extend_from_slice(&[0, 20, 1, 2, 3]);
        out.push([&split.to_be_bytes()[..], &wire].concat());
    }
    out
}

fn channel_seeds() -> Vec<Vec<u8>> {
    // What a real initiator sends first, and a responder's answer shape.
    let (a, mut b) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(_) => return vec![vec![0], vec![1], vec![2]],
    };
    let t = std::thread::spawn(move || Channel::connect(a, &channel_keys(false, 2), 1).is_ok());
    let _ = b.set_read_timeout(Some(Duration::from_secs(5)));
    let mut first = vec![0u8; 2];
    let got = b.read_exact(&mut first).is_ok();
    let n = u16::from_be_bytes([first[0], first[1]]) as usize;
    let mut msg = vec![0u8; n];
    let _ = got && b.read_exact(&mut msg).is_ok();
    drop(b);
    let _ = t.join();
    let hs = [first, msg].concat();
    vec![
        [&[0u8][..], &hs].concat(),
        [&[1u8][..], &hs].concat(),
        vec![2, 0, 16, 1, 2, 3],
        [&[2u8][..], &[0x00, 0x20], &[0x55; 32]].concat(),
    ]
}

// ----------------------------------------------------------------------------- control

/// Every line (and the whole input) as a request, and as an answer.
fn control(d: &[u8]) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    for line in d.split(|&b| b == b'\n').chain(std::iter::once(d)) {
        seen.insert(match serde_json::from_slice::<Request>(line) {
            Ok(r) => format!("{:?}", std::mem::discriminant(&r)),
            Err(e) => format!("{:?}", e.classify()),
        });
        seen.insert(match serde_json::from_slice::<Response>(line) {
            Ok(r) => format!("answer {:?}", std::mem::discriminant(&r)),
            Err(e) => format!("answer {:?}", e.classify()),
        });
    }
    class(&format!("{seen:?}"))
}

fn requests() -> Vec<Request> {
    vec![
        Request::Ping,
        Request::Status,
        Request::Register(mosix_proto::control::RegisterRequest {
            argv: vec!["sleep".into(), "1".into()],
            to: Some(2),
            best: false,
            pinned: true,
            avoid: vec![3],
            checkpoint: Some(mosix_proto::control::CheckpointSpec {
                file: "/tmp/job.ckpt".into(),
                every_min: Some(0.5),
            }),
        }),
        Request::Checkpoint {
            pid: 42,
            then: mosix_proto::control::After::Exit,
        },
        Request::Freeze {
            pid: 42,
            freeze: true,
        },
        Request::Restore(mosix_proto::control::RestoreRequest {
            file: "/tmp/job.ckpt.3".into(),
            checkpoint: None,
            pinned: false,
            avoid: vec![],
        }),
        Request::Mosctl {
            cmd: "block".into(),
        },
        Request::Migrate { pid: 42, to: 0 },
        Request::Where { pid: 42 },
        Request::Ps,
        Request::Deputy {
            home_pid: 42,
            token: "00ff".into(),
            arena: true,
        },
    ]
}

fn responses() -> Vec<Response> {
    use mosix_proto::*;
    let lv = LoadVector {
        load: 1.5,
        runnable: 3.0,
        util: 0.5,
        speed: 2.0,
        cpus: 2,
        mem_total: 1 << 30,
        mem_free: 1 << 29,
        procs: 7,
        proto: PROTOCOL_VERSION,
        flags: FLAG_ACCEPTS_GUESTS,
    };
    vec![
        Response::Pong {
            node: 1,
            version: "0.1.0".into(),
            peer_uid: 1000,
        },
        Response::Status(ClusterStatus {
            this_node: 1,
            protocol: PROTOCOL_VERSION,
            uptime_s: 12.5,
            gossip: GossipStats::default(),
            nodes: vec![NodeStatus {
                node: 2,
                address: "10.0.0.2:5400".into(),
                status: 3,
                state: NodeState::Up,
                this_node: false,
                load: Some(lv),
                age_ms: Some(120),
            }],
        }),
        Response::Registered { home_pid: 77 },
        Response::DeputyOk,
        Response::Migrated {
            pid: 77,
            to: 2,
            frozen_ms: 30,
            memory_bytes: 1 << 20,
            rounds: vec![1 << 20, 4096],
        },
        Response::Where { pid: 77, node: 2 },
        Response::Checkpointed {
            pid: 77,
            file: "/tmp/job.ckpt.3".into(),
            frozen_ms: 40,
            memory_bytes: 1 << 20,
        },
        Response::Frozen {
            pid: 77,
            frozen: true,
        },
        Response::Ps {
            node: 1,
            procs: vec![mosix_proto::control::ProcEntry {
                home: 1,
                home_pid: 77,
                pid: 77,
                role: "home".into(),
                where_: 2,
                state: "away".into(),
                uid: 1000,
                cmd: "sleep".into(),
                rss: 4096,
                cpu_secs: 0.5,
                resident_secs: 3.0,
                reason: "load".into(),
                ppid: Some(70),
            }],
        },
        Response::Mode {
            stay: false,
            lstay: true,
            block: false,
            expel: false,
        },
        Response::Error {
            message: "no such process".into(),
        },
    ]
}

fn control_seeds() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = requests()
        .iter()
        .filter_map(|r| serde_json::to_vec(r).ok())
        .collect();
    v.extend(
        responses()
            .iter()
            .filter_map(|r| serde_json::to_vec(r).ok()),
    );
    let all: Vec<u8> = v.join(&b'\n');
    v.push(all);
    v
}

fn control_answer_seeds() -> Vec<Vec<u8>> {
    responses()
        .iter()
        .filter_map(|r| serde_json::to_vec(r).ok())
        .map(|mut l| {
            l.push(b'\n');
            l
        })
        .collect()
}

/// A control socket in this process that answers each connection's first line with the
/// next answer sent to it.
struct FakeDaemon {
    path: std::path::PathBuf,
    answers: Mutex<mpsc::Sender<Vec<u8>>>,
}

fn fake_daemon() -> Option<&'static FakeDaemon> {
    static D: OnceLock<Option<FakeDaemon>> = OnceLock::new();
    D.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("mosix-fuzz-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).ok()?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let Ok(answer) = rx.recv() else { return };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut line = Vec::new();
                let mut r = std::io::BufReader::new(&s);
                let _ = std::io::BufRead::read_until(&mut r, b'\n', &mut line);
                let _ = s.write_all(&answer);
            }
        });
        Some(FakeDaemon {
            path,
            answers: Mutex::new(tx),
        })
    })
    .as_ref()
}

fn control_client(d: &[u8]) -> u64 {
    let Some(daemon) = fake_daemon() else {
        return class("no socket");
    };
    match daemon.answers.lock() {
        Ok(tx) => {
            if tx.send(d.to_vec()).is_err() {
                return class("daemon gone");
            }
        }
        Err(_) => return class("poisoned"),
    }
    let mut c = match Client::connect(&daemon.path, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => return class(&e.to_string()),
    };
    let r = c.call(&Request::Status);
    match r {
        Ok(r) => class(&format!("{:?}", std::mem::discriminant(&r))),
        Err(e) => class(&format!("{e}")),
    }
}

// ------------------------------------------------------------------------------ gossip

/// What one gossip payload of `n` bytes may make the receiver allocate: the payload's
/// own bytes many times over, and what chitchat's parser makes of a delta within
/// `gossip::MAX_DELTA_CONTENT` (the smallest operations: about 11 times its size).
fn gossip_bound(n: usize) -> u64 {
    (2 << 20) + 64 * n as u64 + 12 * mosix_proto::gossip::MAX_DELTA_CONTENT
}

/// The receiver's clock in the gossip targets (datagrams are sealed at this time).
pub const NOW_MS: u64 = 1_700_000_000_000;

fn gossip_open(d: &[u8]) -> u64 {
    let mut s = Sealer::new(SECRET);
    match s.open(NOW_MS, d) {
        Ok(o) => class("opened") ^ gossip_payload(&o.payload),
        Err(e) => class(&e.to_string()),
    }
}

fn datagram_seeds() -> Vec<Vec<u8>> {
    let s = Sealer::new(SECRET);
    payload_seeds()
        .iter()
        .map(|p| s.seal(3, NOW_MS, p))
        .chain([s.seal(1, NOW_MS + 10, b""), s.seal(1, 0, b"old")])
        .collect()
}

/// The payload as mosixd takes it apart: its delta's bounds checked, then a chitchat
/// message; and as a load vector (the value of a node's `load` key) and a protocol
/// version (its `proto` key).
fn gossip_payload(d: &[u8]) -> u64 {
    let c = match mosix_proto::gossip::check_payload(d) {
        Err(e) => class(&e.to_string()),
        Ok(_) => {
            let mut b = d;
            match ChitchatMessage::deserialize(&mut b) {
                Ok(m) => class(&format!("{:?}", std::mem::discriminant(&m))),
                Err(e) => class(&e.to_string()),
            }
        }
    };
    let l = match serde_json::from_slice::<LoadVector>(d) {
        Ok(_) => 1,
        Err(e) => class(&format!("{:?}", e.classify())),
    };
    let p = std::str::from_utf8(d)
        .ok()
        .map(|s| s.parse::<ProtocolVersion>().is_ok());
    c ^ l.rotate_left(7) ^ class(&format!("{p:?}")).rotate_left(13)
}

/// Delta operations: a node and its keys.
fn delta_ops(id: &ChitchatId, kvs: &[(&str, &str)]) -> Vec<u8> {
    let mut ops = vec![0u8];
    id.serialize(&mut ops);
    ops.extend_from_slice(&0u64.to_le_bytes());
    ops.extend_from_slice(&0u64.to_le_bytes());
    for (i, (k, v)) in kvs.iter().enumerate() {
        ops.push(1);
        k.to_string().serialize(&mut ops);
        v.to_string().serialize(&mut ops);
        ops.extend_from_slice(&(i as u64 + 1).to_le_bytes());
        ops.push(0);
    }
    ops
}

/// A chitchat delta stream: the first node's operations in an uncompressed block, the
/// second's in a zstd-compressed one.
fn delta_stream(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut s = vec![2u8];
    s.extend_from_slice(&(a.len() as u16).to_le_bytes());
    s.extend_from_slice(a);
    if let Ok(z) = zstd::bulk::compress(b, 0) {
        s.push(1);
        s.extend_from_slice(&(z.len() as u16).to_le_bytes());
        s.extend_from_slice(&z);
    }
    s.push(0);
    s
}

fn payload_seeds() -> Vec<Vec<u8>> {
    let lv = LoadVector {
        load: 0.25,
        runnable: 0.5,
        util: 0.1,
        speed: 2.0,
        cpus: 4,
        mem_total: 8 << 30,
        mem_free: 6 << 30,
        procs: 12,
        proto: PROTOCOL_VERSION,
        flags: 1,
    };
    let lv_json = serde_json::to_string(&lv).unwrap_or_default();
    let id = ChitchatId::new(
        "node-2".into(),
        1_700_000_000,
        std::net::SocketAddr::from(([10, 0, 0, 2], 5400)),
    );
    let head = |t: u8| {
        let mut b = 45_139u16.to_le_bytes().to_vec();
        b.push(0);
        b.push(t);
        b
    };
    // Syn: digest of one node, then the cluster id.
    let mut syn = head(0);
    1u16.serialize(&mut syn);
    id.serialize(&mut syn);
    for v in [7u64, 0, 2] {
        v.serialize(&mut syn);
    }
    "mosix".to_string().serialize(&mut syn);
    let id3 = ChitchatId::new(
        "node-3".into(),
        1_700_000_001,
        std::net::SocketAddr::from(([10, 0, 0, 3], 5400)),
    );
    let kvs = [("proto", "1.0"), ("load", lv_json.as_str())];
    let mut more = delta_ops(&id3, &kvs);
    more.push(2);
    more.extend_from_slice(&9u64.to_le_bytes());
    let delta = delta_stream(&delta_ops(&id, &kvs), &more);
    // SynAck: digest, delta.
    let mut synack = head(1);
    synack.extend_from_slice(&syn[4..syn.len() - 7]);
    synack.extend_from_slice(&delta);
    let mut ack = head(2);
    ack.extend_from_slice(&delta);
    let mut v = vec![
        syn,
        synack,
        ack,
        ChitchatMessage::BadCluster.serialize_to_vec(),
        lv_json.into_bytes(),
        b"1.0".to_vec(),
    ];
    v.push(head(1));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_where_they_should_be() {
        // The writer images read back (the bombs, at the end, do not).
        let imgs = writer_images();
        for (i, img) in imgs.iter().enumerate().take(imgs.len() - 3) {
            assert_eq!(read_image(img.clone()), class("ok"), "seed image {i}");
        }
        for b in bodies_of(&imgs).iter().take(imgs.len() - 3) {
            assert_eq!(image_body(b), class("ok"));
        }
        // Chitchat messages parse.
        for p in payload_seeds().iter().take(4) {
            let mut b = &p[..];
            ChitchatMessage::deserialize(&mut b).unwrap();
            assert!(b.is_empty());
        }
        for r in control_seeds() {
            std::hint::black_box(control(&r));
        }
    }
}
