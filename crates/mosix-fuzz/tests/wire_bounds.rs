//! Wire frames and chunk streams allocate with the bytes that arrive, not with the
//! lengths a peer claims (issue 9: every buffer has a bound).

use mosix_fuzz::alloc::{Counting, Scope};
use mosix_proto::wire;

#[global_allocator]
static A: Counting = Counting;

#[test]
fn a_frame_that_claims_a_megabyte_and_sends_ten_bytes() {
    let mut b = (wire::MAX_MSG as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&[0u8; 10]);
    let s = Scope::start();
    let r = wire::recv::<_, wire::Tail>(&mut &b[..]);
    let peak = s.peak();
    assert!(r.is_err());
    assert!(
        peak < 64 << 10,
        "{peak} bytes allocated for a 14-byte stream"
    );
}

#[test]
fn a_chunk_stream_of_one_byte_under_a_large_limit() {
    let b = [1u8, 0, 0, 0, 42, 0, 0, 0, 0];
    let s = Scope::start();
    let got = wire::read_chunks(&mut &b[..], 1 << 30).unwrap();
    let peak = s.peak();
    assert_eq!(got, [42]);
    assert!(peak < 64 << 10, "{peak} bytes allocated for one byte");
}

#[test]
fn chunks_still_grow_by_doubling() {
    // 64 MiB in 256 KiB chunks: capacity at most twice what arrived.
    let data = vec![7u8; 64 << 20];
    let mut w = wire::ChunkWriter::new(Vec::new());
    std::io::Write::write_all(&mut w, &data).unwrap();
    let stream = w.finish().unwrap();
    let s = Scope::start();
    let got = wire::read_chunks(&mut &stream[..], 1 << 40).unwrap();
    let peak = s.peak();
    assert_eq!(got.len(), data.len());
    assert!(peak <= 2 * data.len() as u64, "{peak}");
}
