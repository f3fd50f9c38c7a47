//! PCI configuration space of an NVMe controller (PCI Local Bus 3.0, PCIe base 4.0 §7):
//! class 01:08:02, BAR0 64-bit registers, BAR4 MSI-X, and capabilities PM -> MSI-X -> PCIe
//! (with Function Level Reset).

use super::{BAR0_SIZE, BAR4_SIZE, CONFIG_SIZE, MSIX_PBA_OFFSET, MSIX_VECTORS};

/// PCI identity. The default vendor id 0x5656 is not a PCI-SIG assignment of ours; the
/// guest's nvme driver binds by class code, so set real ids with the daemon's options when
/// that matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub revision: u8,
}

impl Default for PciIds {
    fn default() -> Self {
        Self {
            vendor: 0x5656,
            device: 0x0001,
            subsystem_vendor: 0x5656,
            subsystem: 0x0001,
            revision: 0,
        }
    }
}

const CAP_PM: usize = 0x40;
const CAP_MSIX: usize = 0x50;
const CAP_PCIE: usize = 0x60;

/// What a configuration write asks of the device beyond storing bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigWrite {
    /// Nothing further.
    Stored,
    /// Initiate Function Level Reset was written (PCIe DevCtl bit 15).
    FunctionLevelReset,
    /// The PF's VF Enable or NumVFs changed (SR-IOV capability).
    Vfs(super::VfChange),
}

/// Configuration space: contents plus a mask of guest-writable bits.
pub struct ConfigSpace {
    data: [u8; CONFIG_SIZE as usize],
    writable: [u8; CONFIG_SIZE as usize],
    bar_shadow: [u32; 6],
    /// SR-IOV: the VF BAR registers as written (sizing), when the capability is present.
    vf_bar_shadow: Option<[u32; 6]>,
    /// VFs enabled as last reported.
    vfs_enabled: u16,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("ids", &&self.data[..4])
            .finish()
    }
}

