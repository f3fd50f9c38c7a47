//! Controller registers in BAR0 (NVMe base 2.0 §3.1.4).

/// Controller Capabilities (64-bit).
pub const CAP: u64 = 0x00;
/// Version.
pub const VS: u64 = 0x08;
/// Interrupt Mask Set.
pub const INTMS: u64 = 0x0c;
/// Interrupt Mask Clear.
pub const INTMC: u64 = 0x10;
/// Controller Configuration.
pub const CC: u64 = 0x14;
/// Controller Status.
pub const CSTS: u64 = 0x1c;
/// NVM Subsystem Reset.
pub const NSSR: u64 = 0x20;
/// Admin Queue Attributes.
pub const AQA: u64 = 0x24;
/// Admin Submission Queue Base Address (64-bit).
pub const ASQ: u64 = 0x28;
/// Admin Completion Queue Base Address (64-bit).
pub const ACQ: u64 = 0x30;
/// Controller Memory Buffer Location.
pub const CMBLOC: u64 = 0x38;
/// Controller Memory Buffer Size.
pub const CMBSZ: u64 = 0x3c;
/// Controller Memory Buffer Memory Space Control (NVMe base 2.0 §3.1.4.21); bit 0 CRE
/// makes CMBLOC and CMBSZ readable on controllers with CAP.CMBS.
pub const CMBMSC: u64 = 0x50;
/// CAP.CMBS: the controller supports CMBMSC (bit 57).
pub const CAP_CMBS: u64 = 1 << 57;
/// First doorbell register (SQ 0 tail); doorbell stride is `4 << CAP.DSTRD`.
pub const DOORBELL_BASE: u64 = 0x1000;

/// CAP fields (§3.1.4.1).
pub mod cap {
    /// Maximum Queue Entries Supported (0's based), bits 15:0.
    pub const fn mqes(v: u16) -> u64 {
        v as u64
    }
    /// Contiguous Queues Required, bit 16.
    pub const CQR: u64 = 1 << 16;
    /// Arbitration Mechanism Supported: weighted round robin (bit 17), vendor (bit 18).
    pub const AMS_SHIFT: u32 = 17;
    /// Timeout in 500 ms units, bits 31:24.
    pub const fn to(units_500ms: u8) -> u64 {
        (units_500ms as u64) << 24
    }
    /// Doorbell Stride, bits 35:32 (stride = 2^(2+DSTRD)).
    pub const DSTRD_SHIFT: u32 = 32;
    /// NVM Subsystem Reset Supported, bit 36.
    pub const NSSRS: u64 = 1 << 36;
    /// Command Sets Supported: NVM command set, bit 37.
    pub const CSS_NVM: u64 = 1 << 37;
    /// Command Sets Supported: one or more I/O command sets (CC.CSS = 110b allowed), bit 43.
    pub const CSS_IOCS: u64 = 1 << 43;
    /// Memory Page Size Minimum (2^(12+n)), bits 51:48.
    pub const MPSMIN_SHIFT: u32 = 48;
    /// Memory Page Size Maximum (2^(12+n)), bits 55:52.
    pub const MPSMAX_SHIFT: u32 = 52;
}

/// CC fields (§3.1.4.5).
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Command Set Selected, bits 6:4.
    pub const CSS_SHIFT: u32 = 4;
    /// Memory Page Size (2^(12+n)), bits 10:7.
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected, bits 13:11.
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification, bits 15:14 (01b normal, 10b abrupt).
    pub const SHN_SHIFT: u32 = 14;
    /// I/O Submission Queue Entry Size (2^n), bits 19:16.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size (2^n), bits 23:20.
    pub const IOCQES_SHIFT: u32 = 20;
}

/// CSTS fields (§3.1.4.6).
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status, bits 3:2: 00b normal, 01b occurring, 10b complete.
    pub const SHST_SHIFT: u32 = 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 0b10 << SHST_SHIFT;
    /// Shutdown processing occurring.
    pub const SHST_OCCURRING: u32 = 0b01 << SHST_SHIFT;
    /// NVM Subsystem Reset Occurred.
    pub const NSSRO: u32 = 1 << 4;
    /// Processing Paused.
    pub const PP: u32 = 1 << 5;
}

/// Version register value for a major.minor.tertiary version.
pub const fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
    ((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32
}
