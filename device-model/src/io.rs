//! NVM command set I/O commands (NVM command set 1.0 §3): Read, Write (FUA), Flush,
//! Write Zeroes, Dataset Management (deallocate), Compare, Verify and Write Uncorrectable.
//! All of them go to the backends asynchronously; the ones that take several requests
//! (Flush of every namespace, Dataset Management) or check the data (Compare, Verify) are in
//! [`crate::compound`], as are reads and writes larger than their namespace's backend takes
//! in one request (sent in pieces). Write Uncorrectable only marks blocks
//! ([`crate::uncorrectable`]): reads of them fail, writes and deallocations clear them.

use std::sync::Arc;

use nvme_spec::opcode::nvm as op;
use nvme_spec::{Status, Submission};

use crate::backend::{IoOp, IoRequest, Submitted};
use crate::compound::Part;
use crate::controller::{Controller, Outcome};
use crate::dptr;
use crate::memory::MemoryMap;

/// Pieces of a split read or write in flight at once (see `read_write_in_pieces`).
const SPLIT_WINDOW: usize = 4;

impl Controller {
    /// Execute one I/O command fetched into `slot` of SQ `qid`.
    pub(crate) fn io_command(
        &mut self,
        qid: u16,
        slot: u16,
        sqe: &Submission,
        mem: &Arc<MemoryMap>,
    ) -> Outcome {
        if sqe.fuse() != 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let nsid = sqe.nsid.get();
        let ns_idx = self.namespace_index(nsid);
        if ns_idx.is_none() && sqe.opcode == op::FLUSH && nsid == u32::MAX {
            if self.wait_for_room(qid, slot, sqe) {
                return Outcome::Pending;
            }
            // every namespace at once (base 2.0 §7.1); done when the last backend answered
            let parts: Vec<Part> = self
                .namespaces
                .iter()
                .map(|ns| Part {
                    nsid: ns.nsid,
                    op: IoOp::Flush,
                    offset: 0,
                    data: None,
                })
                .collect();
            let n = parts.len();
            return self.start_parts(qid, slot, parts, n);
        }
        let Some(ns_idx) = ns_idx else {
            return Outcome::status(Status::INVALID_NAMESPACE);
        };
        match sqe.opcode {
            op::READ | op::WRITE => self.read_write(qid, slot, ns_idx, sqe, mem),
            op::FLUSH => {
                let tag = self.tag(qid, slot);
                let ns = &mut self.namespaces[ns_idx];
                match ns.backend.submit(&IoRequest::flush(tag)) {
                    Ok(()) => Outcome::Pending,
                    Err(s) => Outcome::status(s),
                }
            }
            op::WRITE_ZEROES => {
                let (offset, len) = match self.lba_range(ns_idx, sqe) {
                    Ok(r) => r,
                    Err(s) => return Outcome::status(s),
                };
                // asynchronous like a write: a backend on a device or a network must not
                // hold the reactor; SMART counts it at a successful completion (`complete`)
                self.clear_uncorrectable(ns_idx, offset, len);
                let tag = self.tag(qid, slot);
                let Some(sq) = self.queues.sqs[qid as usize].as_mut() else {
                    return Outcome::status(Status::INTERNAL_ERROR);
                };
                sq.slots[slot as usize].bytes = len;
                let req = IoRequest {
                    tag,
                    op: IoOp::WriteZeroes { len },
                    offset,
                    iov: crate::dptr::GuestBuffers::EMPTY,
                };
                match self.namespaces[ns_idx].backend.submit(&req) {
                    Ok(()) => Outcome::Pending,
                    Err(s) => Outcome::status(s),
                }
            }
            op::DATASET_MANAGEMENT => self.dataset_management(qid, slot, ns_idx, sqe, mem),
            op::COMPARE => self.compare(qid, slot, ns_idx, sqe, mem),
            op::VERIFY => self.verify(qid, slot, ns_idx, sqe),
            op::WRITE_UNCORRECTABLE => self.write_uncorrectable(ns_idx, sqe),
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    /// Byte offset and length of the LBA range in CDW10-12, checked against the namespace.
    pub(crate) fn lba_range(&self, ns_idx: usize, sqe: &Submission) -> Result<(u64, u64), Status> {
        self.namespaces[ns_idx].lba_range(sqe)
    }

    pub(crate) fn max_transfer(&self) -> u64 {
        4096u64 << self.cfg.mdts
    }

    /// The blocks of byte range `offset..offset + len` of namespace `ns_idx` are being
    /// written or deallocated: no longer uncorrectable. One branch while none is.
    #[inline]
    pub(crate) fn clear_uncorrectable(&mut self, ns_idx: usize, offset: u64, len: u64) {
        self.namespaces[ns_idx].clear_uncorrectable(offset, len, &self.cfg.serial);
    }

    /// True when a block of byte range `offset..offset + len` of namespace `ns_idx` is
    /// uncorrectable (a read of it fails with Unrecovered Read Error). One branch while none
    /// is.
    #[inline]
    pub(crate) fn is_uncorrectable(&self, ns_idx: usize, offset: u64, len: u64) -> bool {
        self.namespaces[ns_idx].is_uncorrectable(offset, len)
    }

    /// Write Uncorrectable (NVM command set 1.0 §3.2.7, ONCS bit 1): the blocks read as
    /// Unrecovered Read Error until written or deallocated. No data, no backend request; no
    /// size limit (WUSL 0). Past [`crate::uncorrectable::MAX_RANGES`] disjoint ranges the
    /// command fails with Internal Error (DNR) and marks nothing.
    fn write_uncorrectable(&mut self, ns_idx: usize, sqe: &Submission) -> Outcome {
        let (offset, len) = match self.lba_range(ns_idx, sqe) {
            Ok(r) => r,
            Err(s) => return Outcome::status(s),
        };
        let ns = &mut self.namespaces[ns_idx];
        let (slba, nlb) = (offset >> ns.lba_shift, len >> ns.lba_shift);
        if ns.uncorrectable.insert(slba, nlb).is_err() {
            crate::warn_limited!(
                "{}: namespace {}: Write Uncorrectable refused: {} ranges already",
                self.cfg.serial,
                ns.nsid,
                crate::uncorrectable::MAX_RANGES
            );
            return Outcome::status(Status::dnr(nvme_spec::status::sct::GENERIC, 0x06));
        }
        Outcome::status(Status::SUCCESS)
    }

    fn read_write(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        sqe: &Submission,
        mem: &Arc<MemoryMap>,
    ) -> Outcome {
        let max_transfer = self.max_transfer();
        let page_size = self.page_size;
        let tag = self.tag(qid, slot);
        // the namespace and the command's slot, looked up once
        let (Some(ns), Some(ctx)) = (
            self.namespaces.get_mut(ns_idx),
            self.queues.slot_mut(qid, slot),
        ) else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        let (offset, len) = match ns.lba_range(sqe) {
            Ok(r) => r,
            Err(s) => return Outcome::status(s),
        };
        if len > max_transfer {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let is_read = sqe.opcode == op::READ;
        if is_read && ns.is_uncorrectable(offset, len) {
            return Outcome::status(Status::UNRECOVERED_READ_ERROR);
        }
        self.qos.charge_bytes(len);
        // one segment fits in the slot; more take a block from the pool until completion
        let mut mapped = dptr::map_data(mem, sqe, len, page_size, is_read, true, &mut ctx.iov);
        if mapped.is_err() && ctx.iov.needs_storage() {
            ctx.iov.give_storage(self.iov_pool.take());
            mapped = dptr::map_data(mem, sqe, len, page_size, is_read, true, &mut ctx.iov);
        }
        if let Err(s) = mapped {
            return Outcome::status(s);
        }
        ctx.bytes = len;
        let fua = sqe.cdw12.get() & (1 << 30) != 0;
        if len > ns.max_request {
            ctx.mem = Some(Arc::clone(mem));
            return self.read_write_in_pieces(qid, slot, ns_idx, is_read, fua, offset, len);
        }
        let req = IoRequest {
            tag,
            op: if is_read {
                IoOp::Read
            } else {
                IoOp::Write { fua }
            },
            offset,
            iov: ctx.iov.buffers_in(mem),
        };
        // an instant backend (RAM, null) answers here: the command completes in this pass
        // and nothing holds the guest's memory after it
        let instant = match ns.backend.execute(&req) {
            Ok(Submitted::Completed) => true,
            Ok(Submitted::Queued) => {
                ctx.mem = Some(Arc::clone(mem));
                false
            }
            Err(s) => return Outcome::status(s),
        };
        if !is_read {
            ns.clear_uncorrectable(offset, len, &self.cfg.serial);
        }
        if instant {
            // posted here, where the namespace and the status are known
            self.complete_instant(qid, slot, ns_idx, mem);
            return Outcome::Posted;
        }
        Outcome::Pending
    }

    /// A read or write larger than its namespace's backend takes in one request (a backend
    /// attached after the controller's MDTS was set, e.g. a remote namespace added at run
    /// time): sent as pieces of at most that size, [`SPLIT_WINDOW`] in flight at once, each
    /// over its range of the command's buffers (zero copy). It completes when the last piece
    /// did, with the first error.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    fn read_write_in_pieces(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        is_read: bool,
        fua: bool,
        offset: u64,
        len: u64,
    ) -> Outcome {
        let ns = &self.namespaces[ns_idx];
        let block = 1u64 << ns.lba_shift;
        let piece = (ns.max_request & !(block - 1)).max(block);
        let op = if is_read {
            IoOp::Read
        } else {
            IoOp::Write { fua }
        };
        let nsid = ns.nsid;
        let list = (0..len.div_ceil(piece))
            .map(|k| Part {
                nsid,
                op,
                offset: offset + k * piece,
                data: Some((k * piece, piece.min(len - k * piece))),
            })
            .collect();
        if !is_read {
            self.clear_uncorrectable(ns_idx, offset, len);
        }
        self.start_parts(qid, slot, list, SPLIT_WINDOW)
    }

    /// Dataset Management (§3.2.3): only the Deallocate attribute does anything. The ranges
    /// are checked first (any out of range fails the command before anything is
    /// deallocated), then deallocated one after the other.
    fn dataset_management(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        sqe: &Submission,
        mem: &MemoryMap,
    ) -> Outcome {
        if self.wait_for_room(qid, slot, sqe) {
            return Outcome::Pending;
        }
        let nr = (sqe.cdw10.get() & 0xff) as usize + 1;
        let deallocate = sqe.cdw11.get() & (1 << 2) != 0;
        let len = nr * 16;
        let s = self.copy_from_host(sqe, len, mem, true);
        if !s.is_success() {
            return Outcome::status(s);
        }
        if !deallocate {
            return Outcome::status(Status::SUCCESS);
        }
        let ns = &self.namespaces[ns_idx];
        let blocks = ns.blocks();
        let mut parts = Vec::with_capacity(nr);
        for e in self.bounce[..len].chunks_exact(16) {
            let nlb = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
            let slba = u64::from_le_bytes([e[8], e[9], e[10], e[11], e[12], e[13], e[14], e[15]]);
            match slba.checked_add(nlb) {
                Some(end) if end <= blocks => {}
                _ => return Outcome::status(Status::LBA_OUT_OF_RANGE),
            }
            if nlb > 0 {
                parts.push(Part {
                    nsid: ns.nsid,
                    op: IoOp::Deallocate {
                        len: nlb << ns.lba_shift,
                    },
                    offset: slba << ns.lba_shift,
                    data: None,
                });
            }
        }
        for p in &parts {
            if let IoOp::Deallocate { len } = p.op {
                self.clear_uncorrectable(ns_idx, p.offset, len);
            }
        }
        // one range at a time: up to 256 ranges never crowd a device's or a target's queue
        self.start_parts(qid, slot, parts, 1)
    }
}

#[cfg(test)]
mod tests {
    use nvme_spec::Status;

    use crate::backend::{IoOp, MallocBackend};
    use crate::compound::MAX_COMPARES;
    use crate::namespace::Namespace;
    use crate::test_harness::{DATA, Harness, HeldBackend, sqe};

    const WRITE: u8 = 0x01;
    const READ: u8 = 0x02;
    const WRITE_UNCOR: u8 = 0x04;
    const COMPARE: u8 = 0x05;
    const WRITE_ZEROES: u8 = 0x08;
    const DSM: u8 = 0x09;
    const VERIFY: u8 = 0x0c;
    const GET_LOG_PAGE: u8 = 0x02;
    const FORMAT: u8 = 0x80;
    const GET_LBA_STATUS: u8 = 0x86;
    /// Where Get LBA Status and log pages land.
    const OUT: u64 = DATA + 0x20000;

    /// `nlb` blocks at `lba` (CDW10-12 of an LBA range command).
    fn at(op: u8, lba: u32, nlb: u32) -> [u8; 64] {
        sqe(op, 1, DATA, &[lba, 0, nlb - 1])
    }

    fn admin_run(h: &mut Harness, s: [u8; 64]) -> Status {
        let c = h.admin(s);
        h.admin_wait(c)
    }

    /// Get LBA Status of namespace 1 from `slba` over `rl` blocks with `mndw`: (CMPC,
    /// descriptors as (DSLBA, NLB)).
    fn lba_status(h: &mut Harness, slba: u32, rl: u32, mndw: u32) -> (u8, Vec<(u64, u32)>) {
        h.write(OUT, &[0xee; 4096]);
        let st = admin_run(
            h,
            sqe(GET_LBA_STATUS, 1, OUT, &[slba, 0, mndw, rl | (0x11 << 24)]),
        );
        assert_eq!(st, Status::SUCCESS);
        let page = h.read(OUT, 4096);
        let nlsd = u32::from_le_bytes(page[0..4].try_into().unwrap()) as usize;
        let descs = (0..nlsd)
            .map(|k| {
                let d = &page[8 + 16 * k..24 + 16 * k];
                let lba = u64::from_le_bytes(d[0..8].try_into().unwrap());
                (lba, u32::from_le_bytes(d[8..12].try_into().unwrap()))
            })
            .collect();
        (page[4], descs)
    }

    /// Write Uncorrectable makes its blocks fail Read, Compare and Verify with Unrecovered
    /// Read Error (and nothing else); Write, Write Zeroes, Dataset Management deallocate and
    /// Format NVM make them readable again; Get LBA Status and log page 0Eh report them.
    #[test]
    fn write_uncorrectable_until_written_or_deallocated() {
        let b = MallocBackend::new(1 << 20).unwrap();
        let mut h = Harness::new(vec![Namespace::new(1, Box::new(b), 9, "U")]);
        h.write(DATA, &[0x5a; 8192]);
        assert_eq!(h.io_run(at(WRITE, 0, 16)), Status::SUCCESS);
        assert_eq!(h.io_run(at(WRITE_UNCOR, 8, 8)), Status::SUCCESS);
        assert_eq!(h.io_run(at(WRITE_UNCOR, 2047, 2)), Status::LBA_OUT_OF_RANGE);
        let unc = Status::UNRECOVERED_READ_ERROR;
        assert_eq!(unc.cqe_bits() >> 1, 0x281, "SCT 2h, SC 81h");
        for (op, lba, nlb, want) in [
            (READ, 8, 8, unc),
            (READ, 4, 5, unc),
            (READ, 15, 1, unc),
            (READ, 0, 8, Status::SUCCESS),
            (READ, 16, 8, Status::SUCCESS),
            (COMPARE, 8, 1, unc),
            (VERIFY, 8, 8, unc),
            (VERIFY, 0, 8, Status::SUCCESS),
            (VERIFY, 2047, 2, Status::LBA_OUT_OF_RANGE),
            // beyond VSL (= MDTS, 512 KiB): 1024 blocks of 512 bytes are 512 KiB, 1025 not
            (VERIFY, 0, 1025, Status::INVALID_FIELD),
            (VERIFY, 1024, 1024, Status::SUCCESS),
        ] {
            assert_eq!(
                h.io_run(at(op, lba, nlb)),
                want,
                "op {op:#x} LBA {lba}+{nlb}"
            );
        }
        // Get LBA Status: the tracked range; a range past it, a short MNDW, the refusals
        assert_eq!(lba_status(&mut h, 0, 0, 1023), (2, vec![(8, 8)]));
        assert_eq!(lba_status(&mut h, 10, 3, 1023), (2, vec![(10, 3)]));
        assert_eq!(lba_status(&mut h, 16, 0, 1023), (2, vec![]));
        assert_eq!(
            lba_status(&mut h, 0, 0, 1),
            (1, vec![]),
            "no room: incomplete"
        );
        for (nsid, cdws, want) in [
            (1, [0, 0, 1023, 0x02 << 24], Status::INVALID_FIELD),
            (1, [2048, 0, 1023, 0x11 << 24], Status::LBA_OUT_OF_RANGE),
            (9, [0, 0, 1023, 0x10 << 24], Status::INVALID_NAMESPACE),
            (1, [0, 0, 1023, 0x10 << 24], Status::SUCCESS),
        ] {
            let st = admin_run(&mut h, sqe(GET_LBA_STATUS, nsid, OUT, &cdws));
            assert_eq!(st, want, "Get LBA Status NSID {nsid} {cdws:x?}");
        }
        // the LBA Status Information log page
        let st = admin_run(&mut h, sqe(GET_LOG_PAGE, 0, OUT, &[0x0e | (15 << 16)]));
        assert_eq!(st, Status::SUCCESS);
        let log = h.read(OUT, 64);
        let dw = |o: usize| u32::from_le_bytes(log[o..o + 4].try_into().unwrap());
        assert_eq!((dw(0), dw(4), dw(8)), (48, 1, 8), "LSLPLEN, NLSLNE, ESTULB");
        assert_eq!(
            (dw(16), dw(20), log[24]),
            (1, 1, 0x11),
            "NEID, NLRD, RATYPE"
        );
        assert_eq!((dw(32), dw(40)), (8, 8), "RSLBA, RNLB");
        // a write in the middle splits the range; what it wrote reads back
        h.write(DATA, &[0x77; 1024]);
        assert_eq!(h.io_run(at(WRITE, 10, 2)), Status::SUCCESS);
        assert_eq!(
            h.io_run(sqe(READ, 1, DATA + 0x1000, &[10, 0, 1])),
            Status::SUCCESS
        );
        assert_eq!(h.read(DATA + 0x1000, 1024), [0x77; 1024]);
        assert_eq!(h.io_run(at(READ, 9, 1)), unc);
        assert_eq!(lba_status(&mut h, 0, 0, 1023), (2, vec![(8, 2), (12, 4)]));
        // Write Zeroes and a deallocation clear what they cover
        assert_eq!(h.io_run(at(WRITE_ZEROES, 8, 2)), Status::SUCCESS);
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&4u32.to_le_bytes());
        range[8..16].copy_from_slice(&12u64.to_le_bytes());
        h.write(DATA + 0x4000, &range);
        let st = h.io_run(sqe(DSM, 1, DATA + 0x4000, &[0, 1 << 2]));
        assert_eq!(st, Status::SUCCESS);
        assert_eq!(h.io_run(at(READ, 8, 8)), Status::SUCCESS);
        assert_eq!(h.io_run(at(VERIFY, 8, 8)), Status::SUCCESS);
        assert_eq!(lba_status(&mut h, 0, 0, 1023), (2, vec![]));
        // Format NVM clears every mark
        assert_eq!(h.io_run(at(WRITE_UNCOR, 100, 3)), Status::SUCCESS);
        assert_eq!(h.io_run(at(READ, 101, 1)), unc);
        assert_eq!(admin_run(&mut h, sqe(FORMAT, 1, 0, &[0])), Status::SUCCESS);
        assert_eq!(h.io_run(at(READ, 100, 3)), Status::SUCCESS);
        assert!(h.ctrl.namespaces[0].uncorrectable.is_empty());
        assert_eq!(h.ctrl.compares, 0, "every Verify buffer given back");
    }

    /// A backend that takes at most 4 KiB per request and records what it was sent.
    struct Capped {
        inner: MallocBackend,
        sizes: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    }

    impl crate::backend::Backend for Capped {
        fn describe(&self) -> String {
            "capped".into()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn submit(&mut self, req: &crate::backend::IoRequest<'_>) -> Result<(), Status> {
            self.sizes.lock().unwrap().push(req.len());
            if req.len() > 4096 {
                return Err(Status::INVALID_FIELD);
            }
            self.inner.submit(req)
        }
        fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
            self.inner.poll(done)
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn max_transfer(&self) -> Option<u64> {
            Some(4096)
        }
    }

    /// A read or write above what the namespace's backend takes in one request (the
    /// controller's MDTS is larger) goes in pieces over ranges of the command's buffers,
    /// and the data lands where the PRPs say.
    #[test]
    fn a_transfer_above_the_backends_limit_goes_in_pieces() {
        let sizes = std::sync::Arc::default();
        let backend = Capped {
            inner: MallocBackend::new(1 << 20).unwrap(),
            sizes: std::sync::Arc::clone(&sizes),
        };
        let mut h = Harness::new(vec![Namespace::new(1, Box::new(backend), 9, "t")]);
        assert!(
            h.ctrl.max_transfer() > 16384,
            "MDTS above the backend's limit"
        );
        // 18 KiB from page offset 0x200: five pages, PRP2 points at a list of four
        let (list, out_list) = (DATA + 0x8000, DATA + 0x9000);
        let prps = |base: u64| -> Vec<u8> {
            (1..5u64)
                .flat_map(|k| (base + k * 0x1000).to_le_bytes())
                .collect()
        };
        h.write(list, &prps(DATA));
        h.write(out_list, &prps(DATA + 0xa000));
        let data: Vec<u8> = (0..18432u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        h.write(DATA + 0x200, &data);
        let rw = |op: u8, prp1: u64, prp2: u64| {
            let mut s = sqe(op, 1, prp1, &[3, 0, 36 - 1]);
            s[32..40].copy_from_slice(&prp2.to_le_bytes());
            s
        };
        assert_eq!(h.io_run(rw(WRITE, DATA + 0x200, list)), Status::SUCCESS);
        assert_eq!(
            h.io_run(rw(READ, DATA + 0xa000 + 0x200, out_list)),
            Status::SUCCESS
        );
        assert_eq!(h.read(DATA + 0xa200, 18432), data);
        let sent = sizes.lock().unwrap().clone();
        assert_eq!(sent, [4096, 4096, 4096, 4096, 2048].repeat(2), "pieces");
        assert_eq!(h.ctrl.part_lists, 0, "every piece list given back");
    }

    /// A Verify reads through the backend asynchronously: held while the backend holds it,
    /// at most MAX_COMPARES of them (with the Compares) in flight, each completing with the
    /// read's status.
    #[test]
    fn verify_reads_through_the_backend_without_waiting() {
        let (b, st) = HeldBackend::new(1 << 20);
        let mut h = Harness::new(vec![Namespace::new(1, Box::new(b), 9, "V")]);
        st.lock().unwrap().frozen = true;
        let n = MAX_COMPARES + 1;
        let cids: Vec<u16> = (0..n).map(|_| h.io(at(VERIFY, 0, 64))).collect();
        for _ in 0..50 {
            assert_eq!(h.reap(false), []);
        }
        assert_eq!(st.lock().unwrap().log, vec![IoOp::Read; MAX_COMPARES]);
        st.lock().unwrap().fail = Some((|o| *o == IoOp::Read, Status::WRITE_FAULT));
        st.lock().unwrap().frozen = false;
        let mut got = h.wait(false, n);
        got.sort_unstable_by_key(|g| g.0);
        let want: Vec<_> = cids.iter().map(|&c| (c, Status::WRITE_FAULT)).collect();
        assert_eq!(got, want, "the read's status is the Verify's");
        assert_eq!(h.ctrl.compares, 0);
    }
}
