//! The supervisor's side of a vfio-user connection (`vnvme serve --supervised`): it owns
//! the listening socket and the client's connection, relays each message to the worker
//! process that runs the controller (over a socketpair, the "link"), and keeps what a new
//! worker needs to be told again: the client's DMA map (with duplicates of its fds), its
//! interrupt eventfds, and its config-space and MSI-X BAR writes.
//!
//! When the link breaks (the worker exited for an upgrade or was killed) the message in
//! hand is kept; once the next worker's link arrives the relay replays the table above to
//! it, sends [`RESTORE`] (the worker brings the controller's saved state back), and then
//! relays the message again. The client's connection never closes because of a worker:
//! it only sees a slower reply. Messages are relayed one at a time; the ones behind wait in
//! the socket.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, IntoBytes};

use super::protocol::{
    self, DmaMap, DmaUnmap, HEADER_SIZE, Header, IrqSet, MAX_MSG_FDS, RegionAccess, cmd, flags,
    vfio,
};
use super::socket::{self, Incoming};
use super::{ServerError, socket_path};

/// Supervisor -> worker: the replay is done, restore the controller's state.
pub const RESTORE: u16 = 0x7f01;
/// Supervisor -> worker: the client went away (reset the controller, forget its memory).
pub const CLIENT_GONE: u16 = 0x7f02;

/// True for the supervisor's own command numbers (never relayed from a client).
pub fn is_supervisor_command(c: u16) -> bool {
    c == RESTORE || c == CLIENT_GONE
}

/// How long a message may wait for a worker (QEMU gives up on a reply after 5 s).
const WORKER_WAIT: Duration = Duration::from_millis(4500);
/// A worker that holds a message this long without dying is taken as hung (and replaced:
/// the message is then answered by the next worker, still inside `WORKER_WAIT`).
const WORKER_REPLY: Duration = Duration::from_secs(3);
/// Distinct config-space / MSI-X BAR write locations remembered for replay.
const MAX_WRITES: usize = 4096;
/// DMA regions remembered (a client's limit is far lower: it is refused by the worker).
const MAX_DMA: usize = 4096;

/// A whole message.
struct Msg {
    header: Header,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// What a new worker is told again before it restores.
#[derive(Default)]
struct Replay {
    dma: Vec<(DmaMap, Option<OwnedFd>)>,
    msix: Vec<Option<OwnedFd>>,
    /// INTx, ERR, REQ eventfds.
    other: [Option<OwnedFd>; 3],
    /// Config space (region 7) and MSI-X BAR (region 4) writes, last value per location,
    /// in the order of their last write.
    writes: Vec<(u32, u64, Vec<u8>)>,
}

impl Replay {
    /// Update after the worker accepted `m` (or it needed no reply).
    fn learn(&mut self, m: &Msg) {
        let dup = |fd: &OwnedFd| fd.try_clone().ok();
        match m.header.command.get() {
            cmd::DMA_MAP => {
                if let Ok((d, _)) = DmaMap::read_from_prefix(&m.body)
                    && self.dma.len() < MAX_DMA
                {
                    self.dma.push((d, m.fds.first().and_then(dup)));
                }
            }
            cmd::DMA_UNMAP => {
                if let Ok((u, _)) = DmaUnmap::read_from_prefix(&m.body) {
                    if u.flags.get() & vfio::DMA_UNMAP_FLAG_ALL != 0 {
                        self.dma.clear();
                    } else {
                        let (a, end) = (
                            u.address.get(),
                            u.address.get().saturating_add(u.size.get()),
                        );
                        self.dma
                            .retain(|(d, _)| !(d.address.get() >= a && d.address.get() < end));
                    }
                }
            }
            cmd::DEVICE_SET_IRQS => {
                if let Ok((s, _)) = IrqSet::read_from_prefix(&m.body) {
                    self.set_irqs(&s, &m.fds);
                }
            }
            cmd::REGION_WRITE => {
                if let Ok((a, data)) = RegionAccess::read_from_prefix(&m.body) {
                    let (region, offset) = (a.region.get(), a.offset.get());
                    if region == vfio::PCI_CONFIG_REGION_INDEX
                        || region == vfio::PCI_BAR4_REGION_INDEX
                    {
                        let n = (a.count.get() as usize).min(data.len());
                        self.writes
                            .retain(|(r, o, d)| !(*r == region && *o == offset && d.len() == n));
                        if self.writes.len() < MAX_WRITES {
                            self.writes.push((region, offset, data[..n].to_vec()));
                        }
                    }
                }
            }
            cmd::DEVICE_RESET => {
                // the worker forgets interrupts and config space; the memory map stays
                self.msix.clear();
                self.other = [None, None, None];
                self.writes.clear();
            }
            _ => {}
        }
    }

