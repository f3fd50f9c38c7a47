//! How an entry's controllers are numbered and named: CNTLIDs of the PF, its VFs and the
//! NVMe/TCP controllers, the subsystem NQN, VF sockets.

use std::path::{Path, PathBuf};

use crate::config::ControllerSpec;

/// CNTLIDs of VF (secondary) controllers: `0x1000 + index * 128 + VF number`.
const SECONDARY_CNTLID_BASE: u16 = 0x1000;

/// CNTLIDs of a `[[controller]]`'s further controllers: `index + 1 + k * 0x100`.
const TCP_CNTLID_STEP: u16 = 0x100;

/// NVMe/TCP controllers per exported subsystem unless configured: two hosts (or a host
/// reconnecting before its old association timed out) can be connected at once.
const DEFAULT_TCP_CONTROLLERS: usize = 2;

/// Resources of a VF brought online (`vfs_online`, NumVFs, `vf_enable`): admin + 4 I/O
/// queues, 5 vectors.
pub(super) const VF_DEFAULT_VQ: u16 = 5;
pub(super) const VF_DEFAULT_VI: u16 = 5;

/// The CNTLID of entry `index`'s first (vfio-user) controller, the PF when it has VFs.
pub(super) fn primary_cntlid(index: usize) -> u16 {
    index as u16 + 1
}

/// CNTLID of VF `vf` (1-based) of entry `index`.
pub(super) fn vf_cntlid(index: usize, vf: usize) -> u16 {
    SECONDARY_CNTLID_BASE + (index as u16) * 128 + vf as u16
}

/// CNTLID of the entry's NVMe/TCP controller `k`: after the vfio-user controller when the
/// entry has one, steps of 0x100 from `index + 1`.
pub(super) fn tcp_cntlid(index: usize, spec: &ControllerSpec, k: usize) -> u16 {
    let step = k + usize::from(spec.socket.is_some());
    primary_cntlid(index) + (step as u16) * TCP_CNTLID_STEP
}

/// How many NVMe/TCP controllers entry `spec` gets (each host association takes one).
pub(super) fn tcp_controllers(spec: &ControllerSpec) -> usize {
    if spec.tcp_listen.is_none() {
        return 0;
    }
    let nvme_backend = spec
        .namespaces
        .iter()
        .any(|n| n.backend.starts_with("nvme:"));
    spec.tcp_controllers.unwrap_or(if nvme_backend {
        1
    } else {
        DEFAULT_TCP_CONTROLLERS
    })
}

/// The CNTLIDs of entry `index`'s controllers in the order they are built (vfio-user PF,
/// VFs, then NVMe/TCP controllers): position `u` is controller number `u` of `attach`.
pub(super) fn controller_ids(
    index: usize,
    spec: &ControllerSpec,
    vfs: usize,
    tcp_count: usize,
) -> Vec<u16> {
    let mut ids = Vec::new();
    if spec.socket.is_some() {
        ids.push(primary_cntlid(index));
    }
    for k in 0..vfs {
        ids.push(vf_cntlid(index, k + 1));
    }
    for k in 0..tcp_count {
        ids.push(tcp_cntlid(index, spec, k));
    }
    ids
}

/// The serial number of entry `index` (configured, or made from the index).
pub(super) fn entry_serial(index: usize, spec: &ControllerSpec) -> String {
    spec.serial
        .clone()
        .unwrap_or_else(|| format!("VNVME{index:04}"))
}

/// The NQN of entry `index` (configured, or made from its serial).
pub(super) fn entry_nqn(index: usize, spec: &ControllerSpec) -> String {
    spec.nqn
        .clone()
        .unwrap_or_else(|| format!("nqn.2026-11.io.vnvme:{}", entry_serial(index, spec)))
}

/// Socket of VF `n` of the PF served on `pf`: `DIR/NAME.vfN.sock` for `DIR/NAME.sock`.
pub fn vf_socket(pf: &Path, n: usize) -> PathBuf {
    let stem = pf
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    pf.with_file_name(format!("{stem}.vf{n}.sock"))
}
