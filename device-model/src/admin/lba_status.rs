//! Get LBA Status (NVM command set 1.0, Get LBA Status command; admin opcode 86h, OACS bit
//! 9) and the LBA Status Information log page (NVMe base 2.0, Get Log Page, log 0Eh): what a
//! host learns of the blocks that would fail a read. Here those are exactly the blocks Write
//! Uncorrectable marked ([`crate::uncorrectable`]); the media has no other failures, so every
//! potentially unrecoverable block is a tracked one and a scan (Action Type 10h) finds no
//! more than the tracked list (11h).

use nvme_spec::{Status, Submission};

use crate::admin::view::ControllerView;
use crate::controller::Controller;
use crate::memory::MemoryMap;

/// Action Type: scan for untracked potentially unrecoverable LBAs, report them and the
/// tracked ones.
const ATYPE_SCAN_UNTRACKED: u8 = 0x10;
/// Action Type: report the tracked potentially unrecoverable LBAs.
const ATYPE_TRACKED: u8 = 0x11;
/// Completion Condition: more descriptors than MNDW allowed.
const CMPC_INCOMPLETE: u8 = 1;
/// Completion Condition: the whole range was examined and every descriptor returned.
const CMPC_COMPLETE: u8 = 2;

/// Descriptors of at most `u32::MAX` blocks (the NLB / RNLB fields) covering `[s, e)`.
fn pieces(s: u64, e: u64) -> impl Iterator<Item = (u64, u32)> {
    let n = (e - s).div_ceil(u64::from(u32::MAX));
    (0..n).map(move |k| {
        let at = s + k * u64::from(u32::MAX);
        (at, (e - at).min(u64::from(u32::MAX)) as u32)
    })
}

impl Controller {
    /// Get LBA Status: CDW10-11 SLBA, CDW12 MNDW (dwords to return, 0's based), CDW13 bits
    /// 15:0 Range Length (0: to the end of the namespace), bits 31:24 Action Type (10h or
    /// 11h; anything else is Invalid Field). Returns the LBA Status Descriptor list: 8-byte
    /// header (NLSD, CMPC) and 16-byte descriptors (DSLBA, NLB) of the uncorrectable blocks
    /// in the range, as many as MNDW holds (CMPC 1 when some did not fit, else 2).
    pub(crate) fn get_lba_status(&mut self, sqe: &Submission, mem: &MemoryMap) -> Status {
        let slba = u64::from(sqe.cdw10.get()) | (u64::from(sqe.cdw11.get()) << 32);
        let len = (u64::from(sqe.cdw12.get()) + 1) * 4;
        let cdw13 = sqe.cdw13.get();
        let rl = u64::from(cdw13 & 0xffff);
        let atype = (cdw13 >> 24) as u8;
        if atype != ATYPE_SCAN_UNTRACKED && atype != ATYPE_TRACKED {
            return Status::INVALID_FIELD;
        }
        let Some(i) = self.namespace_index(sqe.nsid.get()) else {
            return Status::INVALID_NAMESPACE;
        };
        let ns = &self.namespaces[i];
        let blocks = ns.blocks();
        if slba >= blocks {
            return Status::LBA_OUT_OF_RANGE;
        }
        let end = if rl == 0 {
            blocks
        } else {
            slba.saturating_add(rl).min(blocks)
        };
        let room = (len.saturating_sub(8) / 16) as usize;
        let mut found = ns
            .uncorrectable
            .within(slba, end)
            .flat_map(|(s, e)| pieces(s, e));
        let descs: Vec<(u64, u32)> = found.by_ref().take(room).collect();
        let more = found.next().is_some();
        drop(found);
        let mut page = vec![0u8; 8 + 16 * descs.len()];
        page[0..4].copy_from_slice(&(descs.len() as u32).to_le_bytes());
        page[4] = if more { CMPC_INCOMPLETE } else { CMPC_COMPLETE };
        for (k, (s, n)) in descs.iter().enumerate() {
            let d = &mut page[8 + 16 * k..24 + 16 * k];
            d[0..8].copy_from_slice(&s.to_le_bytes());
            d[8..12].copy_from_slice(&n.to_le_bytes());
        }
        // the host's buffer holds MNDW + 1 dwords: what fits of the list goes there
        let n = page.len().min(len as usize);
        self.admin_to_host(sqe, &page[..n], mem)
    }
}

impl ControllerView<'_> {
    /// The LBA Status Information log page, its first `limit` bytes at most (the whole page
    /// can be as long as every namespace's [`crate::uncorrectable::MAX_RANGES`] ranges):
    /// header (LSLPLEN, NLSLNE, ESTULB, LSGC), then one LBA Status Log Namespace Element
    /// (NEID, NLRD, RATYPE 11h) with its LBA Range Descriptors (RSLBA, RNLB) for each
    /// namespace with uncorrectable blocks.
    pub(crate) fn lba_status_log(&self, limit: u64) -> Vec<u8> {
        let with = || {
            self.namespaces
                .iter()
                .filter(|n| !n.uncorrectable.is_empty())
        };
        let descriptors = |ns: &crate::namespace::Namespace| {
            ns.uncorrectable
                .ranges()
                .iter()
                .flat_map(|&(s, e)| pieces(s, e))
                .count()
        };
        let total: usize = 16 + with().map(|ns| 16 + 16 * descriptors(ns)).sum::<usize>();
        let estulb: u64 = with().map(|ns| ns.uncorrectable.blocks()).sum();
        let lsgc = self
            .namespaces
            .iter()
            .fold(0u16, |g, ns| g.wrapping_add(ns.uncorrectable.generation()));
        let mut page = Vec::with_capacity(total.min(limit as usize));
        page.extend_from_slice(&(total as u32).to_le_bytes());
        page.extend_from_slice(&(with().count() as u32).to_le_bytes());
        page.extend_from_slice(&(estulb.min(u64::from(u32::MAX)) as u32).to_le_bytes());
        page.extend_from_slice(&[0, 0]);
        page.extend_from_slice(&lsgc.to_le_bytes());
        for ns in with() {
            if page.len() as u64 >= limit {
                break;
            }
            page.extend_from_slice(&ns.nsid.to_le_bytes());
            page.extend_from_slice(&(descriptors(ns) as u32).to_le_bytes());
            page.push(ATYPE_TRACKED);
            page.extend_from_slice(&[0; 7]);
            for &(s, e) in ns.uncorrectable.ranges() {
                for (at, n) in pieces(s, e) {
                    if page.len() as u64 >= limit {
                        break;
                    }
                    page.extend_from_slice(&at.to_le_bytes());
                    page.extend_from_slice(&n.to_le_bytes());
                    page.extend_from_slice(&[0; 4]);
                }
            }
        }
        page
    }
}
