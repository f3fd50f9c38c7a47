//! NVMe/TCP transport PDUs (NVMe over TCP transport specification 1.0, §3.6): the common
//! header, the fixed PDU-specific headers and their constants.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// PDU types (§3.6.1).
pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common header flags (§3.6.2).
pub mod flags {
    /// A header digest follows the PDU header.
    pub const HDGSTF: u8 = 1 << 0;
    /// A data digest follows the PDU data.
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of a transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData: the command completed successfully; no CapsuleResp follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// Fatal Error Status of a termination request (§3.6.2.4).
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const R2T_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Header lengths (HLEN) of each PDU type.
pub mod hlen {
    pub const IC: u8 = 128;
    pub const TERM_REQ: u8 = 24;
    pub const CAPSULE_CMD: u8 = 72;
    pub const CAPSULE_RESP: u8 = 24;
    pub const DATA: u8 = 24;
    pub const R2T: u8 = 24;
}

/// Digest length (CRC32C), header or data.
pub const DIGEST_LEN: usize = 4;
/// Most bytes of the offending PDU header a termination request carries (its PLEN is at
/// most 152: the 24-byte header and 128 bytes).
pub const TERM_REQ_MAX_DATA: usize = 128;
/// ICReq/ICResp digest bits.
pub const DGST_HEADER: u8 = 1 << 0;
pub const DGST_DATA: u8 = 1 << 1;

/// The 8-byte common header of every PDU.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    /// Header length (without header digest).
    pub hlen: u8,
    /// PDU data offset: where the data starts, 0 when there is none.
    pub pdo: u8,
    /// PDU length: header, digests, padding and data.
    pub plen: U32,
}

/// ICReq (host to controller) and ICResp share one layout after the common header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct InitConnection {
    pub ch: CommonHeader,
    /// PDU format version, 0.
    pub pfv: U16,
    /// ICReq: host PDU data alignment (HPDA); ICResp: controller PDU data alignment
    /// (CPDA), in dwords minus one.
    pub pda: u8,
    /// Digests requested (ICReq) or enabled (ICResp).
    pub dgst: u8,
    /// ICReq: most outstanding R2Ts per command, 0's based; ICResp: MAXH2CDATA in bytes.
    pub maxr2t_or_maxh2cdata: U32,
    pub reserved: [u8; 112],
}

/// H2CTermReq and C2HTermReq header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TermReq {
    pub ch: CommonHeader,
    /// Fatal error status.
    pub fes: U16,
    /// Fatal error information: the offset of the offending field, or the value.
    pub fei: U32,
    pub reserved: [u8; 10],
}

/// H2CData, C2HData and R2T headers: the command, the transfer tag and a data window.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DataHeader {
    pub ch: CommonHeader,
    /// Command capsule CID.
    pub cccid: U16,
    /// Transfer tag (H2CData, R2T); reserved in C2HData.
    pub ttag: U16,
    /// Offset of this data in the command's data.
    pub offset: U32,
    /// Length of this data.
    pub length: U32,
    pub reserved: [u8; 4],
}

const _: () = assert!(size_of::<CommonHeader>() == 8);
const _: () = assert!(size_of::<InitConnection>() == hlen::IC as usize);
const _: () = assert!(size_of::<TermReq>() == hlen::TERM_REQ as usize);
const _: () = assert!(size_of::<DataHeader>() == hlen::DATA as usize);
