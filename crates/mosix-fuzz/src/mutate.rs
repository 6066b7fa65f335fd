//! A small deterministic random source and a byte mutator in the manner of AFL/libFuzzer's
//! (bit flips, interesting integers at random places, block insert/delete/copy, splices).

/// xorshift64* seeded through splitmix64: deterministic for a seed, no dependencies.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 0..n (0 for n == 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Integers that make parsers take unusual paths: zero, one, all ones, sign and size
/// boundaries, page and record sizes.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    9,
    16,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    4095,
    4096,
    4104,
    (8 << 20) + 8,
    1 << 20,
    (1 << 20) + 1,
    1 << 24,
    1 << 30,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

/// Returns `input` changed by a few random mutations (at most `max_len` bytes long);
/// `other` is another input to splice from.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut b = input.to_vec();
    // Mostly one or two changes: most of a good input should stay good.
    let n = 1 + [0, 0, 0, 1, 1, 2, 3, 7][rng.below(8)];
    for _ in 0..n {
        mutate_once(rng, &mut b, other);
    }
    b.truncate(max_len);
    b
}

fn mutate_once(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    let len = b.len();
    match rng.below(12) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.below(len);
            b[i] ^= 1 << rng.below(8);
        }
        // A random byte.
        1 if len > 0 => {
            let i = rng.below(len);
            b[i] = rng.next_u64() as u8;
        }
        // An interesting integer of 1, 2, 4 or 8 bytes, little- or big-endian, or a small
        // change to the integer already there.
        2..=4 if len > 0 => {
            let w = [1usize, 2, 4, 8][rng.below(4)].min(len);
            let i = rng.below(len - w + 1);
            let mut cur = [0u8; 8];
            cur[..w].copy_from_slice(&b[i..i + w]);
            let v = if rng.chance(3) {
                u64::from_le_bytes(cur).wrapping_add((rng.below(33) as u64).wrapping_sub(16))
            } else {
                INTERESTING[rng.below(INTERESTING.len())]
            };
            let bytes = if rng.chance(4) {
                v.to_be_bytes()[8 - w..].to_vec()
            } else {
                v.to_le_bytes()[..w].to_vec()
            };
            b[i..i + w].copy_from_slice(&bytes);
        }
        // Delete a block.
        5 if len > 0 => {
            let i = rng.below(len);
            let most = if rng.chance(4) { len } else { 16 };
            let k = 1 + rng.below((len - i).min(most));
            b.drain(i..i + k);
        }
        // Insert random bytes or a run of one byte.
        6 => {
            let i = rng.below(len + 1);
            let most = if rng.chance(8) { 4096 } else { 16 };
            let k = 1 + rng.below(most);
            let ins = if rng.chance(2) {
                vec![rng.next_u64() as u8; k]
            } else {
                rng.bytes(k)
            };
            b.splice(i..i, ins);
        }
        // Copy a block of the input elsewhere (over or in between).
        7 if len > 1 => {
            let s = rng.below(len);
            let k = 1 + rng.below((len - s).min(256));
            let block = b[s..s + k].to_vec();
            let d = rng.below(len);
            if rng.chance(2) {
                b.splice(d..d, block);
            } else {
                let end = (d + k).min(len);
                b.splice(d..end, block);
            }
        }
        // Splice: keep a prefix of this input and a suffix of the other.
        8 if !other.is_empty() => {
            let i = rng.below(len + 1);
            let j = rng.below(other.len());
            b.truncate(i);
            b.extend_from_slice(&other[j..]);
        }
        // Truncate.
        9 if len > 0 => {
            let i = rng.below(len);
            b.truncate(i);
        }
        // Append random bytes.
        10 => {
            let k = 1 + rng.below(32);
            let more = rng.bytes(k);
            b.extend_from_slice(&more);
        }
        // Overwrite a block with bytes from the other input.
        _ if len > 0 && !other.is_empty() => {
            let s = rng.below(other.len());
            let k = 1 + rng.below((other.len() - s).min(64));
            let d = rng.below(len);
            let end = (d + k).min(len);
            b[d..end].copy_from_slice(&other[s..s + (end - d)]);
        }
        _ => {
            let k = 1 + rng.below(8);
            let more = rng.bytes(k);
            b.extend_from_slice(&more);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_bounded() {
        let input: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        for seed in 0..2000 {
            let a = mutate(&mut Rng::new(seed), &input, b"other input", 400);
            let b = mutate(&mut Rng::new(seed), &input, b"other input", 400);
            assert_eq!(a, b);
            assert!(a.len() <= 400);
        }
        let _ = mutate(&mut Rng::new(1), &[], &[], 10);
    }
}
