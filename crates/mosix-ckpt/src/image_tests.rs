//! Tests of the image format: round trips, damage, old versions.
use super::*;
use crate::records::{ProcessImageV1, V1_LAST_MINOR};
use crate::sum::xxh3_64;

fn sample(c: Compression) -> Vec<u8> {
    let meta = ProcessImage {
        comm: "t".into(),
        memory_estimate: 8192,
        ..Default::default()
    };
    let mut w = ImageWriter::new(Vec::new(), c, &meta).unwrap();
    let page: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    w.pages(0x1000, &page).unwrap();
    w.finish().unwrap()
}

#[test]
fn round_trip_each_compression() {
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let img = read_image(&sample(c)[..]).unwrap();
        assert_eq!(img.meta.comm, "t");
        let runs: Vec<_> = img.pages().collect();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].vaddr, 0x1000);
        assert_eq!(runs[0].data[9], 63u8);
    }
}

/// A damaged image is refused, or reads exactly as the good one: from format 3.3 the
/// checksums are of what the image holds, and a compressed image can change where what it
/// holds does not (e.g. lz4 copying a run of equal bytes from 1 or 2 bytes back).
fn refused_or_same(bad: Result<LoadedImage>, good: &LoadedImage) -> bool {
    let pages = |i: &LoadedImage| -> Vec<(u64, Vec<u8>)> {
        i.pages().map(|p| (p.vaddr, p.data.to_vec())).collect()
    };
    match bad {
        Err(_) => true,
        Ok(b) => b.meta == good.meta && pages(&b) == pages(good),
    }
}

#[test]
fn every_flipped_bit_is_detected() {
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let good = sample(c);
        let read = read_image(&good[..]).unwrap();
        // Every bit of small images; a stride through bigger ones.
        let step = (good.len() * 8 / 4000).max(1);
        for bit in (0..good.len() * 8).step_by(step) {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let r = read_image(&b[..]);
            // Uncompressed, every byte is in a checksum.
            assert!(
                if c == Compression::None {
                    r.is_err()
                } else {
                    refused_or_same(r, &read)
                },
                "{c:?}: flip of bit {bit} not detected"
            );
        }
    }
}

#[test]
fn truncation_and_garbage_are_detected() {
    let good = sample(Compression::None);
    for cut in 0..good.len() {
        assert!(read_image(&good[..cut]).is_err(), "cut at {cut}");
    }
    let mut more = good.clone();
    more.push(0);
    assert!(read_image(&more[..]).is_err());
}

/// A compressed body cut anywhere (and compressed again, with valid checksums, as
/// anyone can) is an error, never a panic: the body is read record by record.
#[test]
fn compressed_bodies_cut_anywhere_are_errors() {
    let body = {
        let b = sample(Compression::None);
        b[HEADER_LEN..b.len() - 8].to_vec()
    };
    for c in [Compression::Lz4, Compression::Zstd] {
        for cut in 0..body.len() {
            let stored = match c {
                Compression::Lz4 => {
                    let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                    e.write_all(&body[..cut]).unwrap();
                    e.finish().unwrap()
                }
                _ => zstd::bulk::compress(&body[..cut], 1).unwrap(),
            };
            let mut b = header(c).to_vec();
            let sum = crate::image::chain_of(&b, &body[..cut]).unwrap_or(0);
            b.extend_from_slice(&stored);
            b.extend_from_slice(&sum.to_le_bytes());
            let e = read_image(&b[..]).err().unwrap().to_string();
            assert!(e.starts_with("bad image: "), "{c:?} cut at {cut}: {e}");
        }
    }
}

/// One body record: tag, length, payload, checksum.
fn rec(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![tag];
    r.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    r.extend_from_slice(payload);
    let sum = xxh3_64(&r);
    r.extend_from_slice(&sum.to_le_bytes());
    r
}

