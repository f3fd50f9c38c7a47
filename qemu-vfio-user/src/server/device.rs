//! The NVMe controller as a vfio-user device: regions (config space, BAR0 registers and
//! doorbells, BAR4 MSI-X), interrupts, DMA map and reset, on top of a
//! [`device_model::ControllerHandle`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use device_model::memory::Protection;
use device_model::pci::{self, ConfigSpace, ConfigWrite, PciIds};
use device_model::{ControllerHandle, Doorbells, GuestMemory};
use zerocopy::IntoBytes;

use super::protocol::{self as p, DeviceInfo, IrqInfo, IrqSet, RegionInfo, SparseMmapCap, vfio};

/// A reply: payload bytes, plus an fd to pass (region info of an mmappable region).
pub struct Reply<'a> {
    pub payload: Vec<u8>,
    pub fd: Option<std::os::fd::BorrowedFd<'a>>,
}

/// A refused request: errno plus a message for the log.
#[derive(Debug)]
pub struct DeviceError {
    pub errno: i32,
    pub what: String,
}

fn err(errno: i32, what: impl Into<String>) -> DeviceError {
    DeviceError {
        errno,
        what: what.into(),
    }
}

/// Device state the vfio-user front end owns (the controller itself lives in its reactor).
pub struct NvmeDevice {
    pub handle: ControllerHandle,
    pub mem: Arc<GuestMemory>,
    pub doorbells: Arc<Doorbells>,
    config: ConfigSpace,
    ids: PciIds,
    msix_bar: Vec<u8>,
    /// SR-IOV PF: told how many VFs are enabled whenever that changes.
    on_vfs: Option<VfHook>,
    /// The client's error (ERR) and device-request (REQ) eventfds. Kept, never signalled:
    /// QEMU stops the whole VM on an ERR event and unplugs the device on a REQ event, and a
    /// controller's fatal state reaches its guest through CSTS.CFS instead.
    notifiers: [Option<OwnedFd>; 2],
}

/// What an SR-IOV PF does when its VF Enable / NumVFs change: the number of VFs enabled.
pub type VfHook = Box<dyn Fn(u16) + Send>;

impl std::fmt::Debug for NvmeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDevice")
            .field("ids", &self.ids)
            .finish()
    }
}

impl NvmeDevice {
    /// Wrap a running controller.
    pub fn new(
        handle: ControllerHandle,
        mem: Arc<GuestMemory>,
        doorbells: Arc<Doorbells>,
        ids: PciIds,
    ) -> Self {
        Self {
            handle,
            mem,
            doorbells,
            config: ConfigSpace::new(ids),
            ids,
            msix_bar: vec![0; pci::BAR4_SIZE as usize],
            on_vfs: None,
            notifiers: [None, None],
        }
    }

    /// An SR-IOV PF: the config space carries the SR-IOV capability, and `on_vfs` learns
    /// how many VFs are enabled each time VF Enable or NumVFs changes (0 after a reset).
    #[must_use]
    pub fn with_sriov(mut self, shape: pci::SriovShape, on_vfs: VfHook) -> Self {
        self.config = ConfigSpace::with_sriov(self.ids, shape);
        self.on_vfs = Some(on_vfs);
        self
    }

    /// Reset the config space; VFs enabled through it are disabled.
    fn reset_config(&mut self) {
        let had = self.config.vfs_enabled();
        self.config.reset();
        if had != 0
            && let Some(hook) = &self.on_vfs
        {
            log::info!("PF reset: {had} VFs disabled");
            hook(0);
        }
    }

    /// Client gone or DEVICE_RESET: reset the controller, forget interrupts (and, when the
    /// client left, its memory).
    pub fn reset(&mut self, forget_memory: bool) {
        // forget the memory first: commands still in flight keep their snapshot of it, and
        // the controller's reset then tells mirroring backends the map is gone
        if forget_memory {
            self.mem.clear();
        }
        self.handle.device_reset();
        self.reset_config();
        self.msix_bar.fill(0);
    }

