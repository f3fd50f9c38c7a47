//! vfio-user wire format (QEMU docs/interop/vfio-user.rst, protocol 0.1): message header,
//! command payloads, and a pure parser that validates every length, count and flag before
//! anything acts on a message. No I/O here, so it can be fuzzed.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Message header (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Header {
    pub msg_id: U16,
    pub command: U16,
    /// Size of the whole message including this header.
    pub msg_size: U32,
    pub flags: U32,
    pub error_no: U32,
}

pub const HEADER_SIZE: usize = 16;
/// Largest data transfer in one REGION_READ/WRITE we accept (advertised).
pub const MAX_DATA_XFER: usize = 1 << 20;
/// Largest message we accept: header + the largest payload (region write + data).
pub const MAX_MSG_SIZE: usize = HEADER_SIZE + 16 + MAX_DATA_XFER;
/// File descriptors a client may send with one message (advertised).
pub const MAX_MSG_FDS: usize = 16;

/// Header flag bits.
pub mod flags {
    pub const TYPE_MASK: u32 = 0xf;
    pub const TYPE_COMMAND: u32 = 0;
    pub const TYPE_REPLY: u32 = 1;
    pub const NO_REPLY: u32 = 1 << 4;
    pub const ERROR: u32 = 1 << 5;
}

/// Command numbers.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
}

/// VFIO constants reused by vfio-user, from rust-vmm's `vfio-bindings` (linux/vfio.h).
pub mod vfio {
    use vfio_bindings::bindings::vfio as vb;

    pub const DEVICE_FLAGS_RESET: u32 = vb::VFIO_DEVICE_FLAGS_RESET;
    pub const DEVICE_FLAGS_PCI: u32 = vb::VFIO_DEVICE_FLAGS_PCI;
    pub const REGION_INFO_FLAG_READ: u32 = vb::VFIO_REGION_INFO_FLAG_READ;
    pub const REGION_INFO_FLAG_WRITE: u32 = vb::VFIO_REGION_INFO_FLAG_WRITE;
    pub const REGION_INFO_FLAG_MMAP: u32 = vb::VFIO_REGION_INFO_FLAG_MMAP;
    pub const REGION_INFO_FLAG_CAPS: u32 = vb::VFIO_REGION_INFO_FLAG_CAPS;
    pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = vb::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
    pub const PCI_BAR0_REGION_INDEX: u32 = vb::VFIO_PCI_BAR0_REGION_INDEX;
    pub const PCI_BAR4_REGION_INDEX: u32 = vb::VFIO_PCI_BAR4_REGION_INDEX;
    pub const PCI_ROM_REGION_INDEX: u32 = vb::VFIO_PCI_ROM_REGION_INDEX;
    pub const PCI_CONFIG_REGION_INDEX: u32 = vb::VFIO_PCI_CONFIG_REGION_INDEX;
    pub const PCI_NUM_REGIONS: u32 = vb::VFIO_PCI_NUM_REGIONS;
    pub const PCI_INTX_IRQ_INDEX: u32 = vb::VFIO_PCI_INTX_IRQ_INDEX;
    pub const PCI_MSI_IRQ_INDEX: u32 = vb::VFIO_PCI_MSI_IRQ_INDEX;
    pub const PCI_MSIX_IRQ_INDEX: u32 = vb::VFIO_PCI_MSIX_IRQ_INDEX;
    pub const PCI_ERR_IRQ_INDEX: u32 = vb::VFIO_PCI_ERR_IRQ_INDEX;
    pub const PCI_REQ_IRQ_INDEX: u32 = vb::VFIO_PCI_REQ_IRQ_INDEX;
    pub const PCI_NUM_IRQS: u32 = vb::VFIO_PCI_NUM_IRQS;
    pub const IRQ_INFO_EVENTFD: u32 = vb::VFIO_IRQ_INFO_EVENTFD;
    pub const IRQ_INFO_MASKABLE: u32 = vb::VFIO_IRQ_INFO_MASKABLE;
    pub const IRQ_INFO_AUTOMASKED: u32 = vb::VFIO_IRQ_INFO_AUTOMASKED;
    pub const IRQ_SET_DATA_NONE: u32 = vb::VFIO_IRQ_SET_DATA_NONE;
    pub const IRQ_SET_DATA_BOOL: u32 = vb::VFIO_IRQ_SET_DATA_BOOL;
    pub const IRQ_SET_DATA_EVENTFD: u32 = vb::VFIO_IRQ_SET_DATA_EVENTFD;
    pub const IRQ_SET_ACTION_MASK: u32 = vb::VFIO_IRQ_SET_ACTION_MASK;
    pub const IRQ_SET_ACTION_UNMASK: u32 = vb::VFIO_IRQ_SET_ACTION_UNMASK;
    pub const IRQ_SET_ACTION_TRIGGER: u32 = vb::VFIO_IRQ_SET_ACTION_TRIGGER;
    pub const DMA_MAP_FLAG_READ: u32 = vb::VFIO_DMA_MAP_FLAG_READ;
    pub const DMA_MAP_FLAG_WRITE: u32 = vb::VFIO_DMA_MAP_FLAG_WRITE;
    pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = vb::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
    pub const DMA_UNMAP_FLAG_ALL: u32 = vb::VFIO_DMA_UNMAP_FLAG_ALL;
}

