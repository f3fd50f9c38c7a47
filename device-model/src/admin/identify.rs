//! Identify (NVMe base 2.0 §5.17): controller, namespaces, namespace lists and descriptors.

use nvme_spec::identify::{
    CSI_NVM, IdentifyController, IdentifyNamespace, IdentifyNamespaceIndependent,
    NsIdDescriptorHeader, cns, lpa, nidt, oacs, oncs,
};
use nvme_spec::registers::version;
use nvme_spec::{Status, Submission};

use zerocopy::IntoBytes;

use crate::admin::namespace_management::CREATE_FORMATS;
use crate::admin::view::ControllerView;
use crate::admin::virtualization;

/// Copy `s` into a space-padded fixed-width ASCII field.
fn ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl ControllerView<'_> {
    /// Identify (§5.17): the 4 KiB data structure CNS selects, or the status that refuses it.
    pub(crate) fn identify(&self, sqe: &Submission) -> Result<[u8; 4096], Status> {
        let cdw10 = sqe.cdw10.get();
        let cns_value = cdw10 as u8;
        let csi = (sqe.cdw11.get() >> 24) as u8;
        let nsid = sqe.nsid.get();
        let mut page = [0u8; 4096];
        match cns_value {
            cns::CONTROLLER => page.copy_from_slice(self.identify_controller().as_bytes()),
            // what other controllers' namespaces are (allocated list and data, attachment)
            // is for the controller that manages them: a VF sees only its own
            cns::ALLOCATED_NS_LIST | cns::ALLOCATED_NAMESPACE | cns::NS_ATTACHED_CTRL_LIST
                if !self.cfg.namespace_management && self.cfg.subsystem.is_some() =>
            {
                return Err(Status::INVALID_FIELD);
            }
            cns::NS_ATTACHED_CTRL_LIST | cns::CTRL_LIST => {
                let from = (cdw10 >> 16) as u16;
                let ids = self.controller_list(cns_value == cns::NS_ATTACHED_CTRL_LIST, nsid);
                let Some(ids) = ids else {
                    return Err(Status::INVALID_NAMESPACE);
                };
                // Controller List (Figure 137): count, then IDs from CNTID on, at most 2047
                let ids: Vec<u16> = ids.into_iter().filter(|&c| c >= from).take(2047).collect();
                page[0..2].copy_from_slice(&(ids.len() as u16).to_le_bytes());
                for (k, c) in ids.iter().enumerate() {
                    page[2 + 2 * k..4 + 2 * k].copy_from_slice(&c.to_le_bytes());
                }
            }
            cns::PRIMARY_CTRL_CAPS => {
                if !virtualization::primary_controller_caps(self.cfg, &mut page) {
                    return Err(Status::INVALID_FIELD);
                }
            }
            cns::SECONDARY_CTRL_LIST => {
                if !virtualization::secondary_controller_list(
                    self.cfg,
                    (cdw10 >> 16) as u16,
                    &mut page,
                ) {
                    return Err(Status::INVALID_FIELD);
                }
            }
            cns::NAMESPACE => match self.namespace_index(nsid) {
                Some(i) => page.copy_from_slice(self.identify_namespace(i).as_bytes()),
                // An inactive but valid NSID returns zeroes; broadcast and others are invalid.
                None if self.is_inactive(nsid) => {}
                // with Namespace Management, FFFFFFFFh: what every namespace can be created
                // with (the LBA formats)
                None if nsid == u32::MAX && self.cfg.namespace_management => {
                    let mut id = IdentifyNamespace::default();
                    id.nlbaf = (CREATE_FORMATS.len() - 1) as u8;
                    for (f, &shift) in id.lbaf.iter_mut().zip(&CREATE_FORMATS) {
                        f.lbads = shift;
                    }
                    page.copy_from_slice(id.as_bytes());
                }
                None => return Err(Status::INVALID_NAMESPACE),
            },
            cns::ALLOCATED_NAMESPACE => {
                let info = self.cfg.subsystem.as_ref().and_then(|s| s.namespace(nsid));
                match info {
                    Some(info) => {
                        let id = namespace_data(
                            info.size >> info.lba_shift,
                            info.lba_shift,
                            info.shared,
                            info.ids.nguid,
                            info.ids.eui64,
                        );
                        page.copy_from_slice(id.as_bytes());
                    }
                    None if self.is_inactive(nsid) => {}
                    None => return Err(Status::INVALID_NAMESPACE),
                }
            }
            cns::ALLOCATED_NS_LIST => {
                if nsid >= 0xffff_fffe {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let ids = match &self.cfg.subsystem {
                    Some(s) => s.allocated(nsid),
                    None => self
                        .namespaces
                        .iter()
                        .map(|n| n.nsid)
                        .filter(|&n| n > nsid)
                        .collect(),
                };
                for (i, id) in ids.into_iter().take(1024).enumerate() {
                    page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
            }
            cns::ACTIVE_NS_LIST | cns::CSI_ACTIVE_NS_LIST => {
                if cns_value == cns::CSI_ACTIVE_NS_LIST && csi != CSI_NVM {
                    return Err(Status::INVALID_FIELD);
                }
                if nsid >= 0xffff_fffe {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let ids = self
                    .namespaces
                    .iter()
                    .map(|n| n.nsid)
                    .filter(|&id| id > nsid)
                    .take(1024);
                for (i, id) in ids.enumerate() {
                    page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
            }
            cns::NS_ID_DESCRIPTORS => {
                let Some(i) = self.namespace_index(nsid) else {
                    return Err(Status::INVALID_NAMESPACE);
                };
                let ns = &self.namespaces[i];
                let mut off = 0;
                let mut put = |ty: u8, id: &[u8]| {
                    let h = NsIdDescriptorHeader {
                        nidt: ty,
                        nidl: id.len() as u8,
                        rsvd: [0; 2],
                    };
                    page[off..off + 4].copy_from_slice(h.as_bytes());
                    page[off + 4..off + 4 + id.len()].copy_from_slice(id);
                    off += 4 + id.len();
                };
                put(nidt::EUI64, &ns.eui64);
                put(nidt::NGUID, &ns.nguid);
                put(nidt::UUID, &ns.uuid);
                put(nidt::CSI, &[CSI_NVM]);
            }
            cns::CSI_NAMESPACE => {
                if csi != CSI_NVM {
                    return Err(Status::INVALID_FIELD);
                }
                // NVM command set specific Identify Namespace: no extended LBA formats; zeroes.
                if self.namespace_index(nsid).is_none() {
                    return Err(Status::INVALID_NAMESPACE);
                }
            }
            cns::CSI_CONTROLLER => {
                if csi != CSI_NVM {
                    return Err(Status::INVALID_FIELD);
                }
                // NVM command set specific Identify Controller (NVM cmd set 1.0 §4.1.5.2):
                // VSL (byte 0) the Verify Size Limit, as MDTS; no WZSL/WUSL/DMRL limits
                page[0] = self.cfg.mdts;
            }
            cns::CS_INDEPENDENT_NAMESPACE => {
                let Some(_) = self.namespace_index(nsid) else {
                    return Err(Status::INVALID_NAMESPACE);
                };
                let mut id = IdentifyNamespaceIndependent::default();
                id.nstat = 1; // namespace ready
                page.copy_from_slice(id.as_bytes());
            }
            cns::IO_COMMAND_SET => {
                // I/O Command Set data structure: combination 0 = NVM command set only.
                page[..8].copy_from_slice(&1u64.to_le_bytes());
            }
            _ => return Err(Status::INVALID_FIELD),
        }
        Ok(page)
    }

    /// The subsystem's controllers, or (`attached`) those namespace `nsid` is attached to;
    /// `None` for an unknown namespace.
    fn controller_list(&self, attached: bool, nsid: u32) -> Option<Vec<u16>> {
        let me = self.cfg.cntlid;
        let Some(sub) = &self.cfg.subsystem else {
            if !attached {
                return Some(vec![me]);
            }
            return self.namespace_index(nsid).map(|_| vec![me]);
        };
        if attached {
            sub.attached(nsid)
        } else {
            Some(sub.controllers())
        }
    }

    fn identify_controller(&self) -> IdentifyController {
        let c = &self.cfg;
        let mut id = IdentifyController::default();
        id.vid = c.ids.vendor.into();
        id.ssvid = c.ids.subsystem_vendor.into();
        ascii(&mut id.sn, &c.serial);
        ascii(&mut id.mn, &c.model);
        ascii(&mut id.fr, &c.firmware);
        id.rab = 6;
        id.mdts = c.mdts;
        id.cntlid = c.cntlid.into();
        id.ver = version(1, 4, 0).into();
        id.cntrltype = 1; // I/O controller
        id.oacs = (oacs::FORMAT_NVM | oacs::DOORBELL_BUFFER_CONFIG).into();
        id.acl = 3;
        id.aerl = (crate::admin::AER_LIMIT - 1) as u8;
        id.frmw = 0x03; // one slot, slot 1 read-only
        id.lpa = lpa::COMMANDS_EFFECTS;
        id.elpe = (crate::state::logs::ERROR_LOG_ENTRIES - 1) as u8;
        id.wctemp = 343.into();
        id.cctemp = 373.into();
        id.kas = 1.into(); // keep alive granularity 100 ms
        id.sqes = 0x66;
        id.cqes = 0x44;
        id.nn = self.nn().into();
        if let Some(sub) = &c.subsystem
            && sub.manages_namespaces()
        {
            // namespaces come and go: Namespace Attribute Notices (OAES bit 8)
            id.oaes = (1u32 << 8).into();
            id.mnan = sub.max_namespaces().into();
            if c.namespace_management {
                id.oacs = (id.oacs.get() | oacs::NS_MANAGEMENT).into();
                let (total, free) = sub.capacity();
                id.tnvmcap = u128::from(total).to_le_bytes();
                id.unvmcap = u128::from(free).to_le_bytes();
            }
        }
        id.oncs = (oncs::COMPARE
            | oncs::WRITE_UNCORRECTABLE
            | oncs::DATASET_MANAGEMENT
            | oncs::WRITE_ZEROES
            | oncs::VERIFY)
            .into();
        id.oacs = (id.oacs.get() | oacs::GET_LBA_STATUS).into();
        id.vwc = 0x07; // volatile write cache present; Flush with NSID FFFFFFFFh supported
        id.sgls = 1.into(); // SGLs supported, no alignment requirement
        let nqn = c.subnqn.as_bytes();
        let n = nqn.len().min(255);
        id.subnqn[..n].copy_from_slice(&nqn[..n]);
        id.psd[0].mp = 2500.into(); // 25 W
        if c.virt.is_some() || c.shared_namespaces {
            id.cmic |= 1 << 1; // the subsystem has more than one controller
        }
        if matches!(&c.virt, Some(crate::virt_link::VirtRole::Primary(_))) {
            id.oacs = (id.oacs.get() | oacs::VIRTUALIZATION).into();
        }
        if let Some(f) = c.fabrics {
            // no doorbell buffer or PCIe-only features over a fabric
            id.oacs = (oacs::FORMAT_NVM | oacs::GET_LBA_STATUS).into();
            id.maxcmd = f.maxcmd.into();
            // SGLs supported, Keyed SGL Data Blocks (NVMe/RDMA), and the Address field of
            // a Data Block may be an offset (in-capsule data)
            id.sgls = (1 | (1 << 2) | (1 << 20)).into();
            id.nvmeof[0..4].copy_from_slice(&f.ioccsz.to_le_bytes());
            id.nvmeof[4..8].copy_from_slice(&f.iorcsz.to_le_bytes());
            // ICDOFF 0; FCATT 0 (dynamic controller model); MSDBD 1
            id.nvmeof[11] = 1;
        }
        id
    }

    fn identify_namespace(&self, i: usize) -> IdentifyNamespace {
        let ns = &self.namespaces[i];
        let mut id = namespace_data(ns.blocks(), ns.lba_shift, ns.shared, ns.nguid, ns.eui64);
        if let Some((used, cap)) = ns.backend.thin_usage() {
            // NSFEAT bit 0: thin provisioning; NCAP what may be allocated, NUSE what is
            id.nsfeat |= 1;
            id.ncap = (cap >> ns.lba_shift).min(ns.blocks()).into();
            id.nuse = (used >> ns.lba_shift).min(ns.blocks()).into();
        }
        id
    }
}

/// Identify Namespace (§5.17.2.1, CNS 00h and 11h) of a namespace of `blocks` blocks.
fn namespace_data(
    blocks: u64,
    lba_shift: u8,
    shared: bool,
    nguid: [u8; 16],
    eui64: [u8; 8],
) -> IdentifyNamespace {
    let mut id = IdentifyNamespace::default();
    id.nsze = blocks.into();
    id.ncap = blocks.into();
    id.nuse = blocks.into();
    id.nlbaf = 0;
    id.flbas = 0;
    id.dlfeat = 0x01; // deallocated blocks read as zeroes
    id.nmic = u8::from(shared); // may be attached to two or more controllers
    id.nguid = nguid;
    id.eui64 = eui64;
    id.lbaf[0].lbads = lba_shift;
    id.lbaf[0].rp = 0;
    id
}
