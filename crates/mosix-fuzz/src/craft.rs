//! Hand-made inputs: images built byte by byte (the writer API cannot make bad ones), and
//! zstd frames written by hand, so a decompression bomb of gigabytes costs nothing to make.

use mosix_ckpt::image::{ProcessImage, HEADER_LEN, MAGIC};
use mosix_ckpt::records::ProcessImageV1;
use mosix_ckpt::sum::xxh3_64;

pub const TAG_META: u8 = 1;
pub const TAG_PAGES: u8 = 2;
pub const TAG_END: u8 = 255;

/// Compression codes as the image header stores them.
pub const C_NONE: u8 = 0;
pub const C_LZ4: u8 = 1;
pub const C_ZSTD: u8 = 2;

/// The 32-byte image header (format 1.`minor`).
pub fn header(compression: u8, minor: u16) -> [u8; HEADER_LEN] {
    header_of(compression, 1, minor)
}

/// The 32-byte image header of format `major`.`minor`.
pub fn header_of(compression: u8, major: u16, minor: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&major.to_le_bytes());
    h[10..12].copy_from_slice(&minor.to_le_bytes());
    h[12] = compression;
    let sum = xxh3_64(&h[..24]);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

/// One body record: tag, length, payload, checksum.
pub fn record(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(payload.len() + 17);
    r.push(tag);
    r.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    r.extend_from_slice(payload);
    let sum = xxh3_64(&r);
    r.extend_from_slice(&sum.to_le_bytes());
    r
}

/// The format 1.2 metadata record of `meta` (format 1 is still read).
pub fn meta_record(meta: &ProcessImage) -> Vec<u8> {
    record(
        TAG_META,
        &postcard::to_stdvec(&ProcessImageV1::from(meta)).unwrap_or_default(),
    )
}

/// The end record for `count` records (itself included) of `payload_total` bytes (its own
/// 16 not included).
pub fn end_record(count: u64, payload_total: u64) -> Vec<u8> {
    let mut p = count.to_le_bytes().to_vec();
    p.extend_from_slice(&payload_total.to_le_bytes());
    record(TAG_END, &p)
}

/// A whole image around `stored` (the body as stored, compressed as `compression` says):
/// header, body, the image's checksum.
pub fn image(compression: u8, minor: u16, stored: &[u8]) -> Vec<u8> {
    image_of(compression, (1, minor), stored)
}

