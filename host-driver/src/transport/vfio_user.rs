//! vfio-user transport through rust-vmm's `vfio_user::Client` (independent of our server's
//! code, so each tests the other): DMA_MAP of the driver's memfd, REGION_READ/WRITE for
//! registers, and the doorbell page mmapped from the sparse-mmap area of BAR0.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vfio_user::Client;

use super::Transport;
use crate::dma::DmaMemory;
use crate::error::DriverError;

const BAR0: u32 = 0;
const DOORBELL_OFFSET: u64 = 0x1000;

/// A controller behind a vfio-user socket.
pub struct VfioUserTransport {
    client: Client,
    path: PathBuf,
    doorbells: *mut u32,
    /// The doorbell area mapping (start, length), unmapped on drop.
    mapping: (*mut libc::c_void, usize),
}

// SAFETY: the doorbell pointer refers to a shared mapping that lives as long as self; the
// client is only used through &mut self.
unsafe impl Send for VfioUserTransport {}

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
        let client =
            Client::new(socket).map_err(|e| err(&format!("connect {}", socket.display()), e))?;
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
        // SAFETY: mapping the area the server advertised, from its fd; checked; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                area.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fo.file().as_raw_fd(),
                (fo.start() + area.offset) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err("mmap doorbells", std::io::Error::last_os_error()));
        }
        // SAFETY: DOORBELL_OFFSET lies inside the area (checked above).
        let doorbells = unsafe { p.cast::<u8>().add((DOORBELL_OFFSET - area.offset) as usize) };
        Ok(Self {
            client,
            path: socket.to_path_buf(),
            doorbells: doorbells.cast(),
            mapping: (p, area.size as usize),
        })
    }
}

impl Transport for VfioUserTransport {
    fn read32(&mut self, offset: u64) -> Result<u32, DriverError> {
        let mut b = [0u8; 4];
        self.client
            .region_read(BAR0, offset, &mut b)
            .map_err(|e| err("region read", e))?;
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), DriverError> {
        self.client
            .region_write(BAR0, offset, &value.to_le_bytes())
            .map_err(|e| err("region write", e))
    }

    fn doorbells(&self) -> *mut u32 {
        self.doorbells
    }

    fn map_dma(&mut self, mem: &DmaMemory) -> Result<(), DriverError> {
        self.client
            .dma_map(0, mem.iova_base(), mem.size(), mem.fd().as_raw_fd())
            .map_err(|e| err("DMA map", e))
    }

    fn map_foreign(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
        _host: *mut u8,
        iova: u64,
        len: u64,
    ) -> Result<(), DriverError> {
        self.client
            .dma_map(file_offset, iova, len, fd.as_raw_fd())
            .map_err(|e| err("DMA map (foreign)", e))
    }

    fn unmap_foreign(&mut self, iova: u64, len: u64) -> Result<(), DriverError> {
        self.client
            .dma_unmap(iova, len)
            .map_err(|e| err("DMA unmap", e))
    }

    fn name(&self) -> String {
        format!("vfio-user:{}", self.path.display())
    }
}

impl Drop for VfioUserTransport {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in connect.
        unsafe { libc::munmap(self.mapping.0, self.mapping.1) };
    }
}