    fn set_irqs(&mut self, s: &IrqSet, fds: &[OwnedFd]) {
        let f = s.flags.get();
        if f & vfio::IRQ_SET_ACTION_TRIGGER == 0 {
            return;
        }
        let eventfd = f & vfio::IRQ_SET_DATA_EVENTFD != 0;
        let (index, start, count) = (
            s.index.get(),
            s.start.get() as usize,
            s.count.get() as usize,
        );
        match index {
            vfio::PCI_MSIX_IRQ_INDEX => {
                if !eventfd && count == 0 {
                    self.msix.clear();
                } else if eventfd && start + count <= 2048 {
                    if self.msix.len() < start + count {
                        self.msix.resize_with(start + count, || None);
                    }
                    for i in 0..count {
                        self.msix[start + i] = fds.get(i).and_then(|f| f.try_clone().ok());
                    }
                }
            }
            vfio::PCI_INTX_IRQ_INDEX | vfio::PCI_ERR_IRQ_INDEX | vfio::PCI_REQ_IRQ_INDEX => {
                let k = match index {
                    vfio::PCI_INTX_IRQ_INDEX => 0,
                    vfio::PCI_ERR_IRQ_INDEX => 1,
                    _ => 2,
                };
                if eventfd {
                    self.other[k] = fds.first().and_then(|f| f.try_clone().ok());
                } else if count == 0 {
                    self.other[k] = None;
                }
            }
            _ => {}
        }
    }

    /// The messages that tell a new worker all of the above.
    fn messages(&self) -> Vec<(u16, Vec<u8>, Vec<BorrowedFd<'_>>)> {
        let mut out = Vec::new();
        for (d, fd) in &self.dma {
            out.push((
                cmd::DMA_MAP,
                d.as_bytes().to_vec(),
                fd.iter().map(AsFd::as_fd).collect(),
            ));
        }
        fn irq(index: u32, start: usize, fd: &OwnedFd) -> (u16, Vec<u8>, Vec<BorrowedFd<'_>>) {
            let s = IrqSet {
                argsz: (size_of::<IrqSet>() as u32).into(),
                flags: (vfio::IRQ_SET_DATA_EVENTFD | vfio::IRQ_SET_ACTION_TRIGGER).into(),
                index: index.into(),
                start: (start as u32).into(),
                count: 1.into(),
            };
            (
                cmd::DEVICE_SET_IRQS,
                s.as_bytes().to_vec(),
                vec![fd.as_fd()],
            )
        }
        for (v, fd) in self.msix.iter().enumerate() {
            if let Some(fd) = fd {
                out.push(irq(vfio::PCI_MSIX_IRQ_INDEX, v, fd));
            }
        }
        let idx = [
            vfio::PCI_INTX_IRQ_INDEX,
            vfio::PCI_ERR_IRQ_INDEX,
            vfio::PCI_REQ_IRQ_INDEX,
        ];
        for (k, fd) in self.other.iter().enumerate() {
            if let Some(fd) = fd {
                out.push(irq(idx[k], 0, fd));
            }
        }
        for (region, offset, data) in &self.writes {
            let a = RegionAccess {
                offset: (*offset).into(),
                region: (*region).into(),
                count: (data.len() as u32).into(),
            };
            let mut body = a.as_bytes().to_vec();
            body.extend_from_slice(data);
            out.push((cmd::REGION_WRITE, body, Vec::new()));
        }
        out
    }
}

/// The supervisor's relay for one controller socket.
pub struct Relay {
    path: PathBuf,
    owned: socket_path::OwnedSocketPath,
    listener: UnixListener,
    links: Receiver<UnixStream>,
    link: Option<UnixStream>,
    replay: Replay,
    stop: Arc<AtomicBool>,
    /// Set when the worker stopped answering without dying: the supervisor kills it.
    hung: Arc<AtomicBool>,
    next_id: u16,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("path", &self.path).finish()
    }
}

