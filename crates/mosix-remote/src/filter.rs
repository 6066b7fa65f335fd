//! The seccomp program of a process away from home: the calls of [`spec::LOCAL`] run on
//! the host, a few more when their arguments say they concern the process alone (an
//! anonymous mmap, a new thread, a signal to itself), and everything else is sent to the
//! supervisor (SECCOMP_RET_USER_NOTIF). Another architecture's calls kill the process;
//! x32 calls fail with ENOSYS.

use crate::spec;

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_NOTIF: u32 = 0x7fc0_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_BIT: u32 = 0x4000_0000;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}
fn off_arg_hi(i: u32) -> u32 {
    20 + 8 * i
}

/// One BPF instruction (struct sock_filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}
fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}
fn load(off: u32) -> Insn {
    stmt(BPF_LD | BPF_W | BPF_ABS, off)
}
fn ret(v: u32) -> Insn {
    stmt(BPF_RET | BPF_K, v)
}

/// The program for a process whose PID (as it sees it) is `own_pid`.
pub fn program(own_pid: i32) -> Vec<Insn> {
    program_for(own_pid, &[])
}

/// The program for a process whose PID (as it sees it) is `own_pid` and whose memory in
/// `not_here` (start, end) is not on this host (memory it shares with processes at home):
/// any call with an argument pointing there is sent to the supervisor, which brings the
/// process home to make it (made here, the kernel's touch of that memory would fail).
pub fn program_for(own_pid: i32, not_here: &[(u64, u64)]) -> Vec<Insn> {
    let mut p = vec![
        load(OFF_ARCH),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        ret(RET_KILL_PROCESS),
        load(OFF_NR),
        jump(BPF_JMP | BPF_JGE | BPF_K, X32_BIT, 0, 1),
        ret(RET_ERRNO | libc::ENOSYS as u32),
    ];
    let segs = segments(not_here);
    if !segs.is_empty() {
        for i in 0..6 {
            for &(hi, lo, last) in &segs {
                p.extend([
                    load(off_arg_hi(i)),
                    jump(BPF_JMP | BPF_JEQ | BPF_K, hi, 0, 4),
                    load(off_arg_lo(i)),
                    jump(BPF_JMP | BPF_JGE | BPF_K, lo, 0, 2),
                    jump(BPF_JMP | BPF_JGT | BPF_K, last, 1, 0),
                    ret(RET_NOTIF),
                ]);
            }
        }
        p.push(load(OFF_NR));
    }
    for &nr in spec::LOCAL {
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, nr as u32, 0, 1));
        p.push(ret(RET_ALLOW));
    }
    // mmap(..., flags = arg 3, ...) of anonymous memory.
    p.extend([
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_mmap as u32, 0, 4),
        load(off_arg_lo(3)),
        jump(BPF_JMP | BPF_JSET | BPF_K, libc::MAP_ANONYMOUS as u32, 0, 1),
        ret(RET_ALLOW),
        ret(RET_NOTIF),
    ]);
    // clone(flags = arg 0, ...) of a thread.
    p.extend([
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_clone as u32, 0, 4),
        load(off_arg_lo(0)),
        jump(BPF_JMP | BPF_JSET | BPF_K, libc::CLONE_THREAD as u32, 0, 1),
        ret(RET_ALLOW),
        ret(RET_NOTIF),
    ]);
    // Signals whose target (arg 0) is the process itself.
    for nr in [
        libc::SYS_kill,
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        p.extend([
            jump(BPF_JMP | BPF_JEQ | BPF_K, nr as u32, 0, 6),
            load(off_arg_hi(0)),
            jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 3),
            load(off_arg_lo(0)),
            jump(BPF_JMP | BPF_JEQ | BPF_K, own_pid as u32, 0, 1),
            ret(RET_ALLOW),
            ret(RET_NOTIF),
        ]);
    }
    p.push(ret(RET_NOTIF));
    p
}

/// `ranges` merged where they touch and cut at 4 GiB boundaries: (high word, first low
/// word, last low word) of each piece, at most 64 pieces (the rest are left out: their
/// calls are not trapped, only the touch itself is seen).
fn segments(ranges: &[(u64, u64)]) -> Vec<(u32, u32, u32)> {
    let mut r: Vec<(u64, u64)> = ranges.iter().copied().filter(|(s, e)| e > s).collect();
    r.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut out = Vec::new();
    for (mut s, e) in merged {
        while s < e && out.len() < 64 {
            let hi = s >> 32;
            let end = e.min((hi + 1) << 32);
            out.push((hi as u32, s as u32, (end - 1) as u32));
            s = end;
        }
    }
    out
}

/// The program as the bytes of a `struct sock_filter` array.
pub fn to_bytes(p: &[Insn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len() * 8);
    for i in p {
        out.extend_from_slice(&i.code.to_le_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_le_bytes());
    }
    out
}