/// [`image`] of format `version` (major, minor).
pub fn image_of(compression: u8, version: (u16, u16), stored: &[u8]) -> Vec<u8> {
    let mut b = header_of(compression, version.0, version.1).to_vec();
    b.extend_from_slice(stored);
    let sum = image_sum(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

/// The image checksum of `b` (header and body as stored, without the checksum): before
/// format 3.3 of all its bytes, from 3.3 the chain of its records (of the body as
/// decompressed, up to 64 MiB; 0 if it is not one).
pub fn image_sum(b: &[u8]) -> u64 {
    if b.len() < HEADER_LEN {
        return xxh3_64(b);
    }
    let version = (
        u16::from_le_bytes([b[8], b[9]]),
        u16::from_le_bytes([b[10], b[11]]),
    );
    if version < mosix_ckpt::image::CHAINED {
        return xxh3_64(b);
    }
    // (body_of takes a whole image: with a checksum place after the body.)
    let mut whole = b.to_vec();
    whole.extend_from_slice(&[0; 8]);
    body_of(&whole)
        .and_then(|(_, body)| mosix_ckpt::image::chain_of(&b[..HEADER_LEN], &body))
        .unwrap_or(0)
}

/// Recomputes the header checksum and the image checksum of an image in place (what
/// anyone can do: the checksums are not keyed).
pub fn fix_sums(b: &mut [u8]) {
    if b.len() >= HEADER_LEN {
        let sum = xxh3_64(&b[..24]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
    }
    if b.len() >= HEADER_LEN + 8 {
        let n = b.len() - 8;
        let sum = image_sum(&b[..n]);
        b[n..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Walks the records of an uncompressed body and recomputes each checksum it can reach,
/// so that mutations of the contents get past the checksums to the parser.
pub fn fix_record_sums(body: &mut [u8]) {
    let mut pos = 0usize;
    while body.len() - pos >= 17 {
        let len = u64::from_le_bytes(body[pos + 1..pos + 9].try_into().unwrap_or([0; 8]));
        let Some(sum_at) = (pos as u64 + 9)
            .checked_add(len)
            .filter(|&e| e + 8 <= body.len() as u64)
        else {
            return;
        };
        let sum_at = sum_at as usize;
        let sum = xxh3_64(&body[pos..sum_at]);
        body[sum_at..sum_at + 8].copy_from_slice(&sum.to_le_bytes());
        pos = sum_at + 8;
    }
}

/// Compresses a body as the image writer would (`code` as in the header).
pub fn compress(code: u8, body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match code {
        C_LZ4 => {
            let mut info = lz4_flex::frame::FrameInfo::new();
            info.content_checksum = true;
            let mut e = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            let _ = e.write_all(body);
            e.finish().unwrap_or_default()
        }
        C_ZSTD => zstd::bulk::compress(body, 1).unwrap_or_default(),
        _ => body.to_vec(),
    }
}

/// The uncompressed body of a well-formed image (None if it is not one).
pub fn body_of(img: &[u8]) -> Option<(u8, Vec<u8>)> {
    use std::io::Read;
    if img.len() < HEADER_LEN + 8 {
        return None;
    }
    let code = img[12];
    let stored = &img[HEADER_LEN..img.len() - 8];
    let mut body = Vec::new();
    match code {
        C_NONE => body.extend_from_slice(stored),
        C_LZ4 => {
            lz4_flex::frame::FrameDecoder::new(stored)
                .take(64 << 20)
                .read_to_end(&mut body)
                .ok()?;
        }
        C_ZSTD => {
            zstd::Decoder::new(stored)
                .ok()?
                .take(64 << 20)
                .read_to_end(&mut body)
                .ok()?;
        }
        _ => return None,
    }
    Some((code, body))
}

/// A block of a hand-written zstd frame.
pub enum ZBlock<'a> {
    /// Stored bytes.
    Raw(&'a [u8]),
    /// `n` copies of one byte (4 bytes in the frame for up to 128 KiB of output).
    Rle(u8, u64),
}

const ZSTD_BLOCK_MAX: u64 = 128 << 10;

/// A zstd frame (window 128 KiB, no content size, no checksum) of these blocks.
pub fn zstd_frame(blocks: &[ZBlock<'_>]) -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (17 - 10) << 3];
    let mut heads: Vec<(u32, Vec<u8>)> = Vec::new();
    for b in blocks {
        match b {
            ZBlock::Raw(data) => {
                for c in data.chunks(ZSTD_BLOCK_MAX as usize) {
                    heads.push(((c.len() as u32) << 3, c.to_vec()));
                }
            }
            ZBlock::Rle(byte, mut n) => {
                while n > 0 {
                    let k = n.min(ZSTD_BLOCK_MAX);
                    heads.push((((k as u32) << 3) | (1 << 1), vec![*byte]));
                    n -= k;
                }
            }
        }
    }
    if heads.is_empty() {
        heads.push((0, Vec::new()));
    }
    let last = heads.len() - 1;
    for (i, (mut h, content)) in heads.into_iter().enumerate() {
        if i == last {
            h |= 1;
        }
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.extend_from_slice(&content);
    }
    f
}

/// The decompression bomb of the issue: a zstd image whose body is `n` zero bytes. The
/// file is about n / 32768 bytes (128 KiB for 4 GiB).
pub fn zeros_bomb(n: u64) -> Vec<u8> {
    image(C_ZSTD, 1, &zstd_frame(&[ZBlock::Rle(0, n)]))
}

/// A sharper bomb: a valid metadata record that declares `estimate` bytes of memory, then
/// `n` zero bytes.
pub fn meta_then_zeros_bomb(estimate: u64, n: u64) -> Vec<u8> {
    let meta = ProcessImage {
        comm: "bomb".into(),
        memory_estimate: estimate,
        ..Default::default()
    };
    let m = meta_record(&meta);
    image(
        C_ZSTD,
        1,
        &zstd_frame(&[ZBlock::Raw(&m), ZBlock::Rle(0, n)]),
    )
}

/// A valid-looking image that declares `estimate` bytes of memory and then repeats one
/// 8 MiB memory record (of zeros, checksummed) `copies` times: every record is well formed,
/// so only the declared size and the memory limit can stop it.
pub fn valid_records_bomb(estimate: u64, copies: u64) -> Vec<u8> {
    let meta = ProcessImage {
        comm: "bomb".into(),
        memory_estimate: estimate,
        ..Default::default()
    };
    let m = meta_record(&meta);
    let data = 8u64 << 20;
    // tag, length, vaddr 0x1000, zeros, checksum
    let mut head = vec![TAG_PAGES];
    head.extend_from_slice(&(data + 8).to_le_bytes());
    head.extend_from_slice(&0x1000u64.to_le_bytes());
    let mut h = mosix_ckpt::sum::Xxh3::new();
    h.update(&head);
    let zeros = vec![0u8; 1 << 16];
    for _ in 0..(data >> 16) {
        h.update(&zeros);
    }
    let sum = h.digest().to_le_bytes();
    let mut blocks = vec![ZBlock::Raw(&m)];
    for _ in 0..copies {
        blocks.push(ZBlock::Raw(&head));
        blocks.push(ZBlock::Rle(0, data));
        blocks.push(ZBlock::Raw(&sum));
    }
    image(C_ZSTD, 1, &zstd_frame(&blocks))
}
