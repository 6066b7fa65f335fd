//! Bounds on what one authenticated gossip payload may make its receiver decompress.
//!
//! mosixd hands each opened gossip datagram to chitchat's parser
//! (`ChitchatMessage::deserialize`). A chitchat delta (in SynAck and Ack messages) is a
//! stream of blocks, each `type u8` (0 end, 1 zstd-compressed, 2 stored), `len u16`,
//! `len` bytes; the parser decompresses every compressed block into a 64 KiB buffer and
//! appends it to one vector before it parses anything. A zstd frame of 64 KiB of zeros
//! takes about ten bytes, so one 64 KB datagram would make the receiver allocate hundreds
//! of megabytes (crates/mosix-fuzz/tests/gossip_bounds.rs).
//!
//! [`check_payload`] walks the message the way chitchat 0.10 reads it, up to the delta,
//! and its block stream without decompressing anything. It refuses a compressed block
//! that is not exactly one standard zstd frame declaring its content size, whose content
//! is over [`MAX_BLOCK_CONTENT`] (chitchat's writer compresses blocks of at most 16,384
//! bytes and zstd records their size), and a delta whose blocks hold more than
//! [`MAX_DELTA_CONTENT`] in all. zstd fails a frame whose output differs from the size
//! it declares, so what the parser appends is bounded by what was checked here.
//!
//! Anything else that is wrong with the message (magic, version, type, a truncated
//! digest) is left to chitchat, which refuses it: this check only ever refuses more.

/// Largest content of one compressed block (chitchat's writer: 16,384 bytes).
pub const MAX_BLOCK_CONTENT: u64 = 16 << 10;
/// Largest content of the whole delta of one message, compressed and stored blocks
/// together: 32 times the largest datagram. chitchat fills a datagram with compressed
/// blocks, and the deltas of a cluster of idle, alike nodes compress about 17 times (3,000
/// nodes' ids, `proto` and `load` keys measured), so 1 MiB could refuse genuine gossip.
/// chitchat's parser turns 9-byte operations into ~100-byte ones: the worst accepted
/// payload makes it allocate about 12 times this, transiently (gossip_bounds.rs).
pub const MAX_DELTA_CONTENT: u64 = 2 << 20;

