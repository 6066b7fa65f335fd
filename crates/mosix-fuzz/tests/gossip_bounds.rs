//! Gossip payloads: what one authenticated datagram can make the receiver allocate.
//!
//! A chitchat delta is a stream of blocks, each a zstd frame that chitchat decompresses
//! into a 64 KiB buffer and appends to one Vec before parsing anything. A frame of 64 KiB
//! of zeros takes 10 bytes, so one 64 KB datagram made the receiver allocate about 330 MB
//! live (512 MiB of capacity). Only a holder of the cluster secret can send it (datagrams
//! are authenticated first). mosixd now checks every opened payload with
//! `mosix_proto::gossip::check_payload` before `ChitchatMessage::deserialize`: a
//! compressed block must be one zstd frame declaring at most 16 KiB, and a delta at most
//! 2 MiB in all. These tests receive payloads the way mosixd does.

use chitchat::{ChitchatMessage, Deserializable};
use mosix_fuzz::alloc::{Counting, Scope};
use mosix_fuzz::craft::{zstd_frame, ZBlock};
use mosix_proto::gossip::{check_payload, GossipBoundError, MAX_DELTA_CONTENT};

#[global_allocator]
static A: Counting = Counting;

/// The most one UDP datagram can carry for chitchat.
const MAX_PAYLOAD: usize = 65_507 - mosix_proto::seal::OVERHEAD;

/// An Ack whose delta is these compressed blocks.
fn ack_of(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut b = 45_139u16.to_le_bytes().to_vec();
    b.extend_from_slice(&[0, 2]);
    for f in frames {
        b.push(1);
        b.extend_from_slice(&(f.len() as u16).to_le_bytes());
        b.extend_from_slice(f);
    }
    b.push(0);
    b
}

/// An Ack whose delta is `blocks` zstd frames of 65,535 zero bytes each (no content size).
fn amplifying_ack(blocks: usize) -> Vec<u8> {
    let frame = zstd_frame(&[ZBlock::Rle(0, 65_535)]);
    ack_of(&vec![frame; blocks])
}

/// Peak bytes allocated by chitchat's parser alone.
fn peak_parsing(payload: &[u8]) -> u64 {
    let s = Scope::start();
    let mut b = payload;
    let _ = ChitchatMessage::deserialize(&mut b);
    s.peak()
}

/// What mosixd does with an opened payload: the bounds, then chitchat's parser. Peak
/// bytes allocated, and whether the payload was refused before parsing.
fn receive(payload: &[u8]) -> (u64, Result<u64, GossipBoundError>) {
    let s = Scope::start();
    let checked = check_payload(payload);
    if checked.is_ok() {
        let mut b = payload;
        let _ = ChitchatMessage::deserialize(&mut b);
    }
    (s.peak(), checked)
}

#[test]
fn one_block_is_parsed() {
    let p = amplifying_ack(1);
    let peak = peak_parsing(&p);
    eprintln!("{} bytes of payload: {peak} bytes allocated", p.len());
    assert!(peak < 1 << 20);
}

#[test]
fn one_datagram_must_not_allocate_hundreds_of_megabytes() {
    let blocks = (MAX_PAYLOAD - 5) / 13;
    let p = amplifying_ack(blocks);
    assert!(p.len() <= MAX_PAYLOAD);
    let (peak, checked) = receive(&p);
    eprintln!(
        "{} bytes of payload ({blocks} frames): {peak} bytes allocated, {checked:?}",
        p.len()
    );
    assert_eq!(checked, Err(GossipBoundError::UnknownSize));
    assert!(peak < 16 << 20, "{peak} bytes allocated for one datagram");
}

/// The same bomb with frames that declare their size (64 KiB each) is refused too.
#[test]
fn frames_declaring_more_than_a_block_are_refused() {
    let frame = zstd::bulk::compress(&[0u8; 65_535], 0).unwrap();
    let blocks = (MAX_PAYLOAD - 5) / (frame.len() + 3);
    let (peak, checked) = receive(&ack_of(&vec![frame; blocks]));
    assert_eq!(checked, Err(GossipBoundError::BlockTooLarge(65_535)));
    assert!(peak < 1 << 20, "{peak}");
}

/// The worst an accepted datagram can do: 2 MiB of the smallest delta operations
/// (SetMaxVersion, 9 bytes each) in 16 KiB frames, as many as the total bound allows,
/// then one more frame (refused).
#[test]
fn the_worst_accepted_datagram_is_bounded() {
    let op = [2u8, 1, 0, 0, 0, 0, 0, 0, 0];
    let stream: Vec<u8> = op
        .iter()
        .copied()
        .cycle()
        .take(MAX_DELTA_CONTENT as usize)
        .collect();
    let frames: Vec<Vec<u8>> = stream
        .chunks(16 << 10)
        .map(|c| zstd::bulk::compress(c, 0).unwrap())
        .collect();
    let p = ack_of(&frames);
    assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
    let (peak, checked) = receive(&p);
    eprintln!(
        "{} bytes of payload ({} frames): {peak} bytes allocated, {checked:?}",
        p.len(),
        frames.len()
    );
    assert_eq!(checked, Ok(MAX_DELTA_CONTENT));
    assert!(
        peak < 12 * MAX_DELTA_CONTENT,
        "{peak} bytes allocated for one datagram"
    );
    let mut more = frames.clone();
    more.push(frames[0].clone());
    let (peak, checked) = receive(&ack_of(&more));
    assert_eq!(checked, Err(GossipBoundError::TooLarge));
    assert!(peak < 1 << 20, "{peak}");
}
