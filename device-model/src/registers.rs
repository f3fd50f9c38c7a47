//! The BAR0 register file below the doorbells (NVMe base 2.0 §3.1.4): CC, CSTS, AQA, ASQ,
//! ACQ and the interrupt masks as typed values, their byte-wise read image, and what a
//! write asks of the controller. CAP and VS are the controller's (they follow from its
//! configuration). Nothing here acts: the controller applies a [`RegisterWrite`].

use nvme_spec::registers::{self as reg, cc, csts};

/// Controller Configuration (§3.1.4.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cc(pub u32);

impl Cc {
    /// CC.EN.
    pub fn enabled(self) -> bool {
        self.0 & cc::EN != 0
    }
    /// I/O Command Set Selected (CSS).
    pub fn command_set(self) -> u32 {
        (self.0 >> cc::CSS_SHIFT) & 7
    }
    /// Memory Page Size as the MPS field (page size 2^(12 + MPS)).
    pub fn mps(self) -> u32 {
        (self.0 >> cc::MPS_SHIFT) & 0xf
    }
    /// Shutdown Notification (SHN): 00b none, 01b normal, 10b abrupt.
    pub fn shutdown_notification(self) -> u32 {
        (self.0 >> cc::SHN_SHIFT) & 3
    }
    /// The same value with EN cleared.
    #[must_use]
    pub fn disabled(self) -> Self {
        Self(self.0 & !cc::EN)
    }
}

/// Shutdown Status (CSTS.SHST).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownStatus {
    Normal,
    Occurring,
    Complete,
}

/// Controller Status (§3.1.4.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Csts(pub u32);

impl Csts {
    /// CSTS.RDY.
    pub fn ready(self) -> bool {
        self.0 & csts::RDY != 0
    }
    /// CSTS.CFS: Controller Fatal Status.
    pub fn fatal(self) -> bool {
        self.0 & csts::CFS != 0
    }
    /// Set or clear RDY.
    pub fn set_ready(&mut self, on: bool) {
        self.0 = (self.0 & !csts::RDY) | if on { csts::RDY } else { 0 };
    }
    /// Set or clear CFS.
    pub fn set_fatal(&mut self, on: bool) {
        self.0 = (self.0 & !csts::CFS) | if on { csts::CFS } else { 0 };
    }
    /// Set SHST.
    pub fn set_shutdown(&mut self, s: ShutdownStatus) {
        let bits = match s {
            ShutdownStatus::Normal => 0,
            ShutdownStatus::Occurring => csts::SHST_OCCURRING,
            ShutdownStatus::Complete => csts::SHST_COMPLETE,
        };
        self.0 = (self.0 & !(3 << csts::SHST_SHIFT)) | bits;
    }
}

/// Admin Queue Attributes (§3.1.4.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Aqa(pub u32);

impl Aqa {
    /// Admin Submission Queue size in entries (ASQS + 1).
    pub fn sq_entries(self) -> u32 {
        (self.0 & 0xfff) + 1
    }
    /// Admin Completion Queue size in entries (ACQS + 1).
    pub fn cq_entries(self) -> u32 {
        ((self.0 >> 16) & 0xfff) + 1
    }
}

/// What a register write asks of the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterWrite {
    /// Nothing beyond the stored value.
    Stored,
    /// CC changed from `old` to the value now stored.
    Cc { old: Cc },
    /// NVM Subsystem Reset requested (NSSR).
    SubsystemReset,
    /// A read-only, reserved or misaligned register: ignored.
    Ignored,
}

/// The host-writable registers and CSTS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub cc: Cc,
    pub csts: Csts,
    pub aqa: Aqa,
    /// Admin queue base addresses (4 KiB aligned: bits 11:0 are reserved).
    pub asq: u64,
    pub acq: u64,
    /// Interrupt mask (INTMS/INTMC; pin-based interrupts only).
    pub intms: u32,
}

