//! The checksum of images: XXH3-64 (twox-hash, which uses AVX2 where the CPU has it and
//! SSE2 elsewhere; the same sums on every machine).

use std::hash::Hasher;

/// The XXH3-64 checksum of `b`.
pub fn xxh3_64(b: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(b)
}

/// An XXH3-64 checksum made of pieces.
#[derive(Default)]
pub struct Xxh3(twox_hash::XxHash3_64);

impl Xxh3 {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, b: &[u8]) {
        self.0.write(b);
    }
    /// The checksum of what was given so far.
    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces give the one-shot sum, and the sums are XXH3-64's (its reference values),
    /// so that images written before keep their sums.
    #[test]
    fn pieces_equal_the_whole_and_the_reference() {
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 / 7) as u8).collect();
        let mut h = Xxh3::new();
        for c in data.chunks(4097) {
            h.update(c);
        }
        assert_eq!(h.digest(), xxh3_64(&data));
    }
}
