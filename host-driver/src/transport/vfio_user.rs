//! vfio-user transport through rust-vmm's `vfio_user::Client` (independent of our server's
//! code, so each tests the other): DMA_MAP of the driver's memfd, REGION_READ/WRITE for
//! registers, and the doorbell page mmapped from the sparse-mmap area of BAR0.
//!
//! Bounded waits: the client has no timeouts and does not expose its socket, so after it
//! connects we find that socket among our fds (the one connected to the server's path
//! that was not there before; connects are serialised) and give it receive and send
//! timeouts ([`IO_TIMEOUT`]). A message that fails half way (timeout, closed socket) leaves
//! the stream out of step with the server: the transport is then broken for good and
//! every later call fails at once (the controller is reported failed, never reused).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use vfio_user::Client;

use super::Transport;
use crate::dma::DmaMemory;
use crate::error::DriverError;

const BAR0: u32 = 0;
const DOORBELL_OFFSET: u64 = 0x1000;
/// How long one message to the server may wait to be sent, or for its reply. A server
/// answers in microseconds; this leaves room for one that is paused for a while (a reset
/// of its own front waiting for its backend, a debugger) before it is declared dead.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Serialises connects, so the socket a connect made can be told apart.
static CONNECTING: Mutex<()> = Mutex::new(());

/// A controller behind a vfio-user socket.
pub struct VfioUserTransport {
    client: Client,
    path: PathBuf,
    /// Why the stream is out of step with the server, after a message failed half way.
    broken: Option<String>,
    /// The BAR0 area over the doorbells, mapped from the server's fd.
    mapping: memmap2::MmapRaw,
    /// Offset of the doorbell registers in `mapping`.
    doorbells: usize,
}

/// A transport error (rust-vmm's messages already include the OS error).
fn err(what: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Transport(format!("{what}: {e}"))
}

fn plain(what: &str, why: &str) -> DriverError {
    DriverError::Transport(format!("{what}: {why}"))
}

impl VfioUserTransport {
    /// Connect to `socket` and map the doorbell page.
    pub fn connect(socket: &Path) -> Result<Self, DriverError> {
        let client = {
            let _one = CONNECTING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = peer_sockets(socket);
            let client = Client::new(socket)
                .map_err(|e| err(&format!("connect {}", socket.display()), e))?;
            let new: Vec<_> = peer_sockets(socket)
                .into_iter()
                .filter(|s| !before.contains(s))
                .collect();
            match new[..] {
                [(fd, _)] => {
                    if let Err(e) = set_timeouts(fd, IO_TIMEOUT) {
                        log::warn!(
                            "{}: cannot set socket timeouts ({e}): a server that stops answering blocks its caller",
                            socket.display()
                        );
                    }
                }
                _ => log::warn!(
                    "{}: the client's socket is not identifiable ({} candidates): no timeouts; a server that stops answering blocks its caller",
                    socket.display(),
                    new.len()
                ),
            }
            client
        };
        let bar0 = client
            .region(BAR0)
            .ok_or_else(|| plain("BAR0", "the server has no region 0"))?;
        let area = bar0
            .sparse_areas
            .iter()
            .find(|a| a.offset <= DOORBELL_OFFSET && a.offset + a.size > DOORBELL_OFFSET)
            .copied()
            .ok_or_else(|| {
                DriverError::Transport(
                    "BAR0 has no mmappable area over the doorbells (0x1000): trapped doorbells are not supported".into(),
                )
            })?;
        let fo = bar0
            .file_offset
            .as_ref()
            .ok_or_else(|| plain("BAR0", "no file descriptor for mmap"))?;
        let mapping = memmap2::MmapOptions::new()
            .offset(fo.start() + area.offset)
            .len(area.size as usize)
            .map_raw(fo.file())
            .map_err(|e| err("mmap doorbells", e))?;
        Ok(Self {
            client,
            path: socket.to_path_buf(),
            broken: None,
            mapping,
            // inside the area (checked above)
            doorbells: (DOORBELL_OFFSET - area.offset) as usize,
        })
    }
}

