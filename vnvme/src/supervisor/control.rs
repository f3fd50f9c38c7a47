//! The control link between the supervisor and its worker: a socketpair the worker inherits
//! across execve (its number on the command line, `--worker-fd`). Messages are framed as
//! vfio-user messages (the same codec and SCM_RIGHTS handling) with a JSON body.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

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

/// Largest control message body.
const MAX_BODY: usize = 64 << 10;

/// One control message.
#[derive(Debug)]
pub struct Control {
    pub command: u16,
    pub body: Value,
    pub fds: Vec<OwnedFd>,
}

/// Send `command` with `body` and `fds`.
pub fn send(s: &UnixStream, command: u16, body: &Value, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let text = body.to_string();
    let h = Header {
        msg_id: 0.into(),
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
        command: header.command.get(),
        body,
        fds,
    }))
}