/// Magic number of a standard zstd frame (little-endian on the wire).
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Why a gossip payload was refused before parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GossipBoundError {
    #[error("gossip delta: {0} cut short")]
    Truncated(&'static str),
    #[error("gossip delta: unknown block type {0}")]
    BlockType(u8),
    #[error("gossip delta: a compressed block is not one zstd frame")]
    NotOneFrame,
    #[error("gossip delta: a compressed block does not declare its size")]
    UnknownSize,
    #[error("gossip delta: a compressed block of {0} bytes (at most {MAX_BLOCK_CONTENT})")]
    BlockTooLarge(u64),
    #[error("gossip delta: over {MAX_DELTA_CONTENT} bytes in all (decompression bomb?)")]
    TooLarge,
}

type Result<T> = std::result::Result<T, GossipBoundError>;

fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8]> {
    if b.len() < n {
        return Err(GossipBoundError::Truncated(what));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn u16_le(b: &mut &[u8], what: &'static str) -> Result<u16> {
    let x = take(b, 2, what)?;
    Ok(u16::from_le_bytes([x[0], x[1]]))
}

/// Skips a chitchat digest: `count u16`, then per node its id (node id: `len u16` +
/// bytes; generation u64; address: 4 or 6, then 4 or 16 bytes, port u16) and
/// heartbeat, last gc version and max version (u64 each).
fn skip_digest(b: &mut &[u8]) -> Result<()> {
    const WHAT: &str = "digest";
    let n = u16_le(b, WHAT)?;
    for _ in 0..n {
        let len = u16_le(b, WHAT)? as usize;
        take(b, len + 8, WHAT)?;
        let ip = match take(b, 1, WHAT)?[0] {
            4 => 4,
            6 => 16,
            // chitchat refuses it too.
            _ => return Err(GossipBoundError::Truncated(WHAT)),
        };
        take(b, ip + 2 + 3 * 8, WHAT)?;
    }
    Ok(())
}

/// The content size one compressed block will decompress to, if it is acceptable.
fn block_content(block: &[u8]) -> Result<u64> {
    use zstd::zstd_safe;
    // Only standard frames (no legacy or skippable ones): that is all chitchat writes.
    if block.len() < 4 || u32::from_le_bytes([block[0], block[1], block[2], block[3]]) != ZSTD_MAGIC
    {
        return Err(GossipBoundError::NotOneFrame);
    }
    // Exactly one frame: zstd would decompress every frame of a concatenation.
    match zstd_safe::find_frame_compressed_size(block) {
        Ok(n) if n == block.len() => {}
        _ => return Err(GossipBoundError::NotOneFrame),
    }
    match zstd_safe::get_frame_content_size(block) {
        Ok(Some(n)) if n > MAX_BLOCK_CONTENT => Err(GossipBoundError::BlockTooLarge(n)),
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(GossipBoundError::UnknownSize),
        Err(_) => Err(GossipBoundError::NotOneFrame),
    }
}

/// Walks a delta's block stream; returns the content size of its blocks in all.
fn check_delta(b: &mut &[u8]) -> Result<u64> {
    let mut total = 0u64;
    loop {
        let kind = take(b, 1, "block stream")?[0];
        let size = match kind {
            0 => return Ok(total),
            1 => {
                let len = u16_le(b, "compressed block")? as usize;
                block_content(take(b, len, "compressed block")?)?
            }
            2 => {
                let len = u16_le(b, "stored block")? as usize;
                take(b, len, "stored block")?;
                len as u64
            }
            t => return Err(GossipBoundError::BlockType(t)),
        };
        total += size;
        if total > MAX_DELTA_CONTENT {
            return Err(GossipBoundError::TooLarge);
        }
    }
}

/// Checks an opened gossip payload before it is given to chitchat's parser: Ok with the
/// number of bytes its delta will decompress to (0 without a delta), or why it must be
/// dropped. Never panics, allocates nothing.
pub fn check_payload(payload: &[u8]) -> Result<u64> {
    // magic u16, protocol version u8, message type u8: chitchat judges them.
    let Some((&kind, mut rest)) = payload.get(3..).and_then(|b| b.split_first()) else {
        return Ok(0);
    };
    match kind {
        // SynAck: digest, then delta.
        1 => {
            skip_digest(&mut rest)?;
            check_delta(&mut rest)
        }
        // Ack: delta.
        2 => check_delta(&mut rest),
        // Syn (digest, cluster id), BadCluster, anything else: no delta.
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(kind: u8) -> Vec<u8> {
        let mut b = 45_139u16.to_le_bytes().to_vec();
        b.extend_from_slice(&[0, kind]);
        b
    }

    fn block(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend_from_slice(&(data.len() as u16).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    /// An Ack whose delta is these blocks.
    fn ack(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut b = head(2);
        for x in blocks {
            b.extend_from_slice(x);
        }
        b.push(0);
        b
    }

    /// A zstd frame of `n` zeros without a content size (streaming API, size unknown).
    fn frame_without_size(n: usize) -> Vec<u8> {
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut e, &vec![0u8; n]).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn what_chitchat_writes_passes() {
        // chitchat compresses blocks of at most 16,384 bytes with zstd's bulk API.
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 7 * 31) as u8).collect();
        let blocks: Vec<Vec<u8>> = data
            .chunks(16_384)
            .map(|c| block(1, &zstd::bulk::compress(c, 0).unwrap()))
            .chain([block(2, b"stored")])
            .collect();
        assert_eq!(check_payload(&ack(&blocks)), Ok(40_006));
        // SynAck: a digest of two nodes (IPv4, IPv6), then the delta.
        let mut p = head(1);
        p.extend_from_slice(&2u16.to_le_bytes());
        for (ip, n) in [(4u8, 4usize), (6, 16)] {
            p.extend_from_slice(&1u16.to_le_bytes());
            p.push(b'7');
            p.extend_from_slice(&9u64.to_le_bytes());
            p.push(ip);
            p.extend(std::iter::repeat_n(1u8, n));
            p.extend_from_slice(&5400u16.to_le_bytes());
            p.extend_from_slice(&[0u8; 24]);
        }
        p.extend_from_slice(&ack(&blocks)[4..]);
        assert_eq!(check_payload(&p), Ok(40_006));
        // No delta: Syn, BadCluster, too short, empty delta.
        for p in [head(0), head(3), vec![1, 2], vec![], ack(&[])] {
            assert_eq!(check_payload(&p), Ok(0));
        }
    }

    #[test]
    fn bombs_are_refused() {
        let big = zstd::bulk::compress(&[0u8; 65_535], 0).unwrap();
        assert!(big.len() < 64);
        assert_eq!(
            check_payload(&ack(&[block(1, &big)])),
            Err(GossipBoundError::BlockTooLarge(65_535))
        );
        assert_eq!(
            check_payload(&ack(&[block(1, &frame_without_size(1000))])),
            Err(GossipBoundError::UnknownSize)
        );
        // Two frames in one block (each small, but zstd decompresses both).
        let small = zstd::bulk::compress(&[0u8; 100], 0).unwrap();
        let two = [small.clone(), small.clone()].concat();
        assert_eq!(
            check_payload(&ack(&[block(1, &two)])),
            Err(GossipBoundError::NotOneFrame)
        );
        // A skippable frame, garbage.
        let mut skip = 0x184D_2A50u32.to_le_bytes().to_vec();
        skip.extend_from_slice(&4u32.to_le_bytes());
        skip.extend_from_slice(&[0; 4]);
        for b in [skip, vec![1, 2, 3], vec![]] {
            assert_eq!(
                check_payload(&ack(&[block(1, &b)])),
                Err(GossipBoundError::NotOneFrame)
            );
        }
        // Many blocks within the per-block bound: the total bound.
        let full = zstd::bulk::compress(&[0u8; 16_384], 0).unwrap();
        let n = (MAX_DELTA_CONTENT / 16_384) as usize;
        assert_eq!(
            check_payload(&ack(&vec![block(1, &full); n])),
            Ok(MAX_DELTA_CONTENT)
        );
        assert_eq!(
            check_payload(&ack(&vec![block(1, &full); n + 1])),
            Err(GossipBoundError::TooLarge)
        );
    }

    #[test]
    fn zstd_fails_a_frame_larger_than_it_declares() {
        // What makes the declared size a bound: a frame whose blocks produce more than
        // its header declares is an error, not a longer output.
        let small = zstd::bulk::compress(&[0u8; 16], 0).unwrap();
        let declared = zstd::zstd_safe::get_frame_content_size(&small).unwrap();
        assert_eq!(declared, Some(16));
        let big = zstd::bulk::compress(&[0u8; 60_000], 0).unwrap();
        // Header of `small` (magic, descriptor, content size) over the blocks of `big`:
        // both single-segment with a 1- or 2-byte size; rebuild by hand.
        let fhd = small[4];
        let single = fhd & 0x20 != 0;
        assert!(single && fhd >> 6 == 0, "{fhd:#x}");
        let big_fhd = big[4];
        let big_fcs = match big_fhd >> 6 {
            0 => usize::from(big_fhd & 0x20 != 0),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let big_hdr = 5 + usize::from(big_fhd & 0x20 == 0) + big_fcs;
        let mut lying = small[..6].to_vec();
        lying.extend_from_slice(&big[big_hdr..]);
        assert_eq!(check_payload(&ack(&[block(1, &lying)])), Ok(16));
        let mut out = vec![0u8; 65_535];
        assert!(zstd::bulk::decompress_to_buffer(&lying, &mut out[..]).is_err());
    }

    #[test]
    fn truncated_and_odd_input_is_refused_not_panicking() {
        let good = ack(&[
            block(2, b"abc"),
            block(1, &zstd::bulk::compress(b"x", 0).unwrap()),
        ]);
        assert!(check_payload(&good).is_ok());
        for cut in 4..good.len() {
            assert!(check_payload(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            check_payload(&ack(&[vec![9]])),
            Err(GossipBoundError::BlockType(9))
        );
        let mut bad_ip = head(1);
        bad_ip.extend_from_slice(&1u16.to_le_bytes());
        bad_ip.extend_from_slice(&[0, 0]);
        bad_ip.extend_from_slice(&[0; 8]);
        bad_ip.push(5);
        assert!(check_payload(&bad_ip).is_err());
    }
}