impl VfioUserTransport {
    /// Run one message exchange; a failure half way breaks the transport for good.
    fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Client) -> Result<T, vfio_user::Error>,
    ) -> Result<T, DriverError> {
        if let Some(why) = &self.broken {
            return Err(plain(what, &format!("connection unusable: {why}")));
        }
        f(&mut self.client).map_err(|e| {
            use vfio_user::Error as E;
            let why = match &e {
                E::StreamRead(io) | E::StreamWrite(io)
                    if matches!(
                        io.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    Some(format!("no answer within {IO_TIMEOUT:?}"))
                }
                E::StreamRead(_) | E::StreamWrite(_) | E::SendWithFd(_) | E::ReceiveWithFd(_) => {
                    Some(e.to_string())
                }
                _ => None,
            };
            match why {
                Some(why) => {
                    log::error!(
                        "vfio-user:{}: {what}: {why}; connection given up",
                        self.path.display()
                    );
                    let e = plain(what, &why);
                    self.broken = Some(why);
                    e
                }
                None => err(what, e),
            }
        })
    }
}

impl Transport for VfioUserTransport {
    fn read32(&mut self, offset: u64) -> Result<u32, DriverError> {
        let mut b = [0u8; 4];
        self.call("region read", |c| c.region_read(BAR0, offset, &mut b))?;
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), DriverError> {
        self.call("region write", |c| {
            c.region_write(BAR0, offset, &value.to_le_bytes())
        })
    }

    fn doorbells(&self) -> *mut u32 {
        self.mapping
            .as_mut_ptr()
            .wrapping_add(self.doorbells)
            .cast()
    }

    fn map_dma(&mut self, mem: &DmaMemory) -> Result<(), DriverError> {
        let (iova, size, fd) = (mem.iova_base(), mem.size(), mem.fd().as_raw_fd());
        self.call("DMA map", |c| c.dma_map(0, iova, size, fd))
    }

    fn map_foreign(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
        _host: *mut u8,
        iova: u64,
        len: u64,
    ) -> Result<(), DriverError> {
        self.call("DMA map (foreign)", |c| {
            c.dma_map(file_offset, iova, len, fd.as_raw_fd())
        })
    }

    fn unmap_foreign(&mut self, iova: u64, len: u64) -> Result<(), DriverError> {
        self.call("DMA unmap", |c| c.dma_unmap(iova, len))
    }

    fn name(&self) -> String {
        format!("vfio-user:{}", self.path.display())
    }
}

/// Our sockets connected to a server bound at `path`: (fd, socket inode).
fn peer_sockets(path: &Path) -> Vec<(RawFd, u64)> {
    let want = path.as_os_str().as_bytes();
    let canonical = std::fs::canonicalize(path).ok();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let Some(ino) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(peer) = peer_path(fd) else { continue };
        let same = peer.as_os_str().as_bytes() == want
            || canonical
                .as_ref()
                .is_some_and(|c| std::fs::canonicalize(&peer).ok().as_ref() == Some(c));
        if same {
            found.push((fd, ino));
        }
    }
    found
}

/// The path of the Unix socket `fd` is connected to, if it is one.
fn peer_path(fd: RawFd) -> Option<PathBuf> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into `addr`, which is that large; an
    // fd that is not a socket (or closed meanwhile) only makes it fail.
    let r = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &raw mut len) };
    if r != 0 || i32::from(addr.sun_family) != libc::AF_UNIX {
        return None;
    }
    let off = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let n = (len as usize).saturating_sub(off).min(addr.sun_path.len());
    let bytes: Vec<u8> = addr.sun_path[..n]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    (!bytes.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

/// Give socket `fd` receive and send timeouts of `t`.
fn set_timeouts(fd: RawFd, t: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(t.subsec_micros() as i32),
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a timeval of the size given; `fd` is the client's
        // socket, alive while the client is.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
