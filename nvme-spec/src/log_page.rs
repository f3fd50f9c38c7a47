//! Log pages (NVMe base 2.0 §5.16.1).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Log page identifiers.
pub mod lid {
    pub const ERROR_INFORMATION: u8 = 0x01;
    pub const SMART_HEALTH: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const COMMANDS_EFFECTS: u8 = 0x05;
    pub const DEVICE_SELF_TEST: u8 = 0x06;
    /// LBA Status Information (NVMe base 2.0, Get Log Page, LBA Status Information).
    pub const LBA_STATUS_INFO: u8 = 0x0e;
    pub const DISCOVERY: u8 = 0x70;
}

/// Error Information log entry (§5.16.1.2, Figure 205), 64 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ErrorLogEntry {
    pub error_count: U64,
    pub sqid: U16,
    pub cid: U16,
    /// Status field (bits 15:1) and phase tag (bit 0).
    pub status: U16,
    pub param_error_location: U16,
    pub lba: U64,
    pub nsid: U32,
    pub vs: u8,
    pub trtype: u8,
    pub rsvd30: [u8; 2],
    pub cs: U64,
    pub trtype_specific: U16,
    pub rsvd42: [u8; 22],
}

/// SMART / Health Information log page (§5.16.1.3, Figure 207), 512 bytes. The 128-bit
/// counters are little-endian byte arrays.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature in kelvin (unaligned in the layout: two bytes at offset 1).
    pub temperature: [u8; 2],
    pub avail_spare: u8,
    pub spare_thresh: u8,
    pub percent_used: u8,
    pub endu_grp_crit_warn: u8,
    pub rsvd7: [u8; 25],
    pub data_units_read: [u8; 16],
    pub data_units_written: [u8; 16],
    pub host_read_commands: [u8; 16],
    pub host_write_commands: [u8; 16],
    pub ctrl_busy_time: [u8; 16],
    pub power_cycles: [u8; 16],
    pub power_on_hours: [u8; 16],
    pub unsafe_shutdowns: [u8; 16],
    pub media_errors: [u8; 16],
    pub num_err_log_entries: [u8; 16],
    pub warning_temp_time: U32,
    pub critical_comp_time: U32,
    pub temp_sensor: [U16; 8],
    pub rsvd216: [u8; 296],
}

/// Firmware Slot Information log page (§5.16.1.4, Figure 209), 512 bytes.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FirmwareSlotLog {
    /// Active Firmware Info.
    pub afi: u8,
    pub rsvd1: [u8; 7],
    /// Firmware revision for slots 1..7.
    pub frs: [[u8; 8]; 7],
    pub rsvd64: [u8; 448],
}

/// Commands Supported and Effects log page (§5.16.1.6, Figure 211), 4096 bytes.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CommandsEffectsLog {
    pub acs: [U32; 256],
    pub iocs: [U32; 256],
    pub rsvd2048: [u8; 2048],
}

/// Commands Supported and Effects entry bits.
pub mod effects {
    /// Command Supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical Block Content Change.
    pub const LBCC: u32 = 1 << 1;
    /// Namespace Capability Change.
    pub const NCC: u32 = 1 << 2;
    /// Namespace Inventory Change.
    pub const NIC: u32 = 1 << 3;
    /// Controller Capability Change.
    pub const CCC: u32 = 1 << 4;
}

zeroed_default!(SmartLog, FirmwareSlotLog, CommandsEffectsLog);

const _: () = assert!(size_of::<ErrorLogEntry>() == 64);
const _: () = assert!(size_of::<SmartLog>() == 512);
const _: () = assert!(core::mem::offset_of!(SmartLog, data_units_read) == 32);
const _: () = assert!(core::mem::offset_of!(SmartLog, temp_sensor) == 200);
const _: () = assert!(size_of::<FirmwareSlotLog>() == 512);
const _: () = assert!(size_of::<CommandsEffectsLog>() == 4096);
