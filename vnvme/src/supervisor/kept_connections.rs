//! NVMe-oF hosts' TCP connections outlive a worker that dies, long enough to close them
//! gracefully.
//!
//! A connection closed by the kernel because its process died answers the host's next
//! send with a reset, and the one after fails with EPIPE: Linux's nvme-tcp host sends from
//! the task submitting the I/O without `MSG_NOSIGNAL`, so that task (fio, a database) gets
//! SIGPIPE. So the worker shows the supervisor each connection it accepts (control message
//! `KEEP` hands it one end of a `SOCK_SEQPACKET` pair, over which it sends a duplicate of
//! each), and the supervisor holds them in a thread of its own ([`hold`]):
//! - one the worker ended (it shuts every connection it ends, so the socket reports the
//!   hang-up) is let go of within a second;
//! - when the worker is gone (the pair's end closed: a crash, or the exit of an upgrade),
//!   each left is hung up on: its write side ended, what the host still sends read and
//!   dropped until the host closes its end, for up to [`HANG_UP_WAIT`]. The host reads end
//!   of stream, recovers and reconnects to the listener the supervisor keeps.
//!
//! The supervisor holds at most [`MAX_HELD`]; past that a connection is simply not kept.
//! START tells the worker that `KEEP` follows (`{"keep": true}`): a worker under a
//! supervisor of an earlier build keeps nothing.

use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sys_util::fd_passing::{self, Passed};
use sys_util::poll;

use super::control;

/// Most connections the supervisor holds for one worker: four targets' worth (each serves
/// at most 256 at once; what else it held the worker ended, and a sweep lets go of those
/// first). With the previous worker's still being hung up on (a bounded time), the
/// supervisor holds at most twice this many: [`crate::limits`] keeps room for them.
pub const MAX_HELD: usize = 1024;
/// How long the supervisor waits for the hosts of a dead worker to close.
pub const HANG_UP_WAIT: Duration = Duration::from_millis(500);
/// How often held connections the worker ended are let go of.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Connections a worker accepted before its supervisor's `KEEP` came, kept until it does.
const MAX_PENDING: usize = 64;

/// This worker's supervisor said (in START) that `KEEP` follows.
static EXPECTED: AtomicBool = AtomicBool::new(false);
/// The worker's end of the pair (`KEEP`), once the supervisor sent it.
static KEEPER: Mutex<Option<OwnedFd>> = Mutex::new(None);
/// Duplicates of connections accepted before `KEEP` came.
static PENDING: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

/// The worker side, at START (before its daemon starts): whether the supervisor will send
/// `KEEP`.
pub fn expect_keeper(yes: bool) {
    EXPECTED.store(yes, Ordering::Release);
}

/// What a worker's NVMe/TCP targets show each accepted connection to; `None` outside a
/// worker whose supervisor keeps connections.
pub fn hook() -> Option<nvmeof::export::KeepHook> {
    EXPECTED
        .load(Ordering::Acquire)
        .then(|| Arc::new(keep) as nvmeof::export::KeepHook)
}

/// The worker side: hand a duplicate of accepted connection `fd` to the supervisor. On the
/// reactor: never blocks (a full pair drops it, with a warning).
fn keep(fd: BorrowedFd<'_>) {
    let keeper = KEEPER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(k) = keeper.as_ref() {
        send(k.as_fd(), fd);
        return;
    }
    let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
    // (those the worker ended meanwhile go: their duplicates would keep their sockets)
    sweep(&mut pending, &mut Vec::new());
    if pending.len() < MAX_PENDING
        && let Ok(dup) = fd.try_clone_to_owned()
    {
        pending.push(dup);
    }
}

fn send(keeper: BorrowedFd<'_>, fd: BorrowedFd<'_>) {
    if let Err(e) = fd_passing::send_fd(keeper, fd) {
        device_model::warn_limited!(
            "worker: a connection not handed to the supervisor to keep: {e}"
        );
    }
}

/// The worker side: the supervisor's `KEEP` came with its end of the pair; the
/// connections accepted so far go first.
pub fn set_keeper(fd: OwnedFd) {
    let mut keeper = KEEPER.lock().unwrap_or_else(PoisonError::into_inner);
    if keeper.is_some() {
        log::warn!("worker: a second KEEP ignored");
        return;
    }
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(PoisonError::into_inner));
    for p in &pending {
        send(fd.as_fd(), p.as_fd());
    }
    *keeper = Some(fd);
}