/// An uncompressed image of format 1.`minor` holding `meta`, whose metadata record
/// is the current one without the `drop` trailing `Option` fields (each None: one 0
/// byte), as an older mosix wrote it.
fn older_image(meta: &ProcessImage, minor: u16, drop: usize) -> Vec<u8> {
    let full = postcard::to_stdvec(&ProcessImageV1::from(meta)).unwrap();
    assert!(full[full.len() - drop..].iter().all(|&b| b == 0));
    let old_meta = &full[..full.len() - drop];
    let mut b = header(Compression::None).to_vec();
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    b[10..12].copy_from_slice(&minor.to_le_bytes());
    let sum = xxh3_64(&b[..24]);
    b[24..32].copy_from_slice(&sum.to_le_bytes());
    b.extend(rec(TAG_META, old_meta));
    let mut page = 0x1000u64.to_le_bytes().to_vec();
    page.extend_from_slice(&[0x5a; 4096]);
    b.extend(rec(TAG_PAGES, &page));
    let mut end = 3u64.to_le_bytes().to_vec();
    end.extend_from_slice(&((old_meta.len() + page.len()) as u64).to_le_bytes());
    b.extend(rec(TAG_END, &end));
    let sum = xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

fn old_meta() -> ProcessImage {
    ProcessImage {
        comm: "old".into(),
        creds: Creds {
            uid: [1000; 4],
            gid: [100; 4],
            groups: vec![100, 27],
        },
        memory_estimate: 4096,
        ..Default::default()
    }
}

#[test]
fn format_1_0_images_read_without_clocks_or_caps() {
    // A 1.0 metadata record is the 1.2 one without the trailing `clocks` and `caps`.
    let img = read_image(&older_image(&old_meta(), 0, 2)[..]).unwrap();
    assert_eq!(img.meta, old_meta());
    assert_eq!(img.meta.clocks, None);
    assert_eq!(img.meta.caps, None);
    assert_eq!(img.pages().count(), 1);
}

#[test]
fn format_1_1_images_read_without_caps() {
    // A 1.1 metadata record is the 1.2 one without the trailing `caps`.
    let meta = ProcessImage {
        clocks: Some(Clocks {
            monotonic_ns: 5,
            boottime_ns: 7,
        }),
        ..old_meta()
    };
    let img = read_image(&older_image(&meta, 1, 1)[..]).unwrap();
    assert_eq!(img.meta, meta);
    assert_eq!(img.meta.caps, None);
    let runs: Vec<_> = img.pages().collect();
    assert_eq!(
        (runs.len(), runs[0].vaddr, runs[0].data[4095]),
        (1, 0x1000, 0x5a)
    );
}

#[test]
fn format_1_2_images_keep_clocks_and_caps() {
    let meta = ProcessImage {
        clocks: Some(Clocks::default()),
        caps: Some(crate::Caps {
            inheritable: 0,
            permitted: 0xe3,
            effective: 0xe3,
            bounding: 0xe3,
            ambient: 0,
        }),
        ..old_meta()
    };
    let img = read_image(&older_image(&meta, 2, 0)[..]).unwrap();
    assert_eq!(img.meta, meta);
    assert!(img.meta.threads.is_empty());
}

fn thread(tid: i32, fs_base: u64) -> ThreadImage {
    let regs = crate::sys::Regs {
        fs_base,
        rip: 0x401000 + tid as u64,
        ..zero_regs()
    };
    ThreadImage {
        tid,
        comm: format!("worker-{tid}"),
        regs: crate::sys::regs_to_bytes(&regs),
        fs_base,
        gs_base: 0,
        xstate: vec![tid as u8; 64],
        blocked: 1 << 13,
        pending: vec![PendingSignal {
            shared: false,
            siginfo: vec![10; 128],
        }],
        sigaltstack: (0x7000_0000, 0, 8192),
        rseq: Some(Rseq {
            addr: 0x7f00_0000 + tid as u64,
            len: 32,
            sig: 0x53053053,
        }),
        robust_list: (0x7f10_0000 + tid as u64, 24),
        clear_child_tid: 0x7f20_0000 + tid as u64,
    }
}

/// `img` (before format 3.3) with the version in its header changed, and its checksums
/// made right again.
fn as_version(img: &[u8], major: u16, minor: u16) -> Vec<u8> {
    assert!((major, minor) < crate::image::CHAINED);
    let mut b = img.to_vec();
    b[8..10].copy_from_slice(&major.to_le_bytes());
    b[10..12].copy_from_slice(&minor.to_le_bytes());
    let sum = xxh3_64(&b[..24]);
    b[24..32].copy_from_slice(&sum.to_le_bytes());
    let n = b.len() - 8;
    let sum = xxh3_64(&b[..n]);
    b[n..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Ends an uncompressed image of the current format (header and records) with its
/// checksum: the chain of its records.
fn seal(mut b: Vec<u8>) -> Vec<u8> {
    let sum = crate::image::chain_of(&b[..HEADER_LEN], &b[HEADER_LEN..]).unwrap();
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

/// The image's checksum (3.3 on) is the chain of its records: records each right but
/// swapped, dropped or doubled are refused; and an image of 3.2, whose checksum is of
/// all its bytes, is still read, and refused when one of them is changed.
#[test]
fn the_chain_of_records_holds_them_in_order_and_older_images_still_read() {
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let meta = ProcessImage {
            pid: 77,
            memory_estimate: 8192,
            ..old_meta()
        };
        let mut w = ImageWriter::new(Vec::new(), c, &meta).unwrap();
        w.pages(0x1000, &[7u8; 4096]).unwrap();
        w.pages(0x3000, &[8u8; 4096]).unwrap();
        let good = w.finish().unwrap();
        assert!(read_image(&good[..]).is_ok(), "{c:?}");
        // The same image as 3.2 wrote it (its checksum of every byte) reads the same.
        let old = as_version(&good, 3, 2);
        assert_eq!(read_image(&old[..]).unwrap().meta, meta);
        let mut bad = old.clone();
        let last = bad.len() - 9;
        bad[last] ^= 1;
        assert!(read_image(&bad[..]).is_err(), "{c:?}");
    }
    // Uncompressed: the two memory records swapped, one dropped, one doubled (every
    // record's own checksum right).
    let meta = ProcessImage {
        pid: 77,
        memory_estimate: 8192,
        ..old_meta()
    };
    let mut w = ImageWriter::new(Vec::new(), Compression::None, &meta).unwrap();
    w.pages(0x1000, &[7u8; 4096]).unwrap();
    w.pages(0x3000, &[8u8; 4096]).unwrap();
    let good = w.finish().unwrap();
    let body = &good[HEADER_LEN..good.len() - 8];
    let mut recs = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let len = u64::from_le_bytes(body[pos + 1..pos + 9].try_into().unwrap()) as usize;
        recs.push(&body[pos..pos + 17 + len]);
        pos += 17 + len;
    }
    let pages: Vec<usize> = (0..recs.len())
        .filter(|&i| recs[i][0] == TAG_PAGES)
        .collect();
    assert_eq!(pages.len(), 2);
    let trailer = &good[good.len() - 8..];
    let with = |order: &[usize]| {
        let mut b = good[..HEADER_LEN].to_vec();
        for &i in order {
            b.extend_from_slice(recs[i]);
        }
        b.extend_from_slice(trailer);
        read_image(&b[..]).err().map(|e| e.to_string())
    };
    let all: Vec<usize> = (0..recs.len()).collect();
    assert_eq!(with(&all), None);
    let mut swapped = all.clone();
    swapped.swap(pages[0], pages[1]);
    let dropped: Vec<usize> = all.iter().copied().filter(|&i| i != pages[1]).collect();
    let mut doubled = all.clone();
    doubled.insert(pages[1], pages[1]);
    for (what, order) in [
        ("swapped", swapped),
        ("dropped", dropped),
        ("doubled", doubled),
    ] {
        let e = with(&order).unwrap_or_else(|| panic!("{what}: read"));
        assert!(e.starts_with("bad image: "), "{what}: {e}");
    }
}

fn zero_regs() -> crate::sys::Regs {
    crate::sys::regs_from_bytes(&[0u8; std::mem::size_of::<crate::sys::Regs>()]).unwrap()
}

#[test]
fn format_2_keeps_every_thread() {
    let meta = ProcessImage {
        pid: 77,
        regs: crate::sys::regs_to_bytes(&crate::sys::Regs {
            fs_base: 0x1234_0000,
            ..zero_regs()
        }),
        pending: vec![
            PendingSignal {
                shared: true,
                siginfo: vec![1; 128],
            },
            PendingSignal {
                shared: false,
                siginfo: vec![2; 128],
            },
        ],
        threads: vec![thread(78, 0x5000), thread(80, 0x6000)],
        pgid: 70,
        sid: 60,
        ..old_meta()
    };
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let mut w = ImageWriter::new(Vec::new(), c, &meta).unwrap();
        w.pages(0x1000, &[7u8; 4096]).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(
            (u16::from_le_bytes([bytes[8], bytes[9]]), bytes[10]),
            (3, crate::image::FORMAT_MINOR as u8)
        );
        // A plain 3.0 image is a 2.0 image but for its version: both read the same.
        for old in [false, true] {
            let bytes = if old {
                as_version(&bytes, 2, 0)
            } else {
                bytes.clone()
            };
            let new = read_image(&bytes[..]).unwrap();
            assert_eq!(new.meta, meta);
            assert_eq!(new.pages().count(), 1);
        }
    }
}

/// A format 2 body whose records disagree with its index is refused, also when every
/// checksum is right.
#[test]
fn format_2_records_must_match_the_index() {
    let meta = ProcessImage {
        pid: 77,
        threads: vec![thread(78, 0)],
        ..old_meta()
    };
    let (tree, p, threads) = records::split(&meta);
    let build = |tree: records::TreeEntry, threads: &[ThreadImage]| {
        let pb = postcard::to_stdvec(&p).unwrap();
        let tb: Vec<Vec<u8>> = threads
            .iter()
            .map(|t| postcard::to_stdvec(t).unwrap())
            .collect();
        let ix = Index {
            memory_estimate: p.memory_estimate,
            records_bytes: (pb.len() + tb.iter().map(Vec::len).sum::<usize>()) as u64,
            tree: vec![tree],
        };
        let ixb = postcard::to_stdvec(&ix).unwrap();
        let mut b = header(Compression::None).to_vec();
        b.extend(rec(TAG_INDEX, &ixb));
        b.extend(rec(TAG_PROCESS, &pb));
        let mut total = ixb.len() + pb.len();
        for t in &tb {
            b.extend(rec(TAG_THREAD, t));
            total += t.len();
        }
        let mut end = ((3 + tb.len()) as u64).to_le_bytes().to_vec();
        end.extend_from_slice(&(total as u64).to_le_bytes());
        b.extend(rec(TAG_END, &end));
        read_image(&seal(b)[..]).map(|i| i.meta)
    };
    assert_eq!(build(tree.clone(), &threads).unwrap(), meta);
    let e = build(tree.clone(), &threads[..1])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("do not match the process tree"), "{e}");
    let mut twice = tree.clone();
    twice.threads = vec![77, 78, 78];
    let e = build(
        twice,
        &[threads[0].clone(), threads[1].clone(), threads[1].clone()],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("duplicate thread IDs"), "{e}");
    let mut other = tree;
    other.pid = 5;
    let e = build(other, &threads).err().unwrap().to_string();
    assert!(e.starts_with("bad image: "), "{e}");
}

