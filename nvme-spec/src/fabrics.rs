//! NVMe over Fabrics wire formats (NVMe over Fabrics 1.1 / NVMe base 2.0 §6): the Fabrics
//! command capsule fields, Connect data, the discovery log page, and the well-known NQNs.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Opcode of every Fabrics command; the command type is in byte 4 (`FCTYPE`).
pub const OPCODE: u8 = 0x7f;

/// Fabrics command types (base 2.0 §6, Figure 544).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTHENTICATION_SEND: u8 = 0x05;
    pub const AUTHENTICATION_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// The discovery subsystem's NQN (base 2.0 §4.5).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Longest NQN in bytes (223, without the terminating NUL).
pub const NQN_MAX: usize = 223;

/// Controller ID asked for in Connect when any controller will do (dynamic model).
pub const CNTLID_DYNAMIC: u16 = 0xffff;

/// Property Get/Set size attribute (CDW10 bits 2:0): 0 = 4 bytes, 1 = 8 bytes.
pub const PROPERTY_SIZE_8: u32 = 1;

/// SGL descriptor identifiers an NVMe/TCP host uses (TCP transport 1.0 §3.3.2).
pub mod sgl_id {
    /// Data Block, subtype Offset: in-capsule data at an offset in the capsule.
    pub const INCAPSULE: u8 = 0x01;
    /// Transport SGL Data Block, transport-specific subtype 0Ah: data moved by C2HData /
    /// R2T + H2CData PDUs.
    pub const TRANSPORT: u8 = 0x5a;
    /// Keyed SGL Data Block, subtype Address (NVMe/RDMA 1.0 §3.3): the host's buffer as a
    /// remote address and key, read or written by the target with RDMA.
    pub const KEYED: u8 = 0x40;
    /// Keyed SGL Data Block, subtype Invalidate Key: as [`KEYED`], the key to be
    /// invalidated with the response.
    pub const KEYED_INVALIDATE: u8 = 0x4f;
}

/// PSDT value (Submission flags bits 7:6) for SGLs.
pub const PSDT_SGL: u8 = 0x40;

/// Connect command data (base 2.0 §6.3, Figure 550), 1024 bytes.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: U16,
    pub rsvd18: [u8; 238],
    pub subnqn: [u8; 256],
    pub hostnqn: [u8; 256],
    pub rsvd768: [u8; 256],
}

/// Connect-specific status codes (SCT 1h; base 2.0 §6.3, Figure 552).
pub mod connect_status {
    pub const INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONTROLLER_BUSY: u8 = 0x81;
    pub const INVALID_PARAMETERS: u8 = 0x82;
    pub const RESTART_DISCOVERY: u8 = 0x83;
    pub const INVALID_HOST: u8 = 0x84;
}

/// Discovery log page (Log Identifier 70h) header (base 2.0 §5.16.1.23, Figure 292);
/// entries follow at byte 1024.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DiscoveryLogHeader {
    pub genctr: U64,
    pub numrec: U64,
    pub recfmt: U16,
    pub rsvd18: [u8; 1006],
}

/// One discovery log page entry (Figure 293), 1024 bytes.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DiscoveryLogEntry {
    /// Transport type: 3 = TCP.
    pub trtype: u8,
    /// Address family: 1 = IPv4, 2 = IPv6.
    pub adrfam: u8,
    /// Subsystem type: 2 = NVM subsystem, 3 = current discovery subsystem.
    pub subtype: u8,
    pub treq: u8,
    pub portid: U16,
    pub cntlid: U16,
    pub asqsz: U16,
    pub eflags: U16,
    pub rsvd12: [u8; 20],
    /// Transport service identifier (the port, as text), space padded.
    pub trsvcid: [u8; 32],
    pub rsvd64: [u8; 192],
    pub subnqn: [u8; 256],
    /// Transport address, space padded.
    pub traddr: [u8; 256],
    pub tsas: [u8; 256],
}

zeroed_default!(ConnectData, DiscoveryLogHeader, DiscoveryLogEntry);

/// Discovery log entry constants.
pub mod discovery {
    pub const LOG_ID: u8 = 0x70;
    pub const TRTYPE_RDMA: u8 = 1;
    pub const TRTYPE_TCP: u8 = 3;
    /// TSAS for RDMA (NVMe/RDMA 1.0 §4.1): queue pair type 1 (reliable connected)…
    pub const RDMA_QPTYPE_CONNECTED: u8 = 1;
    /// …provider type 1 (not specified)…
    pub const RDMA_PRTYPE_NOT_SPECIFIED: u8 = 1;
    /// …connection management service 1 (RDMA CM).
    pub const RDMA_CMS_RDMA_CM: u8 = 1;
    pub const ADRFAM_IPV4: u8 = 1;
    pub const ADRFAM_IPV6: u8 = 2;
    pub const SUBTYPE_NVME: u8 = 2;
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
    /// TREQ: secure channel not required.
    pub const TREQ_NOT_REQUIRED: u8 = 0x02;
}

/// Offsets in Identify Controller's NVMe over Fabrics area (bytes 1792..2047, Figure 275).
pub mod identify_fabrics {
    /// I/O Queue Command Capsule Supported Size, in 16-byte units (u32).
    pub const IOCCSZ: usize = 1792;
    /// I/O Queue Response Capsule Supported Size, in 16-byte units (u32).
    pub const IORCSZ: usize = 1796;
    /// In Capsule Data Offset, in 16-byte units (u16).
    pub const ICDOFF: usize = 1800;
    /// Controller attributes (u8): bit 0 = static controller model.
    pub const FCATT: usize = 1802;
    /// Maximum SGL data block descriptors (u8).
    pub const MSDBD: usize = 1803;
}

/// Copy `s` into a fixed NUL-padded field (NQNs in Connect data).
pub fn put_str(field: &mut [u8], s: &str) {
    field.fill(0);
    let n = s.len().min(field.len() - 1);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Copy `s` into a fixed space-padded field (discovery log text fields).
pub fn put_str_spaced(field: &mut [u8], s: &str) {
    field.fill(b' ');
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Text of a NUL- or space-padded field, if it is UTF-8.
pub fn get_str(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).ok().map(str::trim_end)
}

const _: () = assert!(size_of::<ConnectData>() == 1024);
const _: () = assert!(size_of::<DiscoveryLogHeader>() == 1024);
const _: () = assert!(size_of::<DiscoveryLogEntry>() == 1024);
const _: () = assert!(core::mem::offset_of!(DiscoveryLogEntry, trsvcid) == 32);
const _: () = assert!(core::mem::offset_of!(DiscoveryLogEntry, subnqn) == 256);
const _: () = assert!(core::mem::offset_of!(DiscoveryLogEntry, traddr) == 512);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_strings_round_trip() {
        let mut f = [0xffu8; 32];
        put_str(&mut f, "nqn.x");
        assert_eq!(get_str(&f), Some("nqn.x"));
        put_str_spaced(&mut f, "4420");
        assert_eq!(get_str(&f), Some("4420"));
        assert_eq!(get_str(&[0xff, 0xfe]), None);
    }
}
