//! The deputy as its supervisor sees it over the wire: calls, cancels, and calls sent again
//! after a reconnect (mosixd restarting), with a real `mosix-deputy` holding a pipe as its
//! stdin. No root needed.

use mosix_remote::wire::{self, Buf, Call, FromDeputy, Reply, ToDeputy};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where the deputy finds its connection (`MOSIX_DEPUTY=conn=N`).
const CONN_FD: i32 = 100;

fn read_stdin(seq: u64) -> ToDeputy {
    ToDeputy::Call(Call {
        seq,
        tid: 1,
        nr: libc::SYS_read,
        args: [0, 0x1000, 64, 0, 0, 0],
        bufs: vec![
            Buf::None,
            Buf::Out(64),
            Buf::None,
            Buf::None,
            Buf::None,
            Buf::None,
        ],
        took: Vec::new(),
    })
}

/// A read of stdin sent again with its cancel (what a supervisor does when its link to
/// home comes back, as its first cancel may have been lost) is cancelled, not made again: the next read gets the next line. (It was made again, and took the line,
/// seen in the fault runs as a lost line of input when home's mosixd was killed while
/// the process was frozen for its move home.)
#[test]
fn a_cancelled_call_sent_again_after_a_reconnect_is_not_made_again() {
    let (mut sup, dep) = UnixStream::pair().unwrap();
    let dep_fd = dep.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mosix-deputy"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env("MOSIX_DEPUTY", format!("conn={CONN_FD}"));
    // SAFETY: dup2 and close_range in the forked child, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(dep_fd, CONN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, 3u32, (CONN_FD - 1) as u32, 0u32);
            Ok(())
        });
    }
    let mut deputy = cmd.spawn().unwrap();
    drop(dep);
    let mut input = deputy.stdin.take().unwrap();
    // A guard against a hang only (a broken deputy would wait forever for input).
    sup.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = sup.try_clone().unwrap();
    let mut next_reply = || loop {
        match wire::recv::<_, FromDeputy>(&mut reader) {
            Ok(Some(FromDeputy::Reply(r))) => return r,
            Ok(Some(_)) => continue,
            other => panic!("no answer from the deputy: {other:?}"),
        }
    };

    // The read waits at home; the process is frozen and the read cancelled, but that
    // cancel is lost with home's mosixd. The link comes back: the call and its cancel are
    // sent again (whether the first copy has begun or not, the second must not be made).
    wire::send(&mut sup, &read_stdin(1)).unwrap();
    wire::send(&mut sup, &read_stdin(1)).unwrap();
    wire::send(&mut sup, &ToDeputy::Cancel { seq: 1 }).unwrap();
    assert_eq!(next_reply(), Reply::Cancelled { seq: 1 });
    // The process makes its read again (a new call), and its input comes, then ends.
    wire::send(&mut sup, &read_stdin(2)).unwrap();
    input.write_all(b"go 2\n").unwrap();
    drop(input);

    let mut got = Vec::new();
    let two = loop {
        let r = next_reply();
        match r {
            Reply::Done {
                seq: 2, ret, outs, ..
            } => break (ret, outs),
            other => got.push(other),
        }
    };
    for r in &got {
        assert_eq!(
            *r,
            Reply::Cancelled { seq: 1 },
            "call 1 was made again after it was cancelled"
        );
    }
    assert_eq!(two.0, 5, "the next read got {:?}", two);
    assert_eq!(two.1.get(1), Some(&wire::Back::Bytes(b"go 2\n".to_vec())));

    wire::send(&mut sup, &ToDeputy::Exited(wire::ExitStatus::Code(0))).unwrap();
    let st = deputy.wait().unwrap();
    assert_eq!(st.code(), Some(0));
}
