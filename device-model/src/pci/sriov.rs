//! The PF's Single Root I/O Virtualization extended capability (PCIe base 4.0 §9.3.3) at
//! 0x100: TotalVFs, NumVFs, VF offset and stride, VF device ID, VF BAR0/BAR4 (sized like the
//! PF's). Setting VF Enable with NumVFs = N brings VFs 1..=N online (each is served on its
//! own vfio-user socket from start; see `vnvme::daemon`), clearing it takes them offline.

use super::{BAR0_SIZE, BAR4_SIZE};

/// Offset of the capability in configuration space (the first extended capability).
pub(crate) const SRIOV_CAP: usize = 0x100;
/// Registers, relative to [`SRIOV_CAP`].
pub(crate) const CTRL: usize = 0x08;
pub(crate) const NUM_VFS: usize = 0x10;
const VF_BAR0: usize = 0x24;
/// SR-IOV Control: VF Enable, VF MSE, ARI Capable Hierarchy.
pub(crate) const CTRL_VF_ENABLE: u16 = 1 << 0;
const CTRL_WRITABLE: u16 = (1 << 0) | (1 << 3) | (1 << 4);

/// The SR-IOV shape of a PF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SriovShape {
    /// TotalVFs (and InitialVFs).
    pub total_vfs: u16,
    /// Device ID of the VFs.
    pub vf_device: u16,
}

/// What a write to the capability changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfChange {
    /// VFs `1..=n` enabled (0: all disabled).
    Enabled(u16),
}

/// Lay the capability out in `data` and mark its writable bits in `writable`.
pub(crate) fn install(data: &mut [u8], writable: &mut [u8], shape: SriovShape) {
    let put16 = |d: &mut [u8], off: usize, v: u16| {
        d[SRIOV_CAP + off..SRIOV_CAP + off + 2].copy_from_slice(&v.to_le_bytes());
    };
    let put32 = |d: &mut [u8], off: usize, v: u32| {
        d[SRIOV_CAP + off..SRIOV_CAP + off + 4].copy_from_slice(&v.to_le_bytes());
    };
    put32(data, 0x00, 0x0010 | (1 << 16)); // ID 0010h, version 1, last capability
    put32(data, 0x04, 0); // no VF migration
    put16(data, 0x0c, shape.total_vfs); // InitialVFs
    put16(data, 0x0e, shape.total_vfs); // TotalVFs
    put16(data, 0x14, 1); // First VF Offset
    put16(data, 0x16, 1); // VF Stride
    put16(data, 0x1a, shape.vf_device);
    put32(data, 0x1c, 0x1); // supported page sizes: 4K (the VF BARs are sized for it)
    put32(data, 0x20, 1); // system page size 4K
    put32(data, VF_BAR0, 0b100); // VF BAR0: memory, 64-bit
    put32(data, VF_BAR0 + 16, 0); // VF BAR4: memory, 32-bit
    put16(writable, CTRL, CTRL_WRITABLE);
    put16(writable, NUM_VFS, 0xffff);
    put32(writable, 0x20, 0xffff_ffff);
}

/// The size mask of VF BAR `idx` (0..6), as read back after an all-ones write.
pub(crate) fn vf_bar_mask(idx: usize) -> Option<u32> {
    match idx {
        0 => Some(!(BAR0_SIZE as u32 - 1) & !0xf),
        1 => Some(0xffff_ffff), // upper half of the 64-bit BAR0: 16 KiB needs no high bits
        4 => Some(!(BAR4_SIZE as u32 - 1) & !0xf),
        _ => None,
    }
}

/// Offset range of the VF BARs in configuration space.
pub(crate) fn vf_bar_range() -> std::ops::Range<usize> {
    SRIOV_CAP + VF_BAR0..SRIOV_CAP + VF_BAR0 + 24
}
