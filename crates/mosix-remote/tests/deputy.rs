//! The deputy as its supervisor and home's mosixd see it over the wire: calls, cancels,
//! calls sent again after a reconnect (mosixd restarting), a rewind to a checkpoint; with
//! a real `mosix-deputy` holding a pipe as its stdin. No root needed.

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

/// Where it finds its arena, if it is given one (`arena=N`).
const ARENA_FD: i32 = 99;

/// A `mosix-deputy` serving the returned connection, with a pipe as its stdin and
/// `stdout` as its stdout.
fn spawn_deputy(stdout: Stdio) -> (UnixStream, std::process::Child) {
    spawn_deputy_with(stdout, None)
}

/// The same, given `arena` as its arena.
fn spawn_deputy_with(
    stdout: Stdio,
    arena: Option<&mosix_remote::arena::Arena>,
) -> (UnixStream, std::process::Child) {
    let (sup, dep) = UnixStream::pair().unwrap();
    let dep_fd = dep.as_raw_fd();
    let shared = arena.map(|a| a.share().unwrap());
    let arena_fd = shared.as_ref().map(|f| f.as_raw_fd());
    let mut conf = format!("conn={CONN_FD}");
    if arena_fd.is_some() {
        conf.push_str(&format!(";arena={ARENA_FD}"));
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mosix-deputy"));
    cmd.stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .env("MOSIX_DEPUTY", conf);
    // SAFETY: dup2 and close_range in the forked child, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(dep_fd, CONN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(a) = arena_fd {
                if libc::dup2(a, ARENA_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::syscall(libc::SYS_close_range, 3u32, (ARENA_FD - 1) as u32, 0u32);
            Ok(())
        });
    }
    let deputy = cmd.spawn().unwrap();
    drop(dep);
    (sup, deputy)
}

/// The deputy's side of connection `sup`, for [`next`].
fn reader(sup: &UnixStream) -> UnixStream {
    // A guard against a hang only (a broken deputy would wait forever for input).
    sup.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    sup.try_clone().unwrap()
}

/// The deputy's next message.
fn next(r: &mut UnixStream) -> FromDeputy {
    match wire::recv::<_, FromDeputy>(r) {
        Ok(Some(m)) => m,
        other => panic!("no answer from the deputy: {other:?}"),
    }
}