#[test]
fn newer_version_is_refused_clearly() {
    for (major, minor) in [
        (4u16, 0u16),
        (3, FORMAT_MINOR + 1),
        (2, 1),
        (1, V1_LAST_MINOR + 1),
    ] {
        let mut b = sample(Compression::None);
        b[8..10].copy_from_slice(&major.to_le_bytes());
        b[10..12].copy_from_slice(&minor.to_le_bytes());
        let sum = xxh3_64(&b[..24]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
        let e = read_image(&b[..]).err().unwrap().to_string();
        assert!(
            e.contains(&format!("image format {major}.{minor} is not supported"))
                && e.lines().count() == 1,
            "{e}"
        );
    }
    let e = read_image(&b"#!/bin/sh\necho hi\n...................."[..])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a mosix process image"), "{e}");
}

/// A private anonymous area (also for other modules' tests).
pub(crate) fn anon(start: u64, end: u64) -> Vma {
    Vma {
        start,
        end,
        prot: 3,
        shared: false,
        growsdown: false,
        kind: VmaKind::Anon,
        anon_name: None,
    }
}

/// Pre-copy rounds then the final state: a page later in the stream wins, a layout
/// keeps only what stays the same kind of memory, drops clear.
fn precopy_image(c: Compression) -> Vec<u8> {
    let a = anon(0x10000, 0x20000);
    let file = Vma {
        kind: VmaKind::File {
            path: "/x".into(),
            offset: 0,
            id: FileId {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_sec: 4,
                mtime_nsec: 5,
            },
        },
        ..anon(0x40000, 0x44000)
    };
    let b2 = anon(0x40000, 0x44000);
    let pc = records::PreCopy {
        budget: 40 << 12,
        layouts_bytes: 4096,
        rounds: 3,
        resident: 17 << 12,
    };
    let mut w = ImageWriter::precopy(Vec::new(), c, &pc).unwrap();
    let l1 = records::Layout {
        pid: 5,
        vmas: vec![a.clone(), file],
        ..Default::default()
    };
    w.layout(&l1, &[]).unwrap();
    w.pages(0x10000, &[1u8; 16 << 12]).unwrap();
    w.pages(0x40000, &[2u8; 4096]).unwrap();
    let l2 = records::Layout {
        vmas: vec![a.clone(), b2.clone()],
        ..l1
    };
    w.layout(&l2, &[(0x13000, 4096)]).unwrap();
    w.pages(0x15000, &[3u8; 4096]).unwrap();
    w.pages(0x41000, &[4u8; 4096]).unwrap();
    let meta = ProcessImage {
        pid: 5,
        vmas: vec![a, b2],
        memory_estimate: 4096 + 16,
        ..Default::default()
    };
    w.final_part(&meta, &[(0x16000, 4096)]).unwrap();
    w.pages(0x17000, &[5u8; 4096]).unwrap();
    w.finish().unwrap()
}

fn page_bytes(img: &LoadedImage) -> std::collections::BTreeMap<u64, u8> {
    let mut m = std::collections::BTreeMap::new();
    for p in img.pages() {
        for (i, pg) in p.data.chunks(4096).enumerate() {
            assert!(pg.iter().all(|&b| b == pg[0]));
            assert!(m.insert(p.vaddr + i as u64 * 4096, pg[0]).is_none());
        }
    }
    m
}

#[test]
fn precopy_rounds_resolve_to_the_final_memory() {
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let img = read_image(&precopy_image(c)[..]).unwrap();
        assert_eq!(img.meta.pid, 5);
        let mut want = std::collections::BTreeMap::new();
        for i in 0..16u64 {
            want.insert(0x10000 + i * 4096, 1u8);
        }
        want.remove(&0x13000);
        want.remove(&0x16000);
        want.insert(0x15000, 3);
        want.insert(0x17000, 5);
        // The file's page went with its mapping; the new area has its own.
        want.insert(0x41000, 4);
        assert_eq!(page_bytes(&img), want, "{c:?}");
        assert_eq!(img.memory_bytes(), 15 << 12);
    }
}