    fn region_size(index: u32) -> u64 {
        match index {
            vfio::PCI_BAR0_REGION_INDEX => pci::BAR0_SIZE,
            vfio::PCI_BAR4_REGION_INDEX => pci::BAR4_SIZE,
            vfio::PCI_CONFIG_REGION_INDEX => pci::CONFIG_SIZE,
            _ => 0,
        }
    }

    pub fn device_info() -> Vec<u8> {
        DeviceInfo {
            argsz: (size_of::<DeviceInfo>() as u32).into(),
            flags: (vfio::DEVICE_FLAGS_PCI | vfio::DEVICE_FLAGS_RESET).into(),
            num_regions: vfio::PCI_NUM_REGIONS.into(),
            num_irqs: vfio::PCI_NUM_IRQS.into(),
        }
        .as_bytes()
        .to_vec()
    }

    /// GET_REGION_INFO: BAR0 carries the sparse-mmap capability for the doorbell page and
    /// the memfd to map it from. If the client's argsz is too small for the capability,
    /// the reply says how much is needed (argsz) and the client asks again.
    pub fn region_info(&self, argsz: u32, index: u32) -> Reply<'_> {
        let size = Self::region_size(index);
        let mut info = RegionInfo {
            argsz: (size_of::<RegionInfo>() as u32).into(),
            index: index.into(),
            size: size.into(),
            ..Default::default()
        };
        if size > 0 {
            info.flags = (vfio::REGION_INFO_FLAG_READ | vfio::REGION_INFO_FLAG_WRITE).into();
        }
        let mut caps = Vec::new();
        if index == vfio::PCI_BAR0_REGION_INDEX {
            let cap = SparseMmapCap {
                id: vfio::REGION_INFO_CAP_SPARSE_MMAP.into(),
                version: 1.into(),
                next: 0.into(),
                nr_areas: 1.into(),
                reserved: 0.into(),
            };
            caps.extend_from_slice(cap.as_bytes());
            caps.extend_from_slice(&pci::DOORBELL_OFFSET.to_le_bytes());
            caps.extend_from_slice(&pci::DOORBELL_SIZE.to_le_bytes());
            info.flags =
                (info.flags.get() | vfio::REGION_INFO_FLAG_MMAP | vfio::REGION_INFO_FLAG_CAPS)
                    .into();
            info.cap_offset = (size_of::<RegionInfo>() as u32).into();
            info.offset = 0.into();
            info.argsz = ((size_of::<RegionInfo>() + caps.len()) as u32).into();
        }
        let mut payload = info.as_bytes().to_vec();
        if argsz as usize >= payload.len() + caps.len() {
            payload.extend_from_slice(&caps);
        }
        let fd = (index == vfio::PCI_BAR0_REGION_INDEX).then(|| self.doorbells.fd());
        Reply { payload, fd }
    }

    pub fn irq_info(index: u32) -> Vec<u8> {
        let (flags, count) = match index {
            vfio::PCI_INTX_IRQ_INDEX => (
                vfio::IRQ_INFO_EVENTFD | vfio::IRQ_INFO_MASKABLE | vfio::IRQ_INFO_AUTOMASKED,
                1,
            ),
            vfio::PCI_MSIX_IRQ_INDEX => (vfio::IRQ_INFO_EVENTFD, u32::from(pci::MSIX_VECTORS)),
            // one eventfd each, as vfio-pci offers for a PCIe function: QEMU asks for the
            // ERR index at realize and warns "Could not enable error recovery" without it
            vfio::PCI_ERR_IRQ_INDEX | vfio::PCI_REQ_IRQ_INDEX => (vfio::IRQ_INFO_EVENTFD, 1),
            _ => (vfio::IRQ_INFO_EVENTFD, 0),
        };
        IrqInfo {
            argsz: (size_of::<IrqInfo>() as u32).into(),
            flags: flags.into(),
            index: index.into(),
            count: count.into(),
        }
        .as_bytes()
        .to_vec()
    }

    /// SET_IRQS for INTx and MSI-X (vfio semantics: DATA_NONE + TRIGGER with count 0
    /// disables the index; eventfd messages without fds disable those vectors).
    pub fn set_irqs(&mut self, s: &IrqSet, fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        let f = s.flags.get();
        let (index, start, count) = (
            s.index.get(),
            s.start.get() as usize,
            s.count.get() as usize,
        );
        let trigger = f & vfio::IRQ_SET_ACTION_TRIGGER != 0;
        let eventfd = f & vfio::IRQ_SET_DATA_EVENTFD != 0;
        for fd in &fds {
            device_model::irq::check_eventfd(fd.as_fd())
                .map_err(|e| err(libc::EINVAL, e.to_string()))?;
        }
        match index {
            vfio::PCI_MSIX_IRQ_INDEX => {
                if !trigger {
                    return Err(err(
                        libc::EINVAL,
                        "MSI-X vectors are not maskable through SET_IRQS",
                    ));
                }
                if start + count > usize::from(pci::MSIX_VECTORS) {
                    return Err(err(
                        libc::EINVAL,
                        format!("MSI-X vectors {start}+{count} beyond {}", pci::MSIX_VECTORS),
                    ));
                }
                if !eventfd && count == 0 {
                    self.handle
                        .set_msix(0, (0..pci::MSIX_VECTORS).map(|_| None).collect());
                } else if eventfd {
                    let v: Vec<Option<OwnedFd>> = if fds.is_empty() {
                        (0..count).map(|_| None).collect()
                    } else {
                        fds.into_iter().map(Some).collect()
                    };
                    self.handle.set_msix(start, v);
                }
                Ok(())
            }
            vfio::PCI_INTX_IRQ_INDEX => {
                if start + count > 1 {
                    return Err(err(libc::EINVAL, "INTx has one vector"));
                }
                if trigger {
                    if eventfd {
                        self.handle.set_intx(fds.into_iter().next());
                    } else if count == 0 {
                        self.handle.set_intx(None);
                    }
                }
                Ok(()) // mask / unmask: interrupts are edge events on an eventfd; nothing to do
            }
            vfio::PCI_ERR_IRQ_INDEX | vfio::PCI_REQ_IRQ_INDEX => {
                if start + count > 1 || !trigger {
                    return Err(err(
                        libc::EINVAL,
                        format!("irq index {index} has one vector"),
                    ));
                }
                let slot = &mut self.notifiers[(index - vfio::PCI_ERR_IRQ_INDEX) as usize];
                if eventfd {
                    *slot = fds.into_iter().next();
                } else if count == 0 {
                    *slot = None;
                }
                Ok(())
            }
            _ if count == 0 && !eventfd => Ok(()),
            _ => Err(err(
                libc::EINVAL,
                format!("irq index {index} has no vectors"),
            )),
        }
    }

    /// DMA_MAP: with an fd, mmap it; without one, record the range as inaccessible
    /// (QEMU maps ROM and other devices' BARs this way; we do not serve DMA_READ/WRITE).
    pub fn dma_map(&self, m: &p::DmaMap, fd: Option<&OwnedFd>) -> Result<(), DeviceError> {
        let fl = m.flags.get();
        let prot = Protection {
            read: fl & vfio::DMA_MAP_FLAG_READ != 0,
            write: fl & vfio::DMA_MAP_FLAG_WRITE != 0,
        };
        let r = if let Some(fd) = fd {
            self.mem.map_fd(
                m.address.get(),
                m.size.get(),
                fd.as_fd(),
                m.offset.get(),
                prot,
            )
        } else {
            log::debug!(
                "DMA_MAP without fd at {:#x}+{:#x}: recorded as inaccessible",
                m.address.get(),
                m.size.get()
            );
            self.mem.map_inaccessible(m.address.get(), m.size.get())
        };
        r.map_err(|e| {
            err(
                if matches!(e, device_model::memory::MapError::Overlap { .. }) {
                    libc::EEXIST
                } else {
                    libc::EINVAL
                },
                e.to_string(),
            )
        })
    }

    pub fn dma_unmap(&self, u: &p::DmaUnmap) -> Result<(), DeviceError> {
        if u.flags.get() & vfio::DMA_UNMAP_FLAG_ALL != 0 {
            self.mem.clear();
            return Ok(());
        }
        self.mem
            .unmap(u.address.get(), u.size.get())
            .map(|_| ())
            .map_err(|e| err(libc::EINVAL, e.to_string()))
    }

    fn check_range(region: u32, offset: u64, count: usize) -> Result<(), DeviceError> {
        let size = Self::region_size(region);
        match offset.checked_add(count as u64) {
            Some(end) if size > 0 && end <= size => Ok(()),
            _ => Err(err(
                libc::EINVAL,
                format!("region {region} access {offset:#x}+{count} outside its {size:#x} bytes"),
            )),
        }
    }

    pub fn region_read(
        &self,
        region: u32,
        offset: u64,
        count: usize,
    ) -> Result<Vec<u8>, DeviceError> {
        Self::check_range(region, offset, count)?;
        let mut out = vec![0u8; count];
        match region {
            vfio::PCI_CONFIG_REGION_INDEX => self.config.read(offset, &mut out),
            vfio::PCI_BAR4_REGION_INDEX => {
                out.copy_from_slice(&self.msix_bar[offset as usize..offset as usize + count]);
            }
            vfio::PCI_BAR0_REGION_INDEX => {
                if let Some(v) = self.doorbells.read(offset).filter(|_| count == 4) {
                    out.copy_from_slice(&v.to_le_bytes());
                } else if offset < pci::DOORBELL_OFFSET {
                    if ![1, 2, 4, 8].contains(&count) {
                        return Err(err(
                            libc::EINVAL,
                            format!("BAR0 register read of {count} bytes"),
                        ));
                    }
                    let v = self.handle.read_register(offset, count);
                    out.copy_from_slice(&v.to_le_bytes()[..count]);
                }
            }
            _ => unreachable!("check_range refuses regions of size 0"),
        }
        Ok(out)
    }

    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        Self::check_range(region, offset, data.len())?;
        match region {
            vfio::PCI_CONFIG_REGION_INDEX => match self.config.write(offset, data) {
                ConfigWrite::FunctionLevelReset => {
                    log::info!("function level reset");
                    self.handle.device_reset();
                    self.reset_config();
                }
                ConfigWrite::Vfs(pci::VfChange::Enabled(n)) => {
                    log::info!("SR-IOV: {n} VFs enabled");
                    if let Some(hook) = &self.on_vfs {
                        hook(n);
                    }
                }
                ConfigWrite::Stored => {}
            },
            vfio::PCI_BAR4_REGION_INDEX => {
                self.msix_bar[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            }
            vfio::PCI_BAR0_REGION_INDEX => {
                if offset >= pci::DOORBELL_OFFSET {
                    if data.len() == 4
                        && self.doorbells.write(
                            offset,
                            u32::from_le_bytes(data.try_into().unwrap_or_default()),
                        )
                    {
                        self.handle.wake();
                    }
                } else if [1, 2, 4, 8].contains(&data.len()) {
                    let mut b = [0u8; 8];
                    b[..data.len()].copy_from_slice(data);
                    self.handle
                        .write_register(offset, u64::from_le_bytes(b), data.len());
                } else {
                    return Err(err(
                        libc::EINVAL,
                        format!("BAR0 register write of {} bytes", data.len()),
                    ));
                }
            }
            _ => unreachable!("check_range refuses regions of size 0"),
        }
        Ok(())
    }
}