impl Relay {
    /// Listen on `path`; each worker's link arrives on `links`. `hung` is set when the
    /// worker holds a message past the timeout without dying (the owner replaces it).
    pub fn bind(
        path: &Path,
        links: Receiver<UnixStream>,
        stop: Arc<AtomicBool>,
        hung: Arc<AtomicBool>,
    ) -> Result<Self, ServerError> {
        let (listener, owned) = socket_path::OwnedSocketPath::bind(path)?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            owned,
            listener,
            links,
            link: None,
            replay: Replay::default(),
            stop,
            hung,
            next_id: 1,
        })
    }

    /// Relay clients one after another until the stop flag is set; removes the socket then.
    pub fn run(&mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            self.take_new_link();
            match self.listener.accept() {
                Ok((client, _)) => {
                    log::info!("supervisor: client connected on {}", self.path.display());
                    if let Err(e) = self.serve(&client) {
                        device_model::warn_limited!(
                            "supervisor: connection on {} ended: {e}",
                            self.path.display()
                        );
                    }
                    log::info!("supervisor: client of {} gone", self.path.display());
                    self.replay = Replay::default();
                    let gone = Msg {
                        header: self.header(CLIENT_GONE, 0),
                        body: Vec::new(),
                        fds: Vec::new(),
                    };
                    let _ = self.forward(&gone, Instant::now() + WORKER_WAIT);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ =
                        sys_util::poll::wait_readable(&self.listener, Duration::from_millis(10));
                }
                Err(e) => {
                    device_model::warn_limited!(
                        "supervisor: accept on {}: {e}",
                        self.path.display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        self.owned.remove();
    }

    fn header(&mut self, command: u16, body_len: usize) -> Header {
        self.next_id = self.next_id.wrapping_add(1);
        Header {
            msg_id: self.next_id.into(),
            command: command.into(),
            msg_size: ((HEADER_SIZE + body_len) as u32).into(),
            flags: flags::TYPE_COMMAND.into(),
            error_no: 0.into(),
        }
    }

    /// A link that arrived while idle: attach it now, so the worker resumes its data plane
    /// without waiting for the client's next message.
    fn take_new_link(&mut self) {
        while let Ok(l) = self.links.try_recv() {
            self.attach(l);
        }
    }

    /// Replay to a new worker's link and have it restore; keeps the link when that worked.
    fn attach(&mut self, link: UnixStream) {
        self.link = None;
        if link.set_read_timeout(Some(socket::READ_SLICE)).is_err()
            || link
                .set_write_timeout(Some(socket::MESSAGE_TIMEOUT))
                .is_err()
        {
            return;
        }
        let started = Instant::now();
        let msgs = self.replay.messages();
        let count = msgs.len();
        let mut id = self.next_id;
        for (command, body, fds) in msgs {
            id = id.wrapping_add(1);
            let h = Header {
                msg_id: id.into(),
                command: command.into(),
                msg_size: ((HEADER_SIZE + body.len()) as u32).into(),
                flags: flags::TYPE_COMMAND.into(),
                error_no: 0.into(),
            };
            match exchange(&link, &h, &body, &fds, &self.stop) {
                Ok(r) if r.header.flags.get() & flags::ERROR != 0 => device_model::warn_limited!(
                    "supervisor: replay of command {command} to the worker of {} refused (errno {})",
                    self.path.display(),
                    r.header.error_no.get()
                ),
                Ok(_) => {}
                Err(e) => {
                    log::warn!(
                        "supervisor: replay to the worker of {}: {e}",
                        self.path.display()
                    );
                    return;
                }
            }
        }
        self.next_id = id;
        let h = self.header(RESTORE, 0);
        match exchange(&link, &h, &[], &[], &self.stop) {
            Ok(r) if r.header.flags.get() & flags::ERROR == 0 => {
                log::info!(
                    "supervisor: worker attached to {} ({count} messages replayed, {} ms)",
                    self.path.display(),
                    started.elapsed().as_millis()
                );
                self.link = Some(link);
            }
            Ok(r) => log::error!(
                "supervisor: the worker of {} could not restore (errno {})",
                self.path.display(),
                r.header.error_no.get()
            ),
            Err(e) => log::warn!("supervisor: restore on {}: {e}", self.path.display()),
        }
    }

    /// Relay `m` to the worker and return its reply, waiting for (and attaching) a new
    /// worker while there is none, until `until`.
    fn forward(&mut self, m: &Msg, until: Instant) -> io::Result<Msg> {
        loop {
            if let Some(link) = &self.link {
                let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(AsFd::as_fd).collect();
                match exchange(link, &m.header, &m.body, &fds, &self.stop) {
                    Ok(r) => return Ok(r),
                    Err(e) => {
                        log::info!(
                            "supervisor: worker link of {} broke ({e}); waiting for the next worker",
                            self.path.display()
                        );
                        if e.kind() == io::ErrorKind::TimedOut {
                            // alive but not answering: have it replaced
                            self.hung.store(true, Ordering::Relaxed);
                        }
                        self.link = None;
                    }
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let left = until.saturating_duration_since(Instant::now());
            match self
                .links
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(l) => self.attach(l),
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
    }

    /// One client: relay its messages until it closes.
    fn serve(&mut self, client: &UnixStream) -> io::Result<()> {
        client.set_nonblocking(false)?;
        client.set_read_timeout(Some(socket::READ_SLICE))?;
        client.set_write_timeout(Some(socket::MESSAGE_TIMEOUT))?;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            self.take_new_link();
            if !sys_util::poll::wait_readable(client, Duration::from_millis(10)).unwrap_or(false) {
                continue;
            }
            let Some(m) = read_message(client, &self.stop)? else {
                return Ok(());
            };
            let body_len = match protocol::check_header(&m.header) {
                Ok(n) => n,
                Err(e) => {
                    // as the server does: a reply for a command, nothing for the rest
                    if !matches!(e, protocol::ProtocolError::NotACommand(_)) {
                        reply(client, &m.header, &[], &[], e.errno())?;
                    }
                    continue;
                }
            };
            debug_assert_eq!(body_len, m.body.len());
            if is_supervisor_command(m.header.command.get()) || m.fds.len() > MAX_MSG_FDS {
                reply(client, &m.header, &[], &[], libc::EINVAL)?;
                continue;
            }
            let until = Instant::now() + WORKER_WAIT;
            let r = match self.forward(&m, until) {
                Ok(r) => r,
                Err(e) => {
                    log::error!(
                        "supervisor: no worker answered for {} ({e}): the message fails",
                        self.path.display()
                    );
                    reply(client, &m.header, &[], &[], libc::EAGAIN)?;
                    continue;
                }
            };
            let no_reply = m.header.flags.get() & flags::NO_REPLY != 0;
            if no_reply || r.header.flags.get() & flags::ERROR == 0 {
                self.replay.learn(&m);
            }
            if !no_reply {
                let fds: Vec<BorrowedFd<'_>> = r.fds.iter().map(AsFd::as_fd).collect();
                let mut bytes = r.header.as_bytes().to_vec();
                bytes.extend_from_slice(&r.body);
                socket::send(client, &bytes, &fds)?;
            }
        }
    }
}

/// Read one whole message (header, fds, body as long as the header says, within the
/// protocol's maximum); `None` when the peer closed.
fn read_message(s: &UnixStream, stop: &AtomicBool) -> io::Result<Option<Msg>> {
    let deadline = socket::Deadline::new(stop);
    let (incoming, ctrunc) = socket::recv_header(s, &deadline)?;
    let Incoming::Message { header, mut fds } = incoming else {
        return Ok(None);
    };
    if ctrunc {
        fds.push(sys_util::fd::eventfd()?); // more than allowed: refused by the count check
    }
    let size = (header.msg_size.get() as usize).clamp(HEADER_SIZE, protocol::MAX_MSG_SIZE);
    let body = socket::recv_body(s, size - HEADER_SIZE, &deadline)?;
    Ok(Some(Msg { header, body, fds }))
}

/// Send a command on a worker link and read its reply (replies come in order).
fn exchange(
    link: &UnixStream,
    h: &Header,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    stop: &AtomicBool,
) -> io::Result<Msg> {
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(body);
    socket::send(link, &bytes, fds)?;
    if h.flags.get() & flags::NO_REPLY != 0 {
        return Ok(Msg {
            header: *h,
            body: Vec::new(),
            fds: Vec::new(),
        });
    }
    // a worker busy restoring may take a moment: wait, but not past WORKER_REPLY
    let start = Instant::now();
    loop {
        if sys_util::poll::wait_readable(link, Duration::from_millis(100)).unwrap_or(false) {
            break;
        }
        if sys_util::fd::peer_closed(link) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if start.elapsed() > WORKER_REPLY || stop.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
    match read_message(link, stop)? {
        Some(m) => Ok(m),
        None => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

fn reply(
    client: &UnixStream,
    req: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    errno: i32,
) -> io::Result<()> {
    super::send_reply(client, req, payload, fds, errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(command: u16, body: Vec<u8>, fds: Vec<OwnedFd>) -> Msg {
        Msg {
            header: Header {
                command: command.into(),
                ..Default::default()
            },
            body,
            fds,
        }
    }

    #[test]
    fn replay_table_follows_the_client() {
        let mut r = Replay::default();
        let efd = || sys_util::fd::eventfd().unwrap();
        let map = |addr: u64| DmaMap {
            argsz: 32.into(),
            flags: 3.into(),
            offset: 0.into(),
            address: addr.into(),
            size: 4096.into(),
        };
        r.learn(&msg(cmd::DMA_MAP, map(0).as_bytes().to_vec(), vec![efd()]));
        r.learn(&msg(
            cmd::DMA_MAP,
            map(8192).as_bytes().to_vec(),
            vec![efd()],
        ));
        let un = DmaUnmap {
            argsz: 24.into(),
            flags: 0.into(),
            address: 0.into(),
            size: 4096.into(),
        };
        r.learn(&msg(cmd::DMA_UNMAP, un.as_bytes().to_vec(), vec![]));
        assert_eq!(r.dma.len(), 1);
        let irq = IrqSet {
            argsz: 20.into(),
            flags: (vfio::IRQ_SET_DATA_EVENTFD | vfio::IRQ_SET_ACTION_TRIGGER).into(),
            index: vfio::PCI_MSIX_IRQ_INDEX.into(),
            start: 1.into(),
            count: 2.into(),
        };
        r.learn(&msg(
            cmd::DEVICE_SET_IRQS,
            irq.as_bytes().to_vec(),
            vec![efd(), efd()],
        ));
        let mut w = RegionAccess {
            offset: 4.into(),
            region: vfio::PCI_CONFIG_REGION_INDEX.into(),
            count: 2.into(),
        }
        .as_bytes()
        .to_vec();
        w.extend_from_slice(&[6, 0]);
        r.learn(&msg(cmd::REGION_WRITE, w.clone(), vec![]));
        r.learn(&msg(cmd::REGION_WRITE, w, vec![]));
        // one map, two vectors, one config write
        assert_eq!(r.messages().len(), 4);
        // garbage never panics and changes nothing
        r.learn(&msg(cmd::DMA_MAP, vec![1, 2, 3], vec![]));
        r.learn(&msg(cmd::DEVICE_SET_IRQS, vec![0xff; 20], vec![]));
        assert_eq!(r.messages().len(), 4);
        r.learn(&msg(cmd::DEVICE_RESET, vec![], vec![]));
        assert_eq!(r.messages().len(), 1);
    }
}