#[test]
fn precopy_damage_and_excess_are_refused() {
    for c in [Compression::None, Compression::Lz4] {
        let good = precopy_image(c);
        let read = read_image(&good[..]).unwrap();
        let step = (good.len() * 8 / 3000).max(1);
        for bit in (0..good.len() * 8).step_by(step) {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let r = read_image(&b[..]);
            let ok = if c == Compression::None {
                r.is_err()
            } else {
                refused_or_same(r, &read)
            };
            assert!(ok, "{c:?}: bit {bit}");
        }
    }
    // The writer keeps to what it declared.
    let pc = records::PreCopy {
        budget: 4096,
        layouts_bytes: 4096,
        rounds: 1,
        resident: 0,
    };
    let l = records::Layout {
        vmas: vec![anon(0x10000, 0x20000)],
        ..Default::default()
    };
    let mut w = ImageWriter::precopy(Vec::new(), Compression::None, &pc).unwrap();
    assert!(
        w.pages(0x10000, &[1u8; 4096]).is_err(),
        "memory before a layout"
    );
    w.layout(&l, &[]).unwrap();
    assert!(w.layout(&l, &[]).is_err(), "more rounds than declared");
    w.pages(0x10000, &[1u8; 4096]).unwrap();
    assert!(w.pages(0x11000, &[1u8; 4096]).is_err(), "over budget");
    let mut w = ImageWriter::precopy(Vec::new(), Compression::None, &pc).unwrap();
    w.layout(&l, &[]).unwrap();
    assert!(w.finish().is_err(), "no final state");
    // A reader refuses memory outside the layout's private memory.
    let mut w = ImageWriter::precopy(Vec::new(), Compression::None, &pc).unwrap();
    w.layout(&l, &[]).unwrap();
    w.pages(0x30000, &[1u8; 4096]).unwrap();
    w.final_part(&ProcessImage::default(), &[]).unwrap();
    let e = read_image(&w.finish().unwrap()[..])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("outside the process's private memory"), "{e}");
}

