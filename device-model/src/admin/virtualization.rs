//! Virtualization Management (1Ch, base 2.0 §5.28) and the Identify data of the
//! Virtualization Enhancements: Primary Controller Capabilities (CNS 14h, Figure 282) and
//! Secondary Controller List (CNS 15h, Figures 283-284). The pools live in the `sriov`
//! crate, shared with the secondaries, behind [`crate::virt_link::PrimaryPools`].

use nvme_spec::Status;
use nvme_spec::status::sct;

use crate::controller::ControllerConfig;
use crate::virt_link::{VirtError, VirtRole};

fn status(e: VirtError) -> Status {
    match e {
        VirtError::InvalidControllerId => Status::dnr(sct::COMMAND_SPECIFIC, 0x1f),
        VirtError::InvalidSecondaryState => Status::dnr(sct::COMMAND_SPECIFIC, 0x20),
        VirtError::InvalidNumberOfResources => Status::dnr(sct::COMMAND_SPECIFIC, 0x21),
        VirtError::InvalidResourceId => Status::dnr(sct::COMMAND_SPECIFIC, 0x22),
        VirtError::InvalidField => Status::INVALID_FIELD,
    }
}

/// Virtualization Management: only a primary controller has it.
pub(crate) fn virtualization_management(
    cfg: &ControllerConfig,
    cdw10: u32,
    cdw11: u32,
) -> (Status, u32) {
    let Some(VirtRole::Primary(state)) = &cfg.virt else {
        return (Status::INVALID_OPCODE, 0);
    };
    let act = (cdw10 & 0xf) as u8;
    let rt = ((cdw10 >> 8) & 0x7) as u8;
    let cntlid = (cdw10 >> 16) as u16;
    let nr = (cdw11 & 0xffff) as u16;
    match state.manage(act, rt, cntlid, nr) {
        Ok(n) => {
            log::info!(
                "{}: virtualization management: action {act:#x}, type {rt}, controller {cntlid}, {nr} resources",
                cfg.serial
            );
            (Status::SUCCESS, n)
        }
        Err(e) => (status(e), 0),
    }
}

/// Identify CNS 14h into `page`; `false` when this is not a primary controller.
pub(crate) fn primary_controller_caps(cfg: &ControllerConfig, page: &mut [u8; 4096]) -> bool {
    let Some(VirtRole::Primary(state)) = &cfg.virt else {
        return false;
    };
    let v = state.capabilities();
    let put16 = |p: &mut [u8; 4096], at: usize, x: u16| {
        p[at..at + 2].copy_from_slice(&x.to_le_bytes());
    };
    let put32 = |p: &mut [u8; 4096], at: usize, x: u32| {
        p[at..at + 4].copy_from_slice(&x.to_le_bytes());
    };
    put16(page, 0, cfg.cntlid); // CNTLID
    put16(page, 2, 0); // PORTID
    page[4] = 0b11; // CRT: VQ and VI resources
    put32(page, 32, v.vq_total); // VQFRT
    put32(page, 36, v.vq_assigned); // VQRFA
    put16(page, 40, v.vq_primary); // VQRFAP
    put16(page, 42, v.vq_private); // VQPRT
    put16(page, 44, v.vq_max); // VQFRSM
    put16(page, 46, 1); // VQGRAN
    put32(page, 64, v.vi_total); // VIFRT
    put32(page, 68, v.vi_assigned); // VIRFA
    put16(page, 72, v.vi_primary); // VIRFAP
    put16(page, 74, v.vi_private); // VIPRT
    put16(page, 76, v.vi_max); // VIFRSM
    put16(page, 78, 1); // VIGRAN
    true
}

/// Identify CNS 15h from secondary ID `from` into `page`; `false` when not a primary.
pub(crate) fn secondary_controller_list(
    cfg: &ControllerConfig,
    from: u16,
    page: &mut [u8; 4096],
) -> bool {
    let Some(VirtRole::Primary(state)) = &cfg.virt else {
        return false;
    };
    let mut n = 0usize;
    for s in state.secondaries(from) {
        let e = 32 + 32 * n;
        page[e..e + 2].copy_from_slice(&s.scid.to_le_bytes()); // SCID
        page[e + 2..e + 4].copy_from_slice(&cfg.cntlid.to_le_bytes()); // PCID
        page[e + 4] = u8::from(s.online); // SCS
        page[e + 8..e + 10].copy_from_slice(&s.vfn.to_le_bytes()); // VFN
        page[e + 10..e + 12].copy_from_slice(&s.nvq.to_le_bytes()); // NVQ
        page[e + 12..e + 14].copy_from_slice(&s.nvi.to_le_bytes()); // NVI
        n += 1;
    }
    page[0] = n as u8; // NUMID
    true
}