impl Registers {
    /// `len` bytes at `offset` of the register image, CAP (`cap`) and VS included;
    /// unknown offsets read as zero.
    pub fn read(&self, cap: u64, offset: u64, len: usize) -> u64 {
        let image: [(u64, u64, usize); 9] = [
            (reg::CAP, cap, 8),
            (reg::VS, u64::from(reg::version(1, 4, 0)), 4),
            (reg::INTMS, u64::from(self.intms), 4),
            (reg::INTMC, u64::from(self.intms), 4),
            (reg::CC, u64::from(self.cc.0), 4),
            (reg::CSTS, u64::from(self.csts.0), 4),
            (reg::AQA, u64::from(self.aqa.0), 4),
            (reg::ASQ, self.asq, 8),
            (reg::ACQ, self.acq, 8),
        ];
        let mut out = 0u64;
        for i in 0..len.min(8) {
            let byte_off = offset + i as u64;
            for &(base, val, size) in &image {
                if byte_off >= base && byte_off < base + size as u64 {
                    out |= ((val >> (8 * (byte_off - base))) & 0xff) << (8 * i);
                }
            }
        }
        out
    }

    /// Store a write of `len` bytes (4, or 8 for ASQ/ACQ) and say what it asks for.
    pub fn write(&mut self, offset: u64, value: u64, len: usize) -> RegisterWrite {
        let low = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_f000);
        let high = |old: u64| (old & 0xffff_ffff) | (value << 32);
        match (offset, len) {
            (reg::ASQ, 8) => self.asq = value & !0xfff,
            (reg::ACQ, 8) => self.acq = value & !0xfff,
            (reg::INTMS, 4) => self.intms |= value as u32,
            (reg::INTMC, 4) => self.intms &= !(value as u32),
            (reg::CC, 4) => {
                let old = self.cc;
                self.cc = Cc(value as u32);
                return RegisterWrite::Cc { old };
            }
            (reg::AQA, 4) => self.aqa = Aqa(value as u32 & 0x0fff_0fff),
            (reg::ASQ, 4) => self.asq = low(self.asq),
            (o, 4) if o == reg::ASQ + 4 => self.asq = high(self.asq),
            (reg::ACQ, 4) => self.acq = low(self.acq),
            (o, 4) if o == reg::ACQ + 4 => self.acq = high(self.acq),
            (reg::NSSR, 4) => return RegisterWrite::SubsystemReset,
            _ => return RegisterWrite::Ignored,
        }
        RegisterWrite::Stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_as_the_spec_lays_them_out() {
        let mut r = Registers::default();
        assert_eq!(
            r.write(reg::CC, 0x0046_4001, 4),
            RegisterWrite::Cc { old: Cc(0) }
        );
        assert!(r.cc.enabled());
        assert_eq!(
            (r.cc.command_set(), r.cc.mps(), r.cc.shutdown_notification()),
            (0, 0, 1)
        );
        r.write(reg::AQA, 0xffff_ffff, 4);
        assert_eq!((r.aqa.sq_entries(), r.aqa.cq_entries()), (4096, 4096));
        r.write(reg::ASQ, 0x1234_5678, 4);
        r.write(reg::ASQ + 4, 0x9, 4);
        assert_eq!(r.asq, 0x9_1234_5000, "bits 11:0 reserved");
        r.write(reg::ACQ, 0xabcd_e123, 8);
        assert_eq!(r.read(0, reg::ACQ, 8), 0xabcd_e000);
        r.csts.set_ready(true);
        r.csts.set_shutdown(ShutdownStatus::Complete);
        assert_eq!(r.read(0, reg::CSTS, 4), 0b1001);
        r.csts.set_fatal(true);
        assert!(r.csts.fatal() && r.csts.ready());
        assert_eq!(r.read(7 << 32, reg::CAP + 4, 4), 7, "CAP's upper half");
        assert_eq!(
            r.write(reg::NSSR, 0x4e56_4d65, 4),
            RegisterWrite::SubsystemReset
        );
        assert_eq!(r.write(0x40, 1, 4), RegisterWrite::Ignored);
    }
}