#[test]
fn madvise_advice_is_kept_and_older_process_records_read_without_it() {
    let meta = ProcessImage {
        pid: 7,
        advice: vec![(0x7000_0000, ADVICE_HUGEPAGE | ADVICE_WIPEONFORK)],
        ..Default::default()
    };
    let (_, p, _) = records::split(&meta);
    let payload = records::encode_proc(&p).unwrap();
    assert_eq!(records::decode_proc(&payload).unwrap().advice, meta.advice);
    // A 3.0 or 3.1 process record: the record alone.
    let older = postcard::to_stdvec(&p).unwrap();
    let q = records::decode_proc(&older).unwrap();
    assert!(q.advice.is_empty());
    assert_eq!(q.pid, 7);
    // A whole image keeps it.
    let w = ImageWriter::new(Vec::new(), Compression::None, &meta).unwrap();
    let back = crate::read::read_image_bytes(w.finish().unwrap()).unwrap();
    assert_eq!(back.meta.advice, meta.advice);
    // VmFlags to bits.
    let flags: Vec<String> = "rd wr mr mw me ac hg dc"
        .split(' ')
        .map(String::from)
        .collect();
    assert_eq!(advice_of(&flags), ADVICE_HUGEPAGE | ADVICE_DONTFORK);
}

/// An image read as it arrives is the image read whole; every flipped bit (but those that
/// change nothing it holds, see [`refused_or_same`]), cut or extra byte is an error there
/// too.
#[test]
fn streamed_read_equals_whole_read_and_detects_damage() {
    let lim = ReadLimits::bytes(1 << 30);
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        for good in [sample(c), precopy_image(c)] {
            let whole = read_image(&good[..]).unwrap();
            let streamed = read_image_streamed(&good[..], &lim).unwrap();
            assert_eq!(whole.meta, streamed.meta);
            let pages = |i: &LoadedImage| -> Vec<(u64, Vec<u8>)> {
                i.pages().map(|p| (p.vaddr, p.data.to_vec())).collect()
            };
            assert_eq!(pages(&whole), pages(&streamed));
            let step = (good.len() * 8 / 2000).max(1);
            for bit in (0..good.len() * 8).step_by(step) {
                let mut b = good.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let r = read_image_streamed(&b[..], &lim);
                let ok = if c == Compression::None {
                    r.is_err()
                } else {
                    refused_or_same(r, &whole)
                };
                assert!(ok, "{c:?}: flip of bit {bit} not detected");
            }
            for cut in (0..good.len()).step_by((good.len() / 300).max(1)) {
                assert!(
                    read_image_streamed(&good[..cut], &lim).is_err(),
                    "cut at {cut}"
                );
            }
            let mut more = good.clone();
            more.push(0);
            assert!(read_image_streamed(&more[..], &lim).is_err());
        }
    }
}