impl ConfigSpace {
    /// A fresh configuration space for an NVMe controller.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            data: [0; CONFIG_SIZE as usize],
            writable: [0; CONFIG_SIZE as usize],
            bar_shadow: [0; 6],
            vf_bar_shadow: None,
            vfs_enabled: 0,
        };
        c.put16(0x00, ids.vendor);
        c.put16(0x02, ids.device);
        c.put16(0x06, 1 << 4); // status: capabilities list
        c.data[0x08] = ids.revision;
        c.data[0x09] = 0x02; // prog-if: NVM Express
        c.data[0x0a] = 0x08; // subclass: non-volatile memory
        c.data[0x0b] = 0x01; // class: mass storage
        c.put32(0x10, 0b100); // BAR0: memory, 64-bit, non-prefetchable
        c.put32(0x20, 0); // BAR4: memory, 32-bit
        c.put16(0x2c, ids.subsystem_vendor);
        c.put16(0x2e, ids.subsystem);
        c.data[0x34] = CAP_PM as u8;
        c.data[0x3d] = 1; // interrupt pin INTA#
        c.mask16(0x04, 0x0547); // command: io, mem, bus master, parity, SERR, INTx disable
        c.writable[0x3c] = 0xff; // interrupt line

        // Power management (PCI PM 1.2): D0 only, no PME.
        c.data[CAP_PM] = 0x01;
        c.data[CAP_PM + 1] = CAP_MSIX as u8;
        c.put16(CAP_PM + 2, 0x0003);
        c.put16(CAP_PM + 4, 0x0008); // PMCSR: No_Soft_Reset
        c.mask16(CAP_PM + 4, 0x0003);

        // MSI-X: table in BAR4 at 0, PBA in BAR4 at MSIX_PBA_OFFSET.
        c.data[CAP_MSIX] = 0x11;
        c.data[CAP_MSIX + 1] = CAP_PCIE as u8;
        c.put16(CAP_MSIX + 2, MSIX_VECTORS - 1);
        c.mask16(CAP_MSIX + 2, 0xc000); // enable, function mask
        c.put32(CAP_MSIX + 4, 4);
        c.put32(CAP_MSIX + 8, MSIX_PBA_OFFSET as u32 | 4);

        // PCI Express capability v2, endpoint, FLR capable.
        c.data[CAP_PCIE] = 0x10;
        c.data[CAP_PCIE + 1] = 0;
        c.put16(CAP_PCIE + 2, 0x0002);
        c.put32(CAP_PCIE + 4, 1 << 28); // DevCap: FLR
        c.put16(CAP_PCIE + 8, 0x2810); // DevCtl: relaxed ordering, MPS 128, MRRS 512
        c.mask16(CAP_PCIE + 8, 0x7eff | 0x8000); // writable, incl. Initiate FLR
        c.put32(CAP_PCIE + 0x0c, 0x0000_0041); // LinkCap: 2.5 GT/s x4
        c.put16(CAP_PCIE + 0x12, 0x0041); // LinkSta
        c.put32(CAP_PCIE + 0x24, 1 << 4); // DevCap2: completion timeout disable
        c.mask16(CAP_PCIE + 0x28, 0x001f); // DevCtl2
        c
    }

    /// The configuration space of an SR-IOV PF: [`ConfigSpace::new`] plus the SR-IOV
    /// extended capability.
    pub fn with_sriov(ids: PciIds, shape: super::SriovShape) -> Self {
        let mut c = Self::new(ids);
        super::sriov::install(&mut c.data, &mut c.writable, shape);
        c.vf_bar_shadow = Some([0; 6]);
        c
    }

    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data[off], self.data[off + 1]])
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn mask16(&mut self, off: usize, m: u16) {
        self.writable[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }

    /// Read `buf.len()` bytes at `offset`; out-of-range bytes read as 0xff.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = match o {
                0x10..=0x27 => self.bar_byte(o),
                _ if self.vf_bar_shadow.is_some() && super::sriov::vf_bar_range().contains(&o) => {
                    self.vf_bar_byte(o)
                }
                _ => self.data.get(o).copied().unwrap_or(0xff),
            };
        }
    }

    fn bar_byte(&self, o: usize) -> u8 {
        let idx = (o - 0x10) / 4;
        (self.bar_value(idx) >> (8 * ((o - 0x10) % 4))) as u8
    }

    fn vf_bar_byte(&self, o: usize) -> u8 {
        let rel = o - super::sriov::vf_bar_range().start;
        let idx = rel / 4;
        let flags = u32::from_le_bytes(
            self.data[o - rel % 4..o - rel % 4 + 4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let shadow = self.vf_bar_shadow.map_or(0, |s| s[idx]);
        let v = super::sriov::vf_bar_mask(idx).map_or(0, |m| (shadow & m) | flags);
        (v >> (8 * (rel % 4))) as u8
    }

    /// BAR register value after sizing writes (all-ones) and address programming.
    fn bar_value(&self, idx: usize) -> u32 {
        let flags = u32::from_le_bytes(
            self.data[0x10 + idx * 4..0x14 + idx * 4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let size_mask: u64 = match idx {
            0 | 1 => !(BAR0_SIZE - 1),
            4 => !(BAR4_SIZE - 1) & 0xffff_ffff,
            _ => return 0,
        };
        let part = if idx == 1 {
            (size_mask >> 32) as u32
        } else {
            size_mask as u32 & !0xf
        };
        (self.bar_shadow[idx] & part) | flags
    }

    /// Write `data` at `offset`, honouring read-only bits. Returns what the write triggers.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> ConfigWrite {
        let mut flr = false;
        for (i, &b) in data.iter().enumerate() {
            let o = offset as usize + i;
            if o >= self.data.len() {
                break;
            }
            if let Some(shadow) = self.vf_bar_shadow.as_mut()
                && super::sriov::vf_bar_range().contains(&o)
            {
                let rel = o - super::sriov::vf_bar_range().start;
                let shift = 8 * (rel % 4);
                shadow[rel / 4] = (shadow[rel / 4] & !(0xff << shift)) | (u32::from(b) << shift);
                continue;
            }
            if (0x10..0x28).contains(&o) {
                let idx = (o - 0x10) / 4;
                let shift = 8 * ((o - 0x10) % 4);
                self.bar_shadow[idx] =
                    (self.bar_shadow[idx] & !(0xff << shift)) | (u32::from(b) << shift);
                continue;
            }
            let m = self.writable[o];
            self.data[o] = (self.data[o] & !m) | (b & m);
        }
        let devctl = CAP_PCIE + 8;
        if self.data[devctl + 1] & 0x80 != 0 {
            self.data[devctl + 1] &= !0x80; // Initiate FLR always reads as 0
            flr = true;
        }
        if flr {
            return ConfigWrite::FunctionLevelReset;
        }
        if self.vf_bar_shadow.is_some() {
            use super::sriov::{CTRL, CTRL_VF_ENABLE, NUM_VFS, SRIOV_CAP};
            let total = self.get16(SRIOV_CAP + 0x0e);
            let enabled = self.get16(SRIOV_CAP + CTRL) & CTRL_VF_ENABLE != 0;
            let n = if enabled {
                self.get16(SRIOV_CAP + NUM_VFS).min(total)
            } else {
                0
            };
            if n != self.vfs_enabled {
                self.vfs_enabled = n;
                return ConfigWrite::Vfs(super::VfChange::Enabled(n));
            }
        }
        ConfigWrite::Stored
    }

    /// Back to power-on state after FLR (command register, MSI-X control, device control).
    pub fn reset(&mut self) {
        self.put16(0x04, 0);
        let msix = u16::from_le_bytes([self.data[CAP_MSIX + 2], self.data[CAP_MSIX + 3]]) & 0x07ff;
        self.put16(CAP_MSIX + 2, msix);
        self.put16(CAP_PCIE + 8, 0x2810);
        self.bar_shadow = [0; 6];
        if let Some(s) = self.vf_bar_shadow.as_mut() {
            // FLR of the PF clears VF Enable and NumVFs (the VFs go away)
            *s = [0; 6];
            self.put16(super::sriov::SRIOV_CAP + super::sriov::CTRL, 0);
            self.put16(super::sriov::SRIOV_CAP + super::sriov::NUM_VFS, 0);
            self.vfs_enabled = 0;
        }
    }

    /// VFs enabled through the SR-IOV capability (0 when none or no capability).
    pub fn vfs_enabled(&self) -> u16 {
        self.vfs_enabled
    }

    /// True when the MSI-X enable bit is set.
    pub fn msix_enabled(&self) -> bool {
        self.data[CAP_MSIX + 3] & 0x80 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_class_and_capability_chain() {
        let c = ConfigSpace::new(PciIds::default());
        assert_eq!(rd32(&c, 0x08) >> 8, 0x010802);
        let mut ptr = c.data[0x34] as usize;
        let mut ids = vec![];
        while ptr != 0 {
            ids.push(c.data[ptr]);
            ptr = c.data[ptr + 1] as usize;
        }
        assert_eq!(ids, vec![0x01, 0x11, 0x10]);
        assert_eq!(rd32(&c, 0x50) >> 16 & 0x7ff, u32::from(MSIX_VECTORS - 1));
    }

    #[test]
    fn bar_sizing_and_read_only_bits() {
        let mut c = ConfigSpace::new(PciIds::default());
        c.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), (!(BAR0_SIZE as u32 - 1) & !0xf) | 0b100);
        c.write(0x00, &[0, 0, 0, 0]);
        assert_eq!(rd32(&c, 0x00), 0x0001_5656);
        c.write(0x08, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x08) >> 8, 0x010802);
        c.write(0x2000, &[1]); // past the end: ignored
    }

    #[test]
    fn sriov_capability_enables_vfs_and_sizes_vf_bars() {
        let shape = crate::pci::SriovShape {
            total_vfs: 127,
            vf_device: 0x1234,
        };
        let mut c = ConfigSpace::with_sriov(PciIds::default(), shape);
        let cap = rd32(&c, 0x100);
        assert_eq!((cap & 0xffff, (cap >> 16) & 0xf, cap >> 20), (0x10, 1, 0));
        assert_eq!(rd32(&c, 0x10c), 127 | (127 << 16), "InitialVFs, TotalVFs");
        assert_eq!(rd32(&c, 0x114), 1 | (1 << 16), "offset, stride");
        assert_eq!(rd32(&c, 0x118) >> 16, 0x1234, "VF device ID");
        // VF BAR sizing
        c.write(0x124, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x124), (!(BAR0_SIZE as u32 - 1) & !0xf) | 0b100);
        c.write(0x134, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x134), !(BAR4_SIZE as u32 - 1) & !0xf);
        // NumVFs alone does nothing; VF Enable reports it; more than TotalVFs is clamped
        assert_eq!(c.write(0x110, &3u16.to_le_bytes()), ConfigWrite::Stored);
        assert_eq!(
            c.write(0x108, &1u16.to_le_bytes()),
            ConfigWrite::Vfs(crate::pci::VfChange::Enabled(3))
        );
        assert_eq!(
            c.write(0x110, &500u16.to_le_bytes()),
            ConfigWrite::Vfs(crate::pci::VfChange::Enabled(127))
        );
        assert_eq!(
            c.write(0x108, &0u16.to_le_bytes()),
            ConfigWrite::Vfs(crate::pci::VfChange::Enabled(0))
        );
        // read-only: TotalVFs
        c.write(0x10e, &5u16.to_le_bytes());
        assert_eq!(rd32(&c, 0x10c) >> 16, 127);
        // a PF without the capability has no extended capability
        assert_eq!(rd32(&ConfigSpace::new(PciIds::default()), 0x100), 0);
    }

    #[test]
    fn flr_is_reported_and_self_clears() {
        let mut c = ConfigSpace::new(PciIds::default());
        assert_eq!(
            c.write(0x60 + 8, &[0x10, 0xa8]),
            ConfigWrite::FunctionLevelReset
        );
        assert_eq!(c.data[0x69] & 0x80, 0);
        assert_eq!(c.write(0x04, &[0x06, 0]), ConfigWrite::Stored);
    }
}
