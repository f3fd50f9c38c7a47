//! Completion status codes (NVMe base 2.0 §4.6.1.2).

/// A completion status: status code type, status code and Do Not Retry, as carried in
/// bits 15:1 of CQE dword 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status(u16);

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(0);
    // Generic command status (§4.6.1.2.1), all with DNR set where a retry cannot help.
    pub const INVALID_OPCODE: Status = Status::dnr(sct::GENERIC, 0x01);
    pub const INVALID_FIELD: Status = Status::dnr(sct::GENERIC, 0x02);
    pub const CID_CONFLICT: Status = Status::dnr(sct::GENERIC, 0x03);
    pub const DATA_TRANSFER_ERROR: Status = Status::new(sct::GENERIC, 0x04);
    pub const INTERNAL_ERROR: Status = Status::new(sct::GENERIC, 0x06);
    pub const ABORT_REQUESTED: Status = Status::new(sct::GENERIC, 0x07);
    pub const ABORTED_SQ_DELETION: Status = Status::new(sct::GENERIC, 0x08);
    pub const ABORTED_MISSING_FUSED: Status = Status::dnr(sct::GENERIC, 0x0a);
    pub const INVALID_NAMESPACE: Status = Status::dnr(sct::GENERIC, 0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::dnr(sct::GENERIC, 0x0c);
    pub const INVALID_SGL_SEGMENT: Status = Status::dnr(sct::GENERIC, 0x0d);
    pub const INVALID_SGL_COUNT: Status = Status::dnr(sct::GENERIC, 0x0e);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::dnr(sct::GENERIC, 0x0f);
    pub const INVALID_SGL_TYPE: Status = Status::dnr(sct::GENERIC, 0x11);
    pub const PRP_OFFSET_INVALID: Status = Status::dnr(sct::GENERIC, 0x13);
    pub const SGL_OFFSET_INVALID: Status = Status::dnr(sct::GENERIC, 0x16);
    pub const LBA_OUT_OF_RANGE: Status = Status::dnr(sct::GENERIC, 0x80);
    pub const CAPACITY_EXCEEDED: Status = Status::dnr(sct::GENERIC, 0x81);
    pub const NAMESPACE_NOT_READY: Status = Status::new(sct::GENERIC, 0x82);
    // Command specific status (§4.6.1.2.2).
    pub const INVALID_CQ: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x00);
    pub const INVALID_QID: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x02);
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x03);
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x05);
    pub const INVALID_FIRMWARE_SLOT: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x06);
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x08);
    pub const INVALID_LOG_PAGE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x09);
    pub const INVALID_FORMAT: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x0a);
    pub const INVALID_QUEUE_DELETION: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x0c);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x0d);
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x0e);
    pub const CONFLICTING_ATTRIBUTES: Status = Status::dnr(sct::COMMAND_SPECIFIC, 0x80);
    // Media and data integrity errors (§4.6.1.2.3).
    pub const WRITE_FAULT: Status = Status::new(sct::MEDIA, 0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(sct::MEDIA, 0x81);
    pub const COMPARE_FAILURE: Status = Status::dnr(sct::MEDIA, 0x85);
    /// Path related: the host aborted the command (e.g. it reset the controller).
    pub const HOST_ABORTED: Status = Status::new(sct::PATH, 0x71);
    /// Internal Path Error (§4.6.1.2.4): the path to the media failed; retryable (a host
    /// retries it, on another path if it has one).
    pub const INTERNAL_PATH_ERROR: Status = Status::new(sct::PATH, 0x00);
    /// Host Pathing Error (3/70h): the host lost its path to the controller (an NVMe-oF
    /// initiator past its controller loss timeout).
    pub const HOST_PATHING_ERROR: Status = Status::new(sct::PATH, 0x70);
    /// Transient Transport Error (0/22h): the transport failed; a retry may succeed.
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::new(sct::GENERIC, 0x22);

    /// A status without Do Not Retry.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Status(((sct as u16 & 0x7) << 8) | sc as u16)
    }
    /// A status with Do Not Retry set.
    pub const fn dnr(sct: u8, sc: u8) -> Self {
        Status(Self::new(sct, sc).0 | 1 << 14)
    }
    /// The status field as carried in CQE dword 3 bits 31:17 (shifted left by one above the phase tag).
    pub const fn cqe_bits(self) -> u16 {
        self.0 << 1
    }
    /// Decode from CQE status (phase bit included, ignored).
    pub const fn from_cqe_bits(v: u16) -> Self {
        Status(v >> 1)
    }
    /// Status code type.
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }
    /// Status code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }
    /// Do Not Retry.
    pub const fn is_dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// True for successful completion.
    pub const fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }
    /// Raw 15-bit value.
    pub const fn raw(self) -> u16 {
        self.0
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "sct={:#x} sc={:#04x}{}",
            self.sct(),
            self.sc(),
            if self.is_dnr() { " dnr" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_cqe_bits() {
        let s = Status::INVALID_QID;
        assert_eq!(Status::from_cqe_bits(s.cqe_bits() | 1), s);
        assert_eq!(s.sct(), sct::COMMAND_SPECIFIC);
        assert_eq!(s.sc(), 1);
        assert!(s.is_dnr());
        assert!(Status::SUCCESS.is_success());
    }
}