/// The supervisor side: have the worker on control link `ctl` show it every NVMe/TCP
/// connection it accepts (`KEEP`), held on a thread of their own until the worker is gone
/// ([`hold`]).
pub(super) fn keep_for(ctl: &std::os::unix::net::UnixStream) {
    let kept = fd_passing::seqpacket_pair().and_then(|(ours, theirs)| {
        control::send(
            ctl,
            control::KEEP,
            &serde_json::Value::Null,
            &[theirs.as_fd()],
        )?;
        std::thread::Builder::new()
            .name("kept-connections".into())
            .spawn(move || hold(ours))
    });
    if let Err(e) = kept {
        log::warn!("supervisor: NVMe-oF connections of this worker not kept: {e}");
    }
}

/// The supervisor side, on a thread of its own for one worker: take the connections the
/// worker sends on `link`, let go of those it ended, and once it is gone hang up on the
/// rest. Returns how many were hung up on.
fn hold(link: OwnedFd) -> usize {
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut fds = Vec::new();
    let mut swept = Instant::now();
    let gone = loop {
        let taken = match poll::wait_readable(&link, SWEEP_EVERY) {
            Ok(true) => take(&link, &mut held, &mut fds),
            Ok(false) => Ok(true),
            Err(e) => Err(e),
        };
        match taken {
            Ok(true) => {}
            Ok(false) => break true,
            Err(e) => {
                log::warn!("supervisor: kept connections: {e}");
                break false;
            }
        }
        if swept.elapsed() >= SWEEP_EVERY {
            swept = Instant::now();
            sweep(&mut held, &mut fds);
        }
    };
    drop(link);
    if !gone {
        // the worker may live on: its connections are its own (the duplicates just close)
        return 0;
    }
    sweep(&mut held, &mut fds);
    let n = held.len();
    if n > 0 {
        let t = Instant::now();
        let conns = held.into_iter().map(TcpStream::from).collect();
        let closed = hang_up(conns, HANG_UP_WAIT);
        log::info!(
            "supervisor: hung up on {n} NVMe-oF connections the worker left ({closed} closed by their hosts in {} ms)",
            t.elapsed().as_millis()
        );
    }
    n
}

/// Take every connection waiting on `link`: `Ok(false)` once the worker closed its end.
fn take(
    link: &OwnedFd,
    held: &mut Vec<OwnedFd>,
    fds: &mut Vec<poll::PollFd>,
) -> std::io::Result<bool> {
    loop {
        match fd_passing::recv_fd(link.as_fd())? {
            Passed::Fd(fd) => {
                if held.len() >= MAX_HELD {
                    sweep(held, fds);
                }
                if held.len() < MAX_HELD {
                    held.push(fd);
                } else {
                    device_model::warn_limited!(
                        "supervisor: {MAX_HELD} NVMe-oF connections kept already; one more is not"
                    );
                }
            }
            Passed::Empty => {}
            Passed::Nothing => return Ok(true),
            Passed::Closed => return Ok(false),
        }
    }
}

/// Let go of the connections the worker ended (or that failed): their sockets report a
/// hang-up.
fn sweep(held: &mut Vec<OwnedFd>, fds: &mut Vec<poll::PollFd>) {
    fds.clear();
    fds.extend(held.iter().map(|s| poll::entry(&s.as_fd(), 0)));
    if poll::poll(fds, Duration::ZERO).is_err() {
        return;
    }
    let mut i = 0;
    held.retain(|_| {
        let live = fds[i].revents == 0;
        i += 1;
        live
    });
}

/// End the write side of each of `conns` and read and drop what its host still sends
/// until it closes its end, for up to `within`; returns how many closed in time (the rest
/// are closed here).
fn hang_up(mut conns: Vec<TcpStream>, within: Duration) -> usize {
    let until = Instant::now() + within;
    let total = conns.len();
    conns.retain(|s| s.set_nonblocking(true).is_ok() && s.shutdown(Shutdown::Write).is_ok());
    let mut sink = vec![0u8; 64 << 10];
    let mut fds = Vec::new();
    while !conns.is_empty() {
        // (an error: the host is gone)
        conns.retain_mut(|s| matches!(nvmeof::stream::drain_step(s, &mut sink), Ok(false)));
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || conns.is_empty() {
            break;
        }
        fds.clear();
        fds.extend(conns.iter().map(|s| poll::entry(s, poll::POLLIN)));
        let _ = poll::poll(&mut fds, left);
    }
    total - conns.len()
}
