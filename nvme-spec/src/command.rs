//! Submission and completion queue entries (NVMe base 2.0 §4.2, §4.6).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A 64-byte submission queue entry, common command format (§4.2).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Submission {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation (bits 1:0) and PRP-or-SGL selector PSDT (bits 7:6).
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Namespace identifier.
    pub nsid: U32,
    /// Command dword 2.
    pub cdw2: U32,
    /// Command dword 3.
    pub cdw3: U32,
    /// Metadata pointer.
    pub mptr: U64,
    /// Data pointer: PRP entry 1, or the first 8 bytes of SGL entry 1.
    pub prp1: U64,
    /// Data pointer: PRP entry 2, or the last 8 bytes of SGL entry 1.
    pub prp2: U64,
    /// Command dword 10.
    pub cdw10: U32,
    /// Command dword 11.
    pub cdw11: U32,
    /// Command dword 12.
    pub cdw12: U32,
    /// Command dword 13.
    pub cdw13: U32,
    /// Command dword 14.
    pub cdw14: U32,
    /// Command dword 15.
    pub cdw15: U32,
}

impl Submission {
    /// Fused operation field (0 = normal).
    pub fn fuse(&self) -> u8 {
        self.flags & 0b11
    }
    /// PRP or SGL for Data Transfer: 0 = PRPs, 1/2 = SGL.
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }
}

/// A 16-byte completion queue entry (§4.6).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: U32,
    /// Command specific dword 1.
    pub dw1: U32,
    /// SQ head pointer.
    pub sq_head: U16,
    /// SQ identifier.
    pub sq_id: U16,
    /// Command identifier.
    pub cid: U16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: U16,
}

/// An SGL descriptor (§4.3.2), 16 bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SglDescriptor {
    /// Address.
    pub addr: U64,
    /// Length in bytes.
    pub len: U32,
    /// Reserved / type specific.
    pub rsvd: [u8; 3],
    /// Descriptor type (bits 7:4) and sub type (bits 3:0).
    pub id: u8,
}

/// SGL descriptor types (§4.3.2, Figure 114).
pub mod sgl_type {
    /// SGL Data Block.
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment.
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment.
    pub const LAST_SEGMENT: u8 = 0x3;
}

const _: () = assert!(size_of::<Submission>() == 64);
const _: () = assert!(size_of::<Completion>() == 16);
const _: () = assert!(size_of::<SglDescriptor>() == 16);
