//! How the controllers of one subsystem are numbered and reached: the primary (or only)
//! vfio-user controller, its VFs (secondary controllers), further controllers (one per
//! NVMe/TCP association), and the VFs' sockets beside the PF's.

use std::path::{Path, PathBuf};

/// CNTLIDs of VF (secondary) controllers: `0x1000 + subsystem * 128 + VF number`.
const SECONDARY_CNTLID_BASE: u16 = 0x1000;

/// Further controllers of a subsystem: steps of 0x100 from its first CNTLID.
const CNTLID_STEP: u16 = 0x100;

/// CNTLID of subsystem `index`'s first controller (its PF when it has VFs).
pub fn primary_cntlid(index: usize) -> u16 {
    index as u16 + 1
}

/// CNTLID of VF `vf` (1-based) of subsystem `index`.
pub fn vf_cntlid(index: usize, vf: usize) -> u16 {
    SECONDARY_CNTLID_BASE + (index as u16) * 128 + vf as u16
}

/// CNTLID of further controller `k` of subsystem `index` (its NVMe/TCP controllers): after
/// the first one when `first_taken` (a vfio-user controller has it).
pub fn further_cntlid(index: usize, first_taken: bool, k: usize) -> u16 {
    let step = k + usize::from(first_taken);
    primary_cntlid(index) + (step as u16) * CNTLID_STEP
}

/// Socket of VF `n` of the PF served on `pf`: `DIR/NAME.vfN.sock` for `DIR/NAME.sock`.
pub fn vf_socket(pf: &Path, n: usize) -> PathBuf {
    let stem = pf
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    pf.with_file_name(format!("{stem}.vf{n}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_keeps_subsystems_apart() {
        assert_eq!(primary_cntlid(0), 1);
        assert_eq!(vf_cntlid(0, 1), 0x1001);
        assert_eq!(vf_cntlid(1, 127), 0x1000 + 128 + 127);
        assert_eq!(further_cntlid(2, true, 0), 0x103);
        assert_eq!(further_cntlid(2, false, 0), 3);
        assert_eq!(
            vf_socket(Path::new("/run/x/pf.sock"), 2),
            Path::new("/run/x/pf.vf2.sock")
        );
    }
}