/// A read of stdin sent again with its cancel (what a supervisor does when its link to
/// home comes back, as its first cancel may have been lost) is cancelled, not made
/// again: the next read gets the next line. (It was made again, and took the line,
/// seen in the fault runs as a lost line of input when home's mosixd was killed while
/// the process was frozen for its move home.)
#[test]
fn a_cancelled_call_sent_again_after_a_reconnect_is_not_made_again() {
    let (mut sup, mut deputy) = spawn_deputy(Stdio::null());
    let mut input = deputy.stdin.take().unwrap();
    let mut reader = reader(&sup);
    let mut next_reply = || loop {
        if let FromDeputy::Reply(r) = next(&mut reader) {
            return r;
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

fn write_stdout(seq: u64, what: &[u8]) -> ToDeputy {
    ToDeputy::Call(Call {
        seq,
        tid: 1,
        nr: libc::SYS_write,
        args: [1, 0x1000, what.len() as u64, 0, 0, 0],
        bufs: vec![
            Buf::None,
            Buf::In(what.to_vec()),
            Buf::None,
            Buf::None,
            Buf::None,
            Buf::None,
        ],
        took: Vec::new(),
    })
}

/// A rewind to a checkpoint (the host died; the process comes back from its image) makes
/// none of the calls of the copy that died: not the one being made (cancelled), nor one
/// queued behind it for the same thread (a handler's write after an interrupted read), which
/// used to run after the rewind and write where the restored copy will write again.
#[test]
fn a_call_queued_before_a_rewind_is_not_made_after_it() {
    let (mut sup, mut deputy) = spawn_deputy(Stdio::piped());
    let mut out = deputy.stdout.take().unwrap();
    let mut reader = reader(&sup);
    let mut next = || next(&mut reader);
    wire::send(&mut sup, &ToDeputy::Mark { id: 1 }).unwrap();
    assert!(matches!(
        next(),
        FromDeputy::Marked {
            id: 1,
            result: Ok(_)
        }
    ));
    // The dead copy's thread: a read of stdin waiting at home, and a write queued behind.
    wire::send(&mut sup, &read_stdin(1)).unwrap();
    wire::send(&mut sup, &write_stdout(2, b"stale\n")).unwrap();
    wire::send(
        &mut sup,
        &ToDeputy::Rewind {
            id: 1,
            message: String::new(),
        },
    )
    .unwrap();
    loop {
        match next() {
            FromDeputy::Rewound { id: 1, result } => {
                assert!(result.is_ok(), "{result:?}");
                break;
            }
            FromDeputy::Reply(Reply::Done { seq: 2, .. }) => {
                panic!("the queued write of the dead copy was made")
            }
            _ => {}
        }
    }
    // The restored copy writes its own line.
    wire::send(&mut sup, &write_stdout(3, b"fresh\n")).unwrap();
    loop {
        match next() {
            FromDeputy::Reply(Reply::Done { seq: 3, ret, .. }) => {
                assert_eq!(ret, 6);
                break;
            }
            FromDeputy::Reply(Reply::Done { seq: 2, .. }) => {
                panic!("the queued write of the dead copy was made")
            }
            _ => {}
        }
    }
    wire::send(&mut sup, &ToDeputy::Exited(wire::ExitStatus::Code(0))).unwrap();
    let mut got = String::new();
    use std::io::Read;
    out.read_to_string(&mut got).unwrap();
    assert_eq!(deputy.wait().unwrap().code(), Some(0));
    assert_eq!(got, "fresh\n");
}

/// A cancel that reaches the deputy just as its worker begins the call (after the worker
/// looked for a cancel, before the kernel blocks it in the read) still ends that call.
/// The worker's signal came before the read began and was spent on nothing: the read of
/// an idle stdin then waited for ever, and so did the move or checkpoint that asked for
/// the cancel (seen in CI as a periodic checkpoint that never came).
#[test]
fn a_cancel_as_the_call_begins_ends_it() {
    const ROUNDS: u64 = 2000;
    let (mut sup, mut deputy) = spawn_deputy(Stdio::null());
    let _input = deputy.stdin.take().unwrap();
    let mut reader = reader(&sup);
    let mut next_reply = || loop {
        if let FromDeputy::Reply(r) = next(&mut reader) {
            return r;
        }
    };
    for seq in 1..=ROUNDS {
        wire::send(&mut sup, &read_stdin(seq)).unwrap();
        // The cancel follows after 0 to 100 µs, round after round: one of them lands
        // between the worker's look and the read (not a wait for an event: a sweep).
        let gap = Duration::from_nanos((seq % 101) * 1000);
        let t = std::time::Instant::now();
        while t.elapsed() < gap {
            std::hint::spin_loop();
        }
        wire::send(&mut sup, &ToDeputy::Cancel { seq }).unwrap();
        assert_eq!(next_reply(), Reply::Cancelled { seq }, "round {seq}");
    }
    wire::send(&mut sup, &ToDeputy::Exited(wire::ExitStatus::Code(0))).unwrap();
    assert_eq!(deputy.wait().unwrap().code(), Some(0));
}

/// A write behind said to be in the arena but outside it (or sent to a deputy given no
/// arena) is not from our mosixd: the deputy drops the connection instead of reading
/// memory it was not given (here, with no mosixd to connect to again, the process ends
/// as killed); calls before it were answered.
#[test]
fn a_write_behind_outside_the_arena_drops_the_connection() {
    let arena = mosix_remote::arena::Arena::new(1 << 20).unwrap();
    for given in [Some(&*arena), None] {
        let (mut sup, mut deputy) = spawn_deputy_with(Stdio::null(), given);
        let mut input = deputy.stdin.take().unwrap();
        let mut reader = reader(&sup);
        wire::send(&mut sup, &read_stdin(1)).unwrap();
        input.write_all(b"first\n").unwrap();
        loop {
            if let FromDeputy::Reply(Reply::Done { seq: 1, ret, .. }) = next(&mut reader) {
                assert_eq!(ret, 6);
                break;
            }
        }
        wire::send(
            &mut sup,
            &ToDeputy::BehindInArena {
                stream: 1,
                n: 0,
                off: None,
                at: (1 << 20) - 10,
                len: 64 << 10,
                piece: 0,
            },
        )
        .unwrap();
        // The connection ends (a deputy that went on would leave this read to its
        // 60 s guard: an error, not the end).
        let end = loop {
            match wire::recv::<_, FromDeputy>(&mut reader) {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(matches!(end, Ok(None)), "{given:?}: {end:?}");
        let st = deputy.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{given:?}: {st:?}");
    }
}
