//! VFIO transport for a local PCI NVMe controller bound to `vfio-pci` (Linux
//! `include/uapi/linux/vfio.h`): type1 IOMMU container, group, device fd, BAR0 mmapped
//! for registers and doorbells, bus mastering on, the driver's DMA memory mapped with
//! VFIO_IOMMU_MAP_DMA. Plain ioctls on our own structs: every call's result is checked
//! (vfio-ioctls' region accessors swallow errors).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use super::Transport;
use crate::dma::DmaMemory;
use crate::error::DriverError;

const VFIO_TYPE: u64 = b';' as u64;
const fn io(nr: u64) -> u64 {
    (VFIO_TYPE << 8) | nr
}
const GET_API_VERSION: u64 = io(100);
const CHECK_EXTENSION: u64 = io(101);
const SET_IOMMU: u64 = io(102);
const GROUP_GET_STATUS: u64 = io(103);
const GROUP_SET_CONTAINER: u64 = io(104);
const GROUP_GET_DEVICE_FD: u64 = io(106);
const DEVICE_GET_REGION_INFO: u64 = io(108);
const IOMMU_MAP_DMA: u64 = io(113);
const IOMMU_UNMAP_DMA: u64 = io(114);
const API_VERSION: i32 = 0;
const TYPE1_IOMMU: u64 = 1;
const TYPE1V2_IOMMU: u64 = 3;
const GROUP_FLAGS_VIABLE: u32 = 1;
const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const CONFIG_REGION: u32 = 7;
const DMA_MAP_READ_WRITE: u32 = 3;
/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY_MASTER: u16 = 0x6;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

fn os_err(what: &str) -> DriverError {
    DriverError::Transport(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// ioctl with a pointer argument; -1 becomes an error naming `what`.
fn ioctl_ptr<T>(fd: &impl AsRawFd, req: u64, arg: *mut T, what: &str) -> Result<i32, DriverError> {
    // SAFETY: `arg` points to a live, correctly laid out struct for `req` (callers pass the
    // matching repr(C) type with argsz set); the kernel reads/writes at most argsz bytes.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 { Err(os_err(what)) } else { Ok(r) }
}

/// ioctl with an integer argument.
fn ioctl_val(fd: &impl AsRawFd, req: u64, arg: u64, what: &str) -> Result<i32, DriverError> {
    // SAFETY: these VFIO requests take a plain integer argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 { Err(os_err(what)) } else { Ok(r) }
}

/// A PCI NVMe controller bound to vfio-pci.
pub struct VfioTransport {
    bdf: String,
    container: File,
    _group: File,
    device: OwnedFd,
    bar0: *mut u8,
    bar0_len: usize,
}

// SAFETY: bar0 points at our own mapping of the device's BAR0, alive as long as self;
// register accesses go through &mut self, doorbells through the queue pairs that own them.
unsafe impl Send for VfioTransport {}

impl VfioTransport {
    /// Open `bdf` (DDDD:BB:DD.F): its IOMMU group must be viable (every device in it bound
    /// to vfio-pci or no driver).
    pub fn open(bdf: &str) -> Result<Self, DriverError> {
        let link =
            std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group")).map_err(|e| {
                DriverError::Transport(format!(
                    "{bdf}: no IOMMU group ({e}); is the IOMMU on and the device present?"
                ))
            })?;
        let group_id = link
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| DriverError::Transport(format!("{bdf}: odd iommu_group link")))?
            .to_string();
        let open = |p: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| {
                    DriverError::Transport(format!("open {p}: {e} (is {bdf} bound to vfio-pci?)"))
                })
        };
        let container = open("/dev/vfio/vfio")?;
        if ioctl_val(&container, GET_API_VERSION, 0, "VFIO_GET_API_VERSION")? != API_VERSION {
            return Err(DriverError::Transport("unknown VFIO API version".into()));
        }
        let iommu = if ioctl_val(
            &container,
            CHECK_EXTENSION,
            TYPE1V2_IOMMU,
            "VFIO_CHECK_EXTENSION",
        )? == 1
        {
            TYPE1V2_IOMMU
        } else if ioctl_val(
            &container,
            CHECK_EXTENSION,
            TYPE1_IOMMU,
            "VFIO_CHECK_EXTENSION",
        )? == 1
        {
            TYPE1_IOMMU
        } else {
            return Err(DriverError::Transport(
                "no type1 IOMMU support in VFIO".into(),
            ));
        };
        let group = open(&format!("/dev/vfio/{group_id}"))?;
        let mut status = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        ioctl_ptr(
            &group,
            GROUP_GET_STATUS,
            &raw mut status,
            "VFIO_GROUP_GET_STATUS",
        )?;
        if status.flags & GROUP_FLAGS_VIABLE == 0 {
            return Err(DriverError::Transport(format!(
                "IOMMU group {group_id} is not viable: bind every device in it to vfio-pci"
            )));
        }
        let mut cfd = container.as_raw_fd();
        ioctl_ptr(
            &group,
            GROUP_SET_CONTAINER,
            &raw mut cfd,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl_val(&container, SET_IOMMU, iommu, "VFIO_SET_IOMMU")?;
        let name = std::ffi::CString::new(bdf)
            .map_err(|_| DriverError::Invalid(format!("bad PCI address {bdf:?}")))?;
        let dfd = ioctl_ptr(
            &group,
            GROUP_GET_DEVICE_FD,
            name.as_ptr().cast_mut(),
            "VFIO_GROUP_GET_DEVICE_FD",
        )?;
        // SAFETY: a fresh descriptor returned by the kernel, owned from here on.
        let device = unsafe { OwnedFd::from_raw_fd(dfd) };
        let bar = region_info(&device, 0)?;
        if bar.flags & REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x2000 {
            return Err(DriverError::Transport(format!(
                "{bdf}: BAR0 ({} bytes) cannot be mmapped",
                bar.size
            )));
        }
        // SAFETY: mapping the BAR0 region of our device fd at the offset VFIO gave; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                bar.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap BAR0"));
        }
        let mut t = Self {
            bdf: bdf.to_string(),
            container,
            _group: group,
            device,
            bar0: p.cast(),
            bar0_len: bar.size as usize,
        };
        t.enable_bus_master()?;
        Ok(t)
    }

    fn enable_bus_master(&mut self) -> Result<(), DriverError> {
        let cfg = region_info(&self.device, CONFIG_REGION)?;
        // SAFETY: the device fd stays open for the File's lifetime, which we forget below.
        let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(self.device.as_raw_fd()) });
        let mut cmd = [0u8; 2];
        f.read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)
            .map_err(|e| DriverError::Transport(format!("read PCI command: {e}")))?;
        let v = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY_MASTER;
        f.write_all_at(&v.to_le_bytes(), cfg.offset + PCI_COMMAND)
            .map_err(|e| DriverError::Transport(format!("write PCI command: {e}")))
    }

    /// VFIO_IOMMU_MAP_DMA of `len` bytes of our memory at `host` to device address `iova`.
    fn iommu_map(&self, host: *mut u8, iova: u64, len: u64) -> Result<(), DriverError> {
        let mut m = DmaMap {
            argsz: size_of::<DmaMap>() as u32,
            flags: DMA_MAP_READ_WRITE,
            vaddr: host as u64,
            iova,
            size: len,
        };
        ioctl_ptr(
            &self.container,
            IOMMU_MAP_DMA,
            &raw mut m,
            "VFIO_IOMMU_MAP_DMA",
        )
        .map(|_| ())
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, DriverError> {
        let o = usize::try_from(offset).unwrap_or(usize::MAX);
        if o % len != 0 || o.checked_add(len).is_none_or(|end| end > self.bar0_len) {
            return Err(DriverError::Invalid(format!(
                "BAR0 access of {len} bytes at {offset:#x} outside 0..{:#x}",
                self.bar0_len
            )));
        }
        Ok(o)
    }
}

