//! The vfio-user server: listens on a Unix socket, serves one client at a time, and when a
//! client goes away resets the controller and waits for the next one.
//!
//! `protocol` is the wire format and validating parser, `socket` moves bytes and fds,
//! `device` maps requests onto the NVMe controller.

pub mod device;
pub mod protocol;
pub mod relay;
// SCM_RIGHTS fd passing
#[allow(unsafe_code)]
pub mod socket;
// SO_PEERCRED of a socket already bound at the path
#[allow(unsafe_code)]
pub mod socket_path;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use zerocopy::IntoBytes;

pub use device::NvmeDevice;
use protocol::{Header, ProtocolError, Request, flags};
use socket::Incoming;

/// Errors that stop the server (not a client's bad message: those get error replies).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Claim(#[from] socket_path::ClaimError),
    #[error("accept on {path}: {source}")]
    Accept { path: PathBuf, source: io::Error },
}

/// What a worker does when its supervisor says the replay of the client's memory map and
/// interrupts is done: bring the controller's saved state back. Returns a line for the log.
pub type RestoreHook = Box<dyn FnMut(&NvmeDevice) -> Result<String, String> + Send>;

/// A vfio-user server for one NVMe controller.
pub struct Server {
    path: PathBuf,
    /// The listening socket and its path; `None` for a worker's server, which serves the one
    /// connection its supervisor relays ([`Server::attached`]).
    owned: Option<socket_path::OwnedSocketPath>,
    listener: Option<UnixListener>,
    attached: Option<(UnixStream, RestoreHook)>,
    device: NvmeDevice,
    stop: Arc<AtomicBool>,
    /// A client that connected while the previous one was closing: served next.
    next: Option<UnixStream>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

/// How a connection ended.
enum End {
    ClientClosed,
    Stopped,
}

impl Server {
    /// Listen on `path`: a stale socket file is replaced, a live server's path refused.
    pub fn bind(
        path: &Path,
        device: NvmeDevice,
        stop: Arc<AtomicBool>,
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
            owned: Some(owned),
            listener: Some(listener),
            attached: None,
            device,
            stop,
            next: None,
        })
    }

    /// A worker's server: it serves `link`, the connection its supervisor relays the client
    /// of `path` over ([`relay`]), and answers the supervisor's own messages (restore after
    /// the replay, client gone). When the link closes the server ends without resetting the
    /// controller: the next worker carries on with its state.
    pub fn attached(
        path: &Path,
        link: UnixStream,
        device: NvmeDevice,
        stop: Arc<AtomicBool>,
        on_restore: RestoreHook,
    ) -> Self {
        Self {
            path: path.to_owned(),
            owned: None,
            listener: None,
            attached: Some((link, on_restore)),
            device,
            stop,
            next: None,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device (for management and tests).
    pub fn device(&self) -> &NvmeDevice {
        &self.device
    }

    /// Give up the socket and return the device (its controller keeps running).
    pub fn into_device(self) -> NvmeDevice {
        if let Some(o) = &self.owned {
            o.remove();
        }
        self.device
    }

    /// Serve clients one after another until the stop flag is set.
    pub fn run(&mut self) -> Result<(), ServerError> {
        if let Some((link, hook)) = self.attached.take() {
            log::info!(
                "vfio-user: serving {} for the supervisor",
                self.path.display()
            );
            let end = self.serve_client(&link, Some(hook));
            if matches!(end, Ok(End::Stopped)) {
                // the daemon stops: as a listening server does
                self.device.reset(true);
            }
            if let Err(e) = end {
                log::info!("vfio-user: link for {} ended: {e}", self.path.display());
            }
            return Ok(());
        }
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let r = self.serve_listener(&listener);
        self.listener = Some(listener);
        r
    }

    fn serve_listener(&mut self, listener: &UnixListener) -> Result<(), ServerError> {
        log::info!("vfio-user: listening on {}", self.path.display());
        while !self.stop.load(Ordering::Relaxed) {
            let accepted = match self.next.take() {
                Some(s) => Ok((s, None)),
                None => listener.accept().map(|(s, a)| (s, Some(a))),
            };
            match accepted {
                Ok((stream, _)) => {
                    log::info!("vfio-user: client connected on {}", self.path.display());
                    let end = self.serve_client_of(listener, &stream);
                    self.device.reset(true);
                    match end {
                        Ok(End::ClientClosed) => log::info!(
                            "vfio-user: client disconnected from {}",
                            self.path.display()
                        ),
                        Ok(End::Stopped) => break,
                        Err(e) => device_model::warn_limited!(
                            "vfio-user: connection on {} ended: {e}",
                            self.path.display()
                        ),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_readable(listener, 200);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ServerError::Accept {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// One client at a time: a second one is accepted and closed at once, so it sees an
    /// error instead of waiting unanswered in the listen backlog, unless the current client
    /// has already hung up (it is then kept as the next client). Returns true in that case.
    fn refuse_extra_clients(&mut self, listener: &UnixListener, current: &UnixStream) -> bool {
        while let Ok((extra, _)) = listener.accept() {
            if sys_util::fd::peer_closed(current) {
                self.next = Some(extra);
                return true;
            }
            device_model::warn_limited!(
                "vfio-user: {} already has a client; refusing another",
                self.path.display()
            );
            drop(extra);
        }
        false
    }

    fn serve_client_of(&mut self, listener: &UnixListener, stream: &UnixStream) -> io::Result<End> {
        self.serve_with(Some(listener), stream, None)
    }

    fn serve_client(&mut self, stream: &UnixStream, hook: Option<RestoreHook>) -> io::Result<End> {
        self.serve_with(None, stream, hook)
    }

    fn serve_with(
        &mut self,
        listener: Option<&UnixListener>,
        stream: &UnixStream,
        mut hook: Option<RestoreHook>,
    ) -> io::Result<End> {
        stream.set_nonblocking(false)?;
        // a client that stops mid-message or never reads its replies cannot hold this thread
        stream.set_read_timeout(Some(socket::READ_SLICE))?;
        stream.set_write_timeout(Some(socket::MESSAGE_TIMEOUT))?;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(End::Stopped);
            }
            if let Some(l) = listener
                && self.refuse_extra_clients(l, stream)
            {
                return Ok(End::ClientClosed);
            }
            if !wait_readable(&stream, 200) {
                continue;
            }
            let deadline = socket::Deadline::new(&self.stop);
            let (incoming, ctrunc) = socket::recv_header(stream, &deadline)?;
            let Incoming::Message { header, fds } = incoming else {
                return Ok(End::ClientClosed);
            };
            let body_len = match protocol::check_header(&header) {
                Ok(n) => n,
                Err(e) => {
                    // keep the stream in step: consume what the header says follows
                    let declared =
                        (header.msg_size.get() as usize).saturating_sub(protocol::HEADER_SIZE);
                    if matches!(e, ProtocolError::TooShort(_)) {
                        reply_error(stream, &header, &e.to_string(), e.errno())?;
                        continue;
                    }
                    socket::discard(stream, declared, &deadline)?;
                    if matches!(e, ProtocolError::NotACommand(_)) {
                        device_model::warn_limited!(
                            "vfio-user: ignoring message that is not a command: {e}"
                        );
                    } else {
                        reply_error(stream, &header, &e.to_string(), e.errno())?;
                    }
                    continue;
                }
            };
            let body = socket::recv_body(stream, body_len, &deadline)?;
            // the control buffer rounds up: more than advertised can arrive whole
            if ctrunc || fds.len() > protocol::MAX_MSG_FDS {
                reply_error(stream, &header, "too many file descriptors", libc::EINVAL)?;
                continue;
            }
            // the supervisor's own messages (it never relays these numbers from a client)
            if let Some(hook) = hook.as_mut()
                && relay::is_supervisor_command(header.command.get())
            {
                self.supervisor_command(stream, &header, hook)?;
                continue;
            }
            self.dispatch(stream, &header, &body, fds)?;
        }
    }

    /// Restore (the replay is done) or client gone, from the supervisor.
    fn supervisor_command(
        &mut self,
        stream: &UnixStream,
        header: &Header,
        hook: &mut RestoreHook,
    ) -> io::Result<()> {
        if header.command.get() == relay::RESTORE {
            return match hook(&self.device) {
                Ok(what) => {
                    log::info!("vfio-user: {}: {what}", self.path.display());
                    send_reply(stream, header, &[], &[], 0)
                }
                Err(e) => reply_error(stream, header, &e, libc::EIO),
            };
        }
        log::info!(
            "vfio-user: client of {} gone (supervisor)",
            self.path.display()
        );
        self.device.reset(true);
        send_reply(stream, header, &[], &[], 0)
    }

    fn dispatch(
        &mut self,
        stream: &UnixStream,
        header: &Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> io::Result<()> {
        let command = header.command.get();
        let req = match protocol::parse_request(command, body, fds.len()) {
            Ok(r) => r,
            Err(e) => return reply_error(stream, header, &e.to_string(), e.errno()),
        };
        log::trace!("vfio-user: {req:?}");
        let result: Result<(Vec<u8>, Option<std::os::fd::BorrowedFd<'_>>), device::DeviceError> =
            match req {
                Request::Version { major, minor, caps } => {
                    log::info!(
                        "vfio-user: client protocol {major}.{minor} caps {}",
                        String::from_utf8_lossy(caps).trim_end_matches('\0')
                    );
                    let mut p = Vec::new();
                    // protocol 0.0: QEMU refuses a server minor version above its own (0)
                    p.extend_from_slice(&0u16.to_le_bytes());
                    p.extend_from_slice(&0u16.to_le_bytes());
                    p.extend_from_slice(protocol::server_capabilities().as_bytes());
                    p.push(0);
                    Ok((p, None))
                }
                // the reply to DMA_MAP has no payload; DMA_UNMAP echoes its request
                Request::DmaMap(m) => self
                    .device
                    .dma_map(&m, fds.first())
                    .map(|()| (Vec::new(), None)),
                Request::DmaUnmap(u) => self
                    .device
                    .dma_unmap(&u)
                    .map(|()| (u.as_bytes().to_vec(), None)),
                Request::DeviceGetInfo { .. } => Ok((NvmeDevice::device_info(), None)),
                Request::GetRegionInfo { argsz, index } => {
                    let r = self.device.region_info(argsz, index);
                    Ok((r.payload, r.fd))
                }
                Request::GetIrqInfo { index, .. } => Ok((NvmeDevice::irq_info(index), None)),
                // no payload in the reply (vfio-user spec, SET_IRQS)
                Request::SetIrqs(s) => self.device.set_irqs(&s, fds).map(|()| (Vec::new(), None)),
                Request::RegionRead {
                    region,
                    offset,
                    count,
                } => self
                    .device
                    .region_read(region, offset, count as usize)
                    .map(|data| {
                        let a = protocol::RegionAccess {
                            offset: offset.into(),
                            region: region.into(),
                            count: count.into(),
                        };
                        let mut p = a.as_bytes().to_vec();
                        p.extend_from_slice(&data);
                        (p, None)
                    }),
                Request::RegionWrite {
                    region,
                    offset,
                    data,
                } => self.device.region_write(region, offset, data).map(|()| {
                    let a = protocol::RegionAccess {
                        offset: offset.into(),
                        region: region.into(),
                        count: (data.len() as u32).into(),
                    };
                    (a.as_bytes().to_vec(), None)
                }),
                Request::DeviceReset => {
                    log::info!("vfio-user: device reset");
                    self.device.reset(false);
                    Ok((Vec::new(), None))
                }
            };
        match result {
            Ok((payload, fd)) => {
                if header.flags.get() & flags::NO_REPLY != 0 {
                    return Ok(());
                }
                let fds: Vec<_> = fd.into_iter().collect();
                send_reply(stream, header, &payload, &fds, 0)
            }
            Err(e) => reply_error(stream, header, &e.what, e.errno),
        }
    }
}

fn reply_error(stream: &UnixStream, header: &Header, what: &str, errno: i32) -> io::Result<()> {
    device_model::warn_limited!(
        "vfio-user: command {} (id {}) refused: {what} (errno {errno})",
        header.command.get(),
        header.msg_id.get()
    );
    send_reply(stream, header, &[], &[], errno)
}

pub(crate) fn send_reply(
    stream: &UnixStream,
    req: &Header,
    payload: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
    errno: i32,
) -> io::Result<()> {
    let mut fl = flags::TYPE_REPLY;
    if errno != 0 {
        fl |= flags::ERROR;
    }
    let h = Header {
        msg_id: req.msg_id,
        command: req.command,
        msg_size: ((protocol::HEADER_SIZE + payload.len()) as u32).into(),
        flags: fl.into(),
        error_no: (errno as u32).into(),
    };
    let mut msg = Vec::with_capacity(protocol::HEADER_SIZE + payload.len());
    msg.extend_from_slice(h.as_bytes());
    msg.extend_from_slice(payload);
    socket::send(stream, &msg, fds)
}

/// Wait up to `ms` for `fd` to become readable.
fn wait_readable(fd: &impl std::os::fd::AsFd, ms: u64) -> bool {
    sys_util::poll::wait_readable(fd, std::time::Duration::from_millis(ms)).unwrap_or(false)
}