// The payloads below are vfio-bindings' structs as they travel on a vfio-user socket: the
// same layout, but little-endian whatever the host and parsed from untrusted bytes, hence
// zerocopy types (vfio-bindings' bindgen structs derive neither). Same size as the kernel's,
// except DEVICE_GET_INFO: vfio-user keeps the 16-byte struct of before the kernel added
// `cap_offset` (24 bytes in vfio-bindings), so the kernel struct cannot be the wire struct.
const _: () = {
    use std::mem::size_of;
    use vfio_bindings::bindings::vfio as vb;
    assert!(size_of::<DeviceInfo>() + 8 == size_of::<vb::vfio_device_info>());
    assert!(size_of::<RegionInfo>() == size_of::<vb::vfio_region_info>());
    assert!(size_of::<IrqInfo>() == size_of::<vb::vfio_irq_info>());
    assert!(size_of::<IrqSet>() == size_of::<vb::vfio_irq_set>());
    assert!(size_of::<SparseMmapCap>() == size_of::<vb::vfio_region_info_cap_sparse_mmap>());
};

/// DMA_MAP payload.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DmaMap {
    pub argsz: U32,
    pub flags: U32,
    pub offset: U64,
    pub address: U64,
    pub size: U64,
}

/// DMA_UNMAP payload.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DmaUnmap {
    pub argsz: U32,
    pub flags: U32,
    pub address: U64,
    pub size: U64,
}

/// DEVICE_GET_INFO payload.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DeviceInfo {
    pub argsz: U32,
    pub flags: U32,
    pub num_regions: U32,
    pub num_irqs: U32,
}

/// DEVICE_GET_REGION_INFO payload (struct vfio_region_info).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RegionInfo {
    pub argsz: U32,
    pub flags: U32,
    pub index: U32,
    pub cap_offset: U32,
    pub size: U64,
    pub offset: U64,
}

/// Sparse mmap capability header + area count (areas of (offset, size) u64 pairs follow).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SparseMmapCap {
    pub id: U16,
    pub version: U16,
    pub next: U32,
    pub nr_areas: U32,
    pub reserved: U32,
}

/// DEVICE_GET_IRQ_INFO payload.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IrqInfo {
    pub argsz: U32,
    pub flags: U32,
    pub index: U32,
    pub count: U32,
}

/// DEVICE_SET_IRQS payload.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IrqSet {
    pub argsz: U32,
    pub flags: U32,
    pub index: U32,
    pub start: U32,
    pub count: U32,
}

/// REGION_READ / REGION_WRITE payload header (data follows for writes and read replies).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RegionAccess {
    pub offset: U64,
    pub region: U32,
    pub count: U32,
}

/// Why a message was refused; each maps to the errno sent in the error reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message size {0} is smaller than the header")]
    TooShort(usize),
    #[error("message size {0} exceeds the limit")]
    TooBig(usize),
    #[error("message type {0:#x} is not a command")]
    NotACommand(u32),
    #[error("{command}: payload of {got} bytes, need {need}")]
    Truncated {
        command: u16,
        got: usize,
        need: usize,
    },
    #[error("{command}: {got} file descriptors, expected {expected}")]
    FdCount {
        command: u16,
        got: usize,
        expected: &'static str,
    },
    #[error("{command}: {what}")]
    Invalid { command: u16, what: &'static str },
    #[error("unknown or unsupported command {0}")]
    Unsupported(u16),
}

impl ProtocolError {
    /// errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            ProtocolError::TooBig(_) => libc::E2BIG,
            ProtocolError::Unsupported(_) => libc::ENOTSUP,
            ProtocolError::FdCount { .. } => libc::EBADF,
            _ => libc::EINVAL,
        }
    }
}