/// What the program decides for call `nr` with `args` (an interpreter, for tests).
pub fn run(p: &[Insn], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let mut acc = 0u32;
    let mut pc = 0usize;
    while pc < p.len() {
        let i = p[pc];
        pc += 1;
        match i.code {
            c if c == BPF_LD | BPF_W | BPF_ABS => {
                let o = i.k as usize;
                acc = u32::from_le_bytes(data[o..o + 4].try_into().expect("4"));
            }
            c if c == BPF_RET | BPF_K => return i.k,
            c if c & 0x07 == BPF_JMP => {
                let cond = match c & 0xf0 {
                    BPF_JEQ => acc == i.k,
                    BPF_JGT => acc > i.k,
                    BPF_JGE => acc >= i.k,
                    BPF_JSET => acc & i.k != 0,
                    _ => panic!("unknown jump {c:#x}"),
                };
                pc += if cond { i.jt } else { i.jf } as usize;
            }
            c => panic!("unknown instruction {c:#x}"),
        }
    }
    panic!("fell off the program")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_decides_as_the_table_says() {
        let p = program(4242);
        assert!(p.len() < 4096, "BPF_MAXINSNS");
        let a = AUDIT_ARCH_X86_64;
        let z = [0u64; 6];
        for &nr in spec::LOCAL {
            assert_eq!(run(&p, nr as u32, a, z), RET_ALLOW, "{nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_openat,
            libc::SYS_fork,
            libc::SYS_execve,
            999,
        ] {
            assert_eq!(run(&p, nr as u32, a, z), RET_NOTIF, "{nr}");
        }
        let anon = [
            0,
            4096,
            3,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ];
        assert_eq!(run(&p, libc::SYS_mmap as u32, a, anon), RET_ALLOW);
        let file = [0, 4096, 1, libc::MAP_PRIVATE as u64, 3, 0];
        assert_eq!(run(&p, libc::SYS_mmap as u32, a, file), RET_NOTIF);
        let thread = [(libc::CLONE_VM | libc::CLONE_THREAD) as u64, 0, 0, 0, 0, 0];
        assert_eq!(run(&p, libc::SYS_clone as u32, a, thread), RET_ALLOW);
        assert_eq!(
            run(&p, libc::SYS_clone as u32, a, [17, 0, 0, 0, 0, 0]),
            RET_NOTIF
        );
        assert_eq!(
            run(&p, libc::SYS_kill as u32, a, [4242, 15, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&p, libc::SYS_kill as u32, a, [4243, 15, 0, 0, 0, 0]),
            RET_NOTIF
        );
        assert_eq!(
            run(
                &p,
                libc::SYS_kill as u32,
                a,
                [4242 | (1 << 32), 15, 0, 0, 0, 0]
            ),
            RET_NOTIF
        );
        assert_eq!(
            run(&p, libc::SYS_tgkill as u32, a, [4242, 9, 10, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(run(&p, 0x4000_0001, a, z), RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(
            run(&p, libc::SYS_read as u32, 0x4000_0003, z),
            RET_KILL_PROCESS
        );
    }

    #[test]
    fn calls_on_memory_not_here_are_trapped_whatever_they_are() {
        let base = 0x7f12_3456_7000u64;
        let p = program_for(
            4242,
            &[(base, base + 0x2000), (base + 0x2000, base + 0x3000)],
        );
        let a = AUDIT_ARCH_X86_64;
        let futex = libc::SYS_futex as u32;
        assert!(spec::LOCAL.iter().any(|&n| n as u32 == futex));
        // futex (a local call) on a word there: trapped; elsewhere: made here.
        assert_eq!(run(&p, futex, a, [base + 8, 0, 1, 0, 0, 0]), RET_NOTIF);
        assert_eq!(run(&p, futex, a, [base + 0x2ffc, 0, 1, 0, 0, 0]), RET_NOTIF);
        assert_eq!(run(&p, futex, a, [base + 0x3000, 0, 1, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&p, futex, a, [base - 1, 0, 1, 0, 0, 0]), RET_ALLOW);
        // Any argument: a read into it.
        assert_eq!(
            run(&p, libc::SYS_read as u32, a, [0, base + 100, 10, 0, 0, 0]),
            RET_NOTIF
        );
        // The same low word with another high word is not there.
        assert_eq!(
            run(&p, futex, a, [(base + 8) ^ (1 << 40), 0, 1, 0, 0, 0]),
            RET_ALLOW
        );
        // A range across a 4 GiB boundary is cut in two.
        assert_eq!(segments(&[(0x1_ffff_f000, 0x2_0000_1000)]).len(), 2);
        let q = program_for(1, &[(0x1_ffff_f000, 0x2_0000_1000)]);
        assert_eq!(run(&q, futex, a, [0x2_0000_0008, 0, 1, 0, 0, 0]), RET_NOTIF);
        assert_eq!(run(&q, futex, a, [0x1_ffff_fff8, 0, 1, 0, 0, 0]), RET_NOTIF);
        assert_eq!(run(&q, futex, a, [0x2_0000_1000, 0, 1, 0, 0, 0]), RET_ALLOW);
        assert!(q.len() < 4096);
    }
}