fn region_info(device: &OwnedFd, index: u32) -> Result<RegionInfo, DriverError> {
    let mut info = RegionInfo {
        argsz: size_of::<RegionInfo>() as u32,
        index,
        ..RegionInfo::default()
    };
    ioctl_ptr(
        device,
        DEVICE_GET_REGION_INFO,
        &raw mut info,
        "VFIO_DEVICE_GET_REGION_INFO",
    )?;
    Ok(info)
}

impl Transport for VfioTransport {
    fn read32(&mut self, offset: u64) -> Result<u32, DriverError> {
        let o = self.check(offset, 4)?;
        // SAFETY: o is 4-byte aligned and inside the BAR0 mapping (checked).
        #[allow(clippy::cast_ptr_alignment)]
        Ok(unsafe { std::ptr::read_volatile(self.bar0.add(o).cast::<u32>()) })
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), DriverError> {
        let o = self.check(offset, 4)?;
        // SAFETY: as in read32.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            std::ptr::write_volatile(self.bar0.add(o).cast::<u32>(), value);
        }
        Ok(())
    }

    fn doorbells(&self) -> *mut u32 {
        // SAFETY: BAR0 is at least 0x2000 bytes (checked in open), so 0x1000 is inside it.
        unsafe { self.bar0.add(0x1000).cast() }
    }

    fn map_dma(&mut self, mem: &DmaMemory) -> Result<(), DriverError> {
        self.iommu_map(mem.as_ptr(), mem.iova_base(), mem.size())
    }

    fn map_foreign(
        &mut self,
        _fd: std::os::fd::BorrowedFd<'_>,
        _file_offset: u64,
        host: *mut u8,
        iova: u64,
        len: u64,
    ) -> Result<(), DriverError> {
        self.iommu_map(host, iova, len)
    }

    fn unmap_foreign(&mut self, iova: u64, len: u64) -> Result<(), DriverError> {
        let mut m = DmaUnmap {
            argsz: size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: len,
        };
        ioctl_ptr(
            &self.container,
            IOMMU_UNMAP_DMA,
            &raw mut m,
            "VFIO_IOMMU_UNMAP_DMA",
        )
        .map(|_| ())
    }

    fn before_reset(&mut self) -> Result<(), DriverError> {
        self.enable_bus_master()
    }

    fn name(&self) -> String {
        format!("pci:{}", self.bdf)
    }
}

impl Drop for VfioTransport {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the BAR0 mapping made in open.
        unsafe { libc::munmap(self.bar0.cast(), self.bar0_len) };
    }
}