/// A validated request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Version {
        major: u16,
        minor: u16,
        caps: &'a [u8],
    },
    DmaMap(DmaMap),
    DmaUnmap(DmaUnmap),
    DeviceGetInfo {
        argsz: u32,
    },
    GetRegionInfo {
        argsz: u32,
        index: u32,
    },
    GetIrqInfo {
        argsz: u32,
        index: u32,
    },
    SetIrqs(IrqSet),
    RegionRead {
        region: u32,
        offset: u64,
        count: u32,
    },
    RegionWrite {
        region: u32,
        offset: u64,
        data: &'a [u8],
    },
    DeviceReset,
}

impl PartialEq for DmaMap {
    fn eq(&self, o: &Self) -> bool {
        self.as_bytes() == o.as_bytes()
    }
}
impl Eq for DmaMap {}
impl PartialEq for DmaUnmap {
    fn eq(&self, o: &Self) -> bool {
        self.as_bytes() == o.as_bytes()
    }
}
impl Eq for DmaUnmap {}
impl PartialEq for IrqSet {
    fn eq(&self, o: &Self) -> bool {
        self.as_bytes() == o.as_bytes()
    }
}
impl Eq for IrqSet {}

/// Validate the header of an incoming message; returns the payload size to read.
pub fn check_header(h: &Header) -> Result<usize, ProtocolError> {
    let size = h.msg_size.get() as usize;
    if size < HEADER_SIZE {
        return Err(ProtocolError::TooShort(size));
    }
    if size > MAX_MSG_SIZE {
        return Err(ProtocolError::TooBig(size));
    }
    let ty = h.flags.get() & flags::TYPE_MASK;
    if ty != flags::TYPE_COMMAND {
        return Err(ProtocolError::NotACommand(ty));
    }
    Ok(size - HEADER_SIZE)
}

fn payload<T: FromBytes>(command: u16, body: &[u8]) -> Result<T, ProtocolError> {
    let need = size_of::<T>();
    T::read_from_prefix(body)
        .map(|(v, _)| v)
        .map_err(|_| ProtocolError::Truncated {
            command,
            got: body.len(),
            need,
        })
}

fn no_fds(command: u16, nfds: usize) -> Result<(), ProtocolError> {
    if nfds == 0 {
        Ok(())
    } else {
        Err(ProtocolError::FdCount {
            command,
            got: nfds,
            expected: "none",
        })
    }
}