/// Format 3.4's lazy mark: the ranges memory may still come for, then only memory and
/// drop records (pages that are zero) and the end. Read whole, the image holds the same
/// memory as without the mark; a second mark, or a mark in an image of 3.3, is refused.
#[test]
fn the_lazy_mark_says_what_may_come_and_only_memory_follows_it() {
    let meta = ProcessImage {
        vmas: vec![anon(0x10000, 0x20000)],
        memory_estimate: 5 << 12,
        ..Default::default()
    };
    let image_c = |marks: usize, c: Compression| {
        let mut w = ImageWriter::new(Vec::new(), c, &meta).unwrap();
        for _ in 0..marks {
            w.lazy_from_here(&[(0x10000, 0x3000)]).unwrap();
        }
        w.pages(0x10000, &[7u8; 4096]).unwrap();
        w.zeros(&[(0x11000, 4096)]).unwrap();
        w.pages(0x12000, &[8u8; 4096]).unwrap();
        w.finish().unwrap()
    };
    let image = |marks: usize| image_c(marks, Compression::None);
    let want: std::collections::BTreeMap<u64, u8> = [(0x10000, 7), (0x12000, 8)].into();
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let img = read_image(&image_c(1, c)[..]).unwrap();
        assert_eq!(page_bytes(&img), want, "{c:?}");
    }
    let mut events = Vec::new();
    let mut p = crate::parse::Parser::new((3, 4), crate::limits::ReadLimits::system());
    let b = image(1);
    let body = &b[HEADER_LEN..b.len() - 8];
    let mut pos = 0;
    while pos < body.len() {
        let tag = body[pos];
        let len = u64::from_le_bytes(body[pos + 1..pos + 9].try_into().unwrap()) as usize;
        p.record(tag, &body[pos + 9..pos + 9 + len], pos + 9, &mut |ev| {
            events.push(match ev {
                crate::parse::Event::Lazy(c) => format!("lazy {c:x?}"),
                crate::parse::Event::Drops(d) => format!("zeros {d:x?}"),
                crate::parse::Event::Pages { vaddr, .. } => format!("pages {vaddr:x}"),
                crate::parse::Event::Final(_) => "final".into(),
                _ => "other".into(),
            });
            Ok(())
        })
        .unwrap();
        pos += 9 + len + 8;
    }
    assert_eq!(
        events,
        [
            "final",
            "lazy [(10000, 3000)]",
            "pages 10000",
            "zeros [(11000, 1000)]",
            "pages 12000"
        ]
    );
    let e = read_image(&image(2)[..]).err().unwrap().to_string();
    assert!(e.contains("after the lazy mark"), "{e}");
    // The same records in a 3.3 image: its reader does not know the mark.
    let mut old = image(1);
    old.truncate(old.len() - 8);
    old[10..12].copy_from_slice(&3u16.to_le_bytes());
    let sum = xxh3_64(&old[..24]);
    old[24..32].copy_from_slice(&sum.to_le_bytes());
    let e = read_image(&seal(old)[..]).err().unwrap().to_string();
    assert!(e.contains("unknown record type 10"), "{e}");
}
