//! Flow control of a process's stdio between its host, its home and `mosrun`, without I/O:
//! every buffer has a bound, and a reader that does not read makes the writer wait, end to
//! end, as a pipe or a terminal does at home.
//!
//! ```text
//! process ─pipe─▶ keeper ──Out──▶ deputy ──Out──▶ mosrun ─▶ terminal
//!                   ◀── OutAck(n) once mosrun took n bytes   (OutCredit: ≤ OUT_WINDOW)
//! process ◀─pipe─ keeper ◀─Stdin─ deputy ◀─Stdin─ mosrun ◀─ stdin
//!                   ──StdinConsumed(at)──▶ ──StdinAck(at)──▶  (StdinLog: ≤ STDIN_WINDOW)
//! ```

use mosix_proto::wire::{MAX_DATA, OUT_WINDOW, STDIN_WINDOW};

/// Host side: output read from the process and not yet delivered by home.
#[derive(Debug, Default)]
pub(super) struct OutCredit {
    unacked: u64,
}

impl OutCredit {
    /// Whether the host may read more output from the process now.
    pub fn may_read(&self) -> bool {
        self.unacked < OUT_WINDOW
    }
    /// How much it may read now (at most one message).
    pub fn room(&self) -> usize {
        (OUT_WINDOW.saturating_sub(self.unacked) as usize).min(MAX_DATA)
    }
    pub fn sent(&mut self, n: usize) {
        self.unacked += n as u64;
    }
    pub fn acked(&mut self, n: u64) {
        self.unacked = self.unacked.saturating_sub(n);
    }
}

/// Home side: the stdin that `mosrun` sent and the process has not yet been seen to
/// consume, kept to give to the next host after a move.
#[derive(Debug, Default)]
pub(super) struct StdinLog {
    /// Stream offset of `buf[0]` (everything before it was consumed).
    base: u64,
    buf: Vec<u8>,
    eof: bool,
}

/// `mosrun` sent more stdin than its window allows (only a client that does not follow
/// the protocol does).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("stdin beyond the window: {kept} bytes kept, at most {STDIN_WINDOW} allowed")]
pub(super) struct Overflow {
    pub kept: u64,
}

impl StdinLog {
    /// Appends bytes from `mosrun`; returns their stream offset.
    pub fn push(&mut self, data: &[u8]) -> Result<u64, Overflow> {
        let kept = self.buf.len() as u64 + data.len() as u64;
        if kept > STDIN_WINDOW {
            return Err(Overflow { kept });
        }
        let at = self.end();
        self.buf.extend_from_slice(data);
        Ok(at)
    }
    pub fn set_eof(&mut self) {
        self.eof = true;
    }
    pub fn eof(&self) -> bool {
        self.eof
    }
    /// Offset just past the last byte received.
    pub fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }
    /// The process has consumed up to `at`: forget what is before. Returns whether
    /// anything changed (then `mosrun` is told, so it may send more).
    pub fn consumed(&mut self, at: u64) -> bool {
        if at <= self.base {
            return false;
        }
        let n = (at - self.base).min(self.buf.len() as u64) as usize;
        self.buf.drain(..n);
        self.base += n as u64;
        n > 0
    }
    pub fn base(&self) -> u64 {
        self.base
    }
    /// What a new host must be given: (offset, bytes) pieces of at most one message.
    pub fn pieces(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let base = self.base;
        self.buf
            .chunks(MAX_DATA)
            .enumerate()
            .map(move |(i, c)| (base + (i * MAX_DATA) as u64, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn out_credit_stops_at_the_window() {
        let mut c = OutCredit::default();
        let mut read = 0u64;
        while c.may_read() {
            let n = c.room();
            assert!(n > 0 && n <= MAX_DATA);
            c.sent(n);
            read += n as u64;
        }
        assert_eq!(read, OUT_WINDOW);
        c.acked(1000);
        assert!(c.may_read());
        assert_eq!(c.room(), 1000);
        c.acked(u64::MAX);
        assert_eq!(c.room(), MAX_DATA);
    }

    #[test]
    fn stdin_log_refuses_past_the_window() {
        let mut l = StdinLog::default();
        let piece = vec![7u8; MAX_DATA];
        let mut n = 0;
        while l.push(&piece).is_ok() {
            n += 1;
        }
        assert_eq!(n as u64 * MAX_DATA as u64, STDIN_WINDOW);
        assert!(l.consumed(MAX_DATA as u64));
        assert_eq!(l.push(&piece), Ok(STDIN_WINDOW));
        assert!(!l.consumed(10), "going back changes nothing");
    }

    proptest! {
        /// Whatever the order of pushes and consumption reports, the pieces a new host
        /// gets are exactly the unconsumed stream, contiguous from `base`.
        #[test]
        fn pieces_are_the_unconsumed_stream(
            ops in prop::collection::vec((0usize..100_000, 0u64..300_000), 1..40)
        ) {
            let mut l = StdinLog::default();
            let mut stream: Vec<u8> = Vec::new();
            for (len, consume) in ops {
                let data: Vec<u8> = (0..len).map(|i| (stream.len() + i) as u8).collect();
                if l.push(&data).is_ok() {
                    stream.extend_from_slice(&data);
                }
                l.consumed(consume.min(l.end()));
                prop_assert!(l.end() - l.base() <= STDIN_WINDOW);
                let mut at = l.base();
                for (off, bytes) in l.pieces() {
                    prop_assert_eq!(off, at);
                    prop_assert!(bytes.len() <= MAX_DATA);
                    prop_assert_eq!(bytes, &stream[off as usize..off as usize + bytes.len()]);
                    at += bytes.len() as u64;
                }
                prop_assert_eq!(at, l.end());
            }
        }

    }
}