/// Parse and validate a request payload that arrived with `nfds` file descriptors.
pub fn parse_request(command: u16, body: &[u8], nfds: usize) -> Result<Request<'_>, ProtocolError> {
    use vfio::{
        DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
        IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, PCI_NUM_IRQS, PCI_NUM_REGIONS,
    };
    match command {
        cmd::VERSION => {
            no_fds(command, nfds)?;
            if body.len() < 4 {
                return Err(ProtocolError::Truncated {
                    command,
                    got: body.len(),
                    need: 4,
                });
            }
            let major = u16::from_le_bytes([body[0], body[1]]);
            let minor = u16::from_le_bytes([body[2], body[3]]);
            let caps = &body[4..];
            if major != 0 {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "unsupported major version",
                });
            }
            Ok(Request::Version { major, minor, caps })
        }
        cmd::DMA_MAP => {
            let m: DmaMap = payload(command, body)?;
            if (m.argsz.get() as usize) < size_of::<DmaMap>() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "argsz too small",
                });
            }
            if m.flags.get() & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "unknown flags",
                });
            }
            if m.size.get() == 0 || m.address.get().checked_add(m.size.get()).is_none() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "empty or wrapping range",
                });
            }
            if !m.offset.get().is_multiple_of(4096) {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "file offset not page aligned",
                });
            }
            match nfds {
                0 | 1 => Ok(Request::DmaMap(m)),
                n => Err(ProtocolError::FdCount {
                    command,
                    got: n,
                    expected: "0 or 1",
                }),
            }
        }
        cmd::DMA_UNMAP => {
            no_fds(command, nfds)?;
            let u: DmaUnmap = payload(command, body)?;
            if (u.argsz.get() as usize) < size_of::<DmaUnmap>() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "argsz too small",
                });
            }
            let f = u.flags.get();
            if f & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
                return Err(ProtocolError::Unsupported(command));
            }
            if f & !DMA_UNMAP_FLAG_ALL != 0 {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "unknown flags",
                });
            }
            if f & DMA_UNMAP_FLAG_ALL == 0 && u.address.get().checked_add(u.size.get()).is_none() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "wrapping range",
                });
            }
            Ok(Request::DmaUnmap(u))
        }
        cmd::DEVICE_GET_INFO => {
            no_fds(command, nfds)?;
            let i: DeviceInfo = payload(command, body)?;
            if (i.argsz.get() as usize) < size_of::<DeviceInfo>() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "argsz too small",
                });
            }
            Ok(Request::DeviceGetInfo {
                argsz: i.argsz.get(),
            })
        }
        cmd::DEVICE_GET_REGION_INFO => {
            no_fds(command, nfds)?;
            let r: RegionInfo = payload(command, body)?;
            if (r.argsz.get() as usize) < size_of::<RegionInfo>() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "argsz too small",
                });
            }
            if r.index.get() >= PCI_NUM_REGIONS {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "region index out of range",
                });
            }
            Ok(Request::GetRegionInfo {
                argsz: r.argsz.get(),
                index: r.index.get(),
            })
        }
        cmd::DEVICE_GET_IRQ_INFO => {
            no_fds(command, nfds)?;
            let i: IrqInfo = payload(command, body)?;
            if (i.argsz.get() as usize) < size_of::<IrqInfo>() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "argsz too small",
                });
            }
            if i.index.get() >= PCI_NUM_IRQS {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "irq index out of range",
                });
            }
            Ok(Request::GetIrqInfo {
                argsz: i.argsz.get(),
                index: i.index.get(),
            })
        }
        cmd::DEVICE_SET_IRQS => {
            let s: IrqSet = payload(command, body)?;
            let f = s.flags.get();
            let data = f & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
            let action = f & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
            if !data.is_power_of_two() || !action.is_power_of_two() || f & !0x3f != 0 {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "exactly one data type and one action required",
                });
            }
            if data == IRQ_SET_DATA_BOOL {
                return Err(ProtocolError::Unsupported(command));
            }
            if s.index.get() >= PCI_NUM_IRQS || s.start.get().checked_add(s.count.get()).is_none() {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "irq index or range out of bounds",
                });
            }
            let count = s.count.get() as usize;
            let fds_ok = if data == IRQ_SET_DATA_EVENTFD {
                nfds == 0 || nfds == count
            } else {
                nfds == 0
            };
            if !fds_ok {
                return Err(ProtocolError::FdCount {
                    command,
                    got: nfds,
                    expected: "0 or count (eventfd), 0 otherwise",
                });
            }
            Ok(Request::SetIrqs(s))
        }
        cmd::REGION_READ => {
            no_fds(command, nfds)?;
            let a: RegionAccess = payload(command, body)?;
            if a.count.get() as usize > MAX_DATA_XFER {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "count exceeds max_data_xfer_size",
                });
            }
            Ok(Request::RegionRead {
                region: a.region.get(),
                offset: a.offset.get(),
                count: a.count.get(),
            })
        }
        cmd::REGION_WRITE => {
            no_fds(command, nfds)?;
            let a: RegionAccess = payload(command, body)?;
            let count = a.count.get() as usize;
            let data = &body[size_of::<RegionAccess>()..];
            if data.len() != count {
                return Err(ProtocolError::Invalid {
                    command,
                    what: "count does not match the data sent",
                });
            }
            Ok(Request::RegionWrite {
                region: a.region.get(),
                offset: a.offset.get(),
                data,
            })
        }
        cmd::DEVICE_RESET => {
            no_fds(command, nfds)?;
            Ok(Request::DeviceReset)
        }
        other => Err(ProtocolError::Unsupported(other)),
    }
}

