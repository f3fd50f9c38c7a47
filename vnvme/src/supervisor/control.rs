//! The control link between the supervisor and its worker: a socketpair the worker inherits
//! across execve (its number on the command line, `--worker-fd`). Messages are framed as
//! vfio-user messages (the same codec and SCM_RIGHTS handling) with a JSON body.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use qemu_vfio_user::server::protocol::{HEADER_SIZE, Header, flags};
use qemu_vfio_user::server::socket::{self, Deadline, Incoming};
use serde_json::Value;
use zerocopy::IntoBytes;

/// Supervisor -> worker: serve socket `{"socket": PATH, "run_time": BOOL}`; fds: link, BAR0
/// memfd, state memfd. Before START: every socket owned (`run_time`: one a `subsystem_create`
/// made, claimed when that call is replayed); after START: a `subsystem_create` to come,
/// answered `DONE {"ok": BOOL}`.
pub const ATTACH: u16 = 0x7e01;
/// Supervisor -> worker: every socket is attached, start the daemon. Reply: `{"pid": N}`.
pub const START: u16 = 0x7e02;
/// Supervisor -> worker: hold, drain, save, reply and exit.
pub const UPGRADE: u16 = 0x7e03;
/// Worker -> supervisor: the answer to START or UPGRADE.
pub const DONE: u16 = 0x7e04;
/// Supervisor -> worker: NVMe/TCP listening socket for `{"addr": "IP:PORT"}`; fd: the
/// listener, which outlives every worker. Before START: every one held (configured, or for
/// a `subsystem_create` whose replay claims it); after START: one for a `subsystem_create`
/// to come, answered `DONE {"ok": BOOL}`.
pub const LISTEN: u16 = 0x7e05;

/// Supervisor -> worker: the RAM of `malloc:SIZE@KEY` namespaces, `{"key": KEY}`; fd: the
/// memfd, which outlives every worker. Before START: all kept so far; after START: one a
/// call about to be forwarded names, answered `DONE {"ok": BOOL}`.
pub const RAM: u16 = 0x7e06;

/// Supervisor -> worker, first: the configuration to build, `{"len": N}`; fd: a memfd
/// holding it as TOML. The supervisor's, read once at its start (its `malloc:` RAM named):
/// a file edited since changes no worker, so configured entries keep their numbers and RAM.
pub const CONFIG: u16 = 0x7e07;
/// Supervisor -> worker: let go of kept RAM `{"key": KEY}` no namespace took (its call was
/// refused, or failed). No answer.
pub const FORGET: u16 = 0x7e08;

/// Supervisor -> worker, after the run-time changes are replayed and before any client is
/// relayed again: put each subsystem's namespaces back as the last worker saved them (what
/// guests changed with Namespace Management and Attachment). Answered `DONE`. Sent only to
/// a worker whose `DONE` to START said `"settle": true`; START says `{"settle": true}` to a
/// worker whose supervisor will send it (else the worker keeps nothing: no settle would
/// come).
pub const SETTLE: u16 = 0x7e09;

/// Supervisor -> worker, after START: show every accepted NVMe/TCP connection to the
/// supervisor; fd: the worker's end of a `SOCK_SEQPACKET` pair to send a duplicate of each
/// over (`kept_connections`). No answer (a worker of an earlier build ignores it). START
/// says `{"keep": true}` to a worker whose supervisor sends it.
pub const KEEP: u16 = 0x7e0a;

/// Largest control message body.
const MAX_BODY: usize = 64 << 10;

/// One control message.
#[derive(Debug)]
pub struct Control {
    /// The request's number, which its answer carries (0: a supervisor of an earlier build).
    pub id: u16,
    pub command: u16,
    pub body: Value,
    pub fds: Vec<OwnedFd>,
}

/// Send `command` with `body` and `fds` (a message no answer is waited for).
pub fn send(s: &UnixStream, command: u16, body: &Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_numbered(s, 0, command, body, fds)
}

/// Send request `command` and wait up to `wait` for its answer: `Ok(None)` when none came
/// in time. An answer to an earlier request that timed out is read and dropped here, never
/// taken for this one's.
pub fn request(
    s: &UnixStream,
    command: u16,
    body: &Value,
    fds: &[BorrowedFd<'_>],
    wait: Duration,
) -> io::Result<Option<Control>> {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let id = match NEXT.fetch_add(1, Ordering::Relaxed) {
        0 => NEXT.fetch_add(1, Ordering::Relaxed),
        n => n,
    };
    send_numbered(s, id, command, body, fds)?;
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match recv(s, left)? {
            None => return Ok(None),
            // 0: a worker of an earlier build, which answers in order
            Some(m) if m.id == id || m.id == 0 => return Ok(Some(m)),
            Some(m) => log::warn!(
                "supervisor: a late answer to control request {} dropped ({:#x})",
                m.id,
                m.command
            ),
        }
        if left.is_zero() {
            return Ok(None);
        }
    }
}

/// Answer request `to` with `body`.
pub fn answer(s: &UnixStream, to: u16, body: &Value) -> io::Result<()> {
    send_numbered(s, to, DONE, body, &[])
}

fn send_numbered(
    s: &UnixStream,
    id: u16,
    command: u16,
    body: &Value,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let text = body.to_string();
    let h = Header {
        msg_id: id.into(),
        command: command.into(),
        msg_size: ((HEADER_SIZE + text.len()) as u32).into(),
        flags: flags::TYPE_COMMAND.into(),
        error_no: 0.into(),
    };
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    socket::send(s, &bytes, fds)
}

/// Wait up to `wait` for a message: `Ok(None)` when none came, an error when the peer
/// closed or sent something that is not a control message.
pub fn recv(s: &UnixStream, wait: Duration) -> io::Result<Option<Control>> {
    if !sys_util::poll::wait_readable(s, wait)? {
        return Ok(None);
    }
    s.set_read_timeout(Some(socket::READ_SLICE))?;
    let never = AtomicBool::new(false);
    let deadline = Deadline::new(&never);
    let (incoming, _) = socket::recv_header(s, &deadline)?;
    let Incoming::Message { header, fds } = incoming else {
        return Err(io::ErrorKind::UnexpectedEof.into());
    };
    let len = (header.msg_size.get() as usize).saturating_sub(HEADER_SIZE);
    if len > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message too large",
        ));
    }
    let body = socket::recv_body(s, len, &deadline)?;
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok(Some(Control {
        id: header.msg_id.get(),
        command: header.command.get(),
        body,
        fds,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The worker answers a request late (after the supervisor stopped waiting): that answer
    /// is dropped, and the next request gets its own.
    #[test]
    fn a_late_answer_is_not_taken_for_the_next_request() {
        let (sup, worker) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let first = recv(&worker, Duration::from_secs(5)).unwrap().unwrap();
            let second = recv(&worker, Duration::from_secs(5)).unwrap().unwrap();
            answer(&worker, first.id, &json!({"ok": "first"})).unwrap();
            answer(&worker, second.id, &json!({"ok": "second"})).unwrap();
        });
        let wait = Duration::from_millis(200);
        let first = request(&sup, RAM, &json!({"key": "r0"}), &[], wait).unwrap();
        assert!(first.is_none(), "no answer in time");
        let second = request(&sup, ATTACH, &json!({}), &[], Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(second.body["ok"], "second");
        peer.join().unwrap();
    }
}
