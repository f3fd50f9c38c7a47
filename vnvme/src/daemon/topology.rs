//! An entry's controllers as its configuration asks for them: how many NVMe/TCP
//! controllers, their CNTLIDs in build order (numbered by `sriov::topology`), the
//! subsystem's serial and NQN.

use sriov::topology::{further_cntlid, primary_cntlid, vf_cntlid};

pub use sriov::topology::vf_socket;

use crate::config::ControllerSpec;

/// NVMe/TCP controllers per exported subsystem unless configured: two hosts (or a host
/// reconnecting before its old association timed out) can be connected at once.
const DEFAULT_TCP_CONTROLLERS: usize = 2;

/// CNTLID of the entry's NVMe/TCP controller `k`: after the vfio-user controller when the
/// entry has one.
pub(super) fn tcp_cntlid(index: usize, spec: &ControllerSpec, k: usize) -> u16 {
    further_cntlid(index, spec.socket.is_some(), k)
}

/// How many NVMe/TCP controllers entry `spec` gets (each host association takes one).
pub(super) fn tcp_controllers(spec: &ControllerSpec) -> usize {
    if spec.tcp_listen.is_none() && spec.rdma_listen.is_none() {
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
pub(crate) fn entry_nqn(index: usize, spec: &ControllerSpec) -> String {
    spec.nqn
        .clone()
        .unwrap_or_else(|| format!("nqn.2026-11.io.vnvme:{}", entry_serial(index, spec)))
}