/// The server's VERSION reply capabilities (JSON, NUL-terminated on the wire).
pub fn server_capabilities() -> String {
    format!(
        "{{\"capabilities\":{{\"max_msg_fds\":{MAX_MSG_FDS},\"max_data_xfer_size\":{MAX_DATA_XFER},\"pgsizes\":4096,\"max_dma_maps\":{}}}}}",
        device_model::memory::max_regions()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(size: u32, fl: u32) -> Header {
        Header {
            msg_id: 1.into(),
            command: cmd::VERSION.into(),
            msg_size: size.into(),
            flags: fl.into(),
            error_no: 0.into(),
        }
    }

    #[test]
    fn header_limits() {
        assert_eq!(check_header(&hdr(15, 0)), Err(ProtocolError::TooShort(15)));
        assert_eq!(
            check_header(&hdr(u32::MAX, 0)),
            Err(ProtocolError::TooBig(u32::MAX as usize))
        );
        assert_eq!(
            check_header(&hdr(16, 1)),
            Err(ProtocolError::NotACommand(1))
        );
        assert_eq!(check_header(&hdr(20, flags::NO_REPLY)), Ok(4));
    }

    #[test]
    fn dma_map_takes_at_most_one_fd_and_a_sane_range() {
        let m = DmaMap {
            argsz: 32.into(),
            flags: 3.into(),
            offset: 0.into(),
            address: 0x1000.into(),
            size: 0x1000.into(),
        };
        assert!(matches!(
            parse_request(cmd::DMA_MAP, m.as_bytes(), 1),
            Ok(Request::DmaMap(_))
        ));
        assert!(matches!(
            parse_request(cmd::DMA_MAP, m.as_bytes(), 0),
            Ok(Request::DmaMap(_))
        ));
        assert!(matches!(
            parse_request(cmd::DMA_MAP, m.as_bytes(), 2),
            Err(ProtocolError::FdCount { got: 2, .. })
        ));
        assert!(matches!(
            parse_request(cmd::DMA_MAP, &m.as_bytes()[..20], 1),
            Err(ProtocolError::Truncated { .. })
        ));
        let wrap = DmaMap {
            address: (u64::MAX - 10).into(),
            ..m
        };
        assert!(matches!(
            parse_request(cmd::DMA_MAP, wrap.as_bytes(), 1),
            Err(ProtocolError::Invalid { .. })
        ));
        let odd = DmaMap {
            offset: 3.into(),
            ..m
        };
        assert!(matches!(
            parse_request(cmd::DMA_MAP, odd.as_bytes(), 1),
            Err(ProtocolError::Invalid { .. })
        ));
    }

    #[test]
    fn region_write_count_must_match_data() {
        let a = RegionAccess {
            offset: 0x14.into(),
            region: 0.into(),
            count: 4.into(),
        };
        let mut b = a.as_bytes().to_vec();
        b.extend_from_slice(&[1, 0, 0, 0]);
        assert!(matches!(
            parse_request(cmd::REGION_WRITE, &b, 0),
            Ok(Request::RegionWrite {
                data: [1, 0, 0, 0],
                ..
            })
        ));
        b.push(0);
        assert!(matches!(
            parse_request(cmd::REGION_WRITE, &b, 0),
            Err(ProtocolError::Invalid { .. })
        ));
        let big = RegionAccess {
            count: (MAX_DATA_XFER as u32 + 1).into(),
            ..a
        };
        assert!(matches!(
            parse_request(cmd::REGION_READ, big.as_bytes(), 0),
            Err(ProtocolError::Invalid { .. })
        ));
    }

    #[test]
    fn set_irqs_flag_and_fd_rules() {
        let s = IrqSet {
            argsz: 20.into(),
            flags: (vfio::IRQ_SET_DATA_EVENTFD | vfio::IRQ_SET_ACTION_TRIGGER).into(),
            index: 2.into(),
            start: 0.into(),
            count: 2.into(),
        };
        assert!(parse_request(cmd::DEVICE_SET_IRQS, s.as_bytes(), 2).is_ok());
        assert!(parse_request(cmd::DEVICE_SET_IRQS, s.as_bytes(), 0).is_ok());
        assert!(parse_request(cmd::DEVICE_SET_IRQS, s.as_bytes(), 1).is_err());
        let two_actions = IrqSet {
            flags: (vfio::IRQ_SET_DATA_NONE
                | vfio::IRQ_SET_ACTION_MASK
                | vfio::IRQ_SET_ACTION_TRIGGER)
                .into(),
            ..s
        };
        assert!(parse_request(cmd::DEVICE_SET_IRQS, two_actions.as_bytes(), 0).is_err());
        let wrap = IrqSet {
            start: u32::MAX.into(),
            ..s
        };
        assert!(parse_request(cmd::DEVICE_SET_IRQS, wrap.as_bytes(), 2).is_err());
    }

    #[test]
    fn unknown_commands_and_fds_where_none_belong() {
        assert_eq!(
            parse_request(99, &[], 0),
            Err(ProtocolError::Unsupported(99))
        );
        assert!(matches!(
            parse_request(cmd::DEVICE_RESET, &[], 1),
            Err(ProtocolError::FdCount { .. })
        ));
        assert_eq!(
            parse_request(cmd::DMA_READ, &[0; 64], 0),
            Err(ProtocolError::Unsupported(cmd::DMA_READ))
        );
    }
}
