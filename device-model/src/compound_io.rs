//! Issuing and completing the backend requests of compound commands (see
//! [`crate::compound`] for what they are and how they are bounded).

use nvme_spec::{Status, Submission};

use crate::backend::{GuestBuffers, IoOp, IoRequest};
use crate::compound::{Compound, MAX_COMPARES, MAX_PART_LISTS, Part, Parts};
use crate::controller::{Controller, Outcome};

/// The compound kind of a command, if it has one: true for a Compare or a Verify, false for a command
/// with parts (Format NVM, Flush of every namespace, Dataset Management).
fn compound_kind(qid: u16, sqe: &Submission) -> Option<bool> {
    use nvme_spec::opcode::{admin, nvm};
    match (qid, sqe.opcode) {
        (0, admin::FORMAT_NVM) => Some(false),
        (0, _) => None,
        (_, nvm::COMPARE | nvm::VERIFY) => Some(true),
        (_, nvm::DATASET_MANAGEMENT) => Some(false),
        (_, nvm::FLUSH) if sqe.nsid.get() == u32::MAX => Some(false),
        _ => None,
    }
}

impl Controller {
    /// Run the command in `slot` of SQ `qid` as `parts`, at most `window` of them in flight
    /// at once.
    pub(crate) fn start_parts(
        &mut self,
        qid: u16,
        slot: u16,
        list: Vec<Part>,
        window: usize,
    ) -> Outcome {
        if list.is_empty() {
            return Outcome::status(Status::SUCCESS);
        }
        let Some(ctx) = self.queues.slot_mut(qid, slot) else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        ctx.compound = Some(Box::new(Compound::Parts(Parts {
            list,
            next: 0,
            in_flight: 0,
            window: window.max(1),
            status: Status::SUCCESS,
        })));
        self.part_lists += 1; // until the command completes
        self.submit_parts(qid, slot);
        match self.take_finished_parts(qid, slot) {
            Some(s) => Outcome::status(s),
            None => Outcome::Pending,
        }
    }

    /// Submit the next parts of the command in `slot` while its window has room and no part
    /// failed.
    fn submit_parts(&mut self, qid: u16, slot: u16) {
        let tag = self.tag(qid, slot);
        loop {
            let Some(p) = self.parts_mut(qid, slot) else {
                return;
            };
            if !p.status.is_success() || p.next == p.list.len() || p.in_flight >= p.window {
                return;
            }
            let part = p.list[p.next];
            p.next += 1;
            let started = match (self.namespace_index(part.nsid), part.data) {
                // detached since the command started
                (None, _) => Err(Status::INVALID_NAMESPACE),
                (Some(i), None) => self.namespaces[i].backend.submit(&IoRequest {
                    tag,
                    op: part.op,
                    offset: part.offset,
                    iov: GuestBuffers::EMPTY,
                }),
                (Some(i), Some((at, len))) => self.submit_data_part(qid, slot, i, part, at, len),
            };
            let Some(p) = self.parts_mut(qid, slot) else {
                return;
            };
            match started {
                Ok(()) => p.in_flight += 1,
                Err(s) => p.status = s,
            }
        }
    }

    /// Submit `part`, the piece `at..at + len` of the data of the read or write in `slot`,
    /// over that range of the command's buffers.
    fn submit_data_part(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        part: Part,
        at: u64,
        len: u64,
    ) -> Result<(), Status> {
        let tag = self.tag(qid, slot);
        let ctx = self
            .queues
            .slot_mut(qid, slot)
            .ok_or(Status::INTERNAL_ERROR)?;
        let mem = ctx.mem.as_ref().ok_or(Status::INTERNAL_ERROR)?;
        let mut piece = std::mem::take(&mut self.piece_buffers);
        piece.set_range(ctx.iov.buffers_in(mem), at, len);
        let r = self.namespaces[ns_idx].backend.submit(&IoRequest {
            tag,
            op: part.op,
            offset: part.offset,
            iov: piece.as_buffers(),
        });
        piece.clear();
        self.piece_buffers = piece;
        r
    }

    /// The parts of the command in `slot`, if it has them.
    fn parts_mut(&mut self, qid: u16, slot: u16) -> Option<&mut Parts> {
        self.queues
            .slot_mut(qid, slot)?
            .compound
            .as_deref_mut()?
            .parts()
    }

    /// The final status of the compound command in `slot` if it finished (its bookkeeping
    /// goes when it completes, [`Controller::complete`]).
    fn take_finished_parts(&mut self, qid: u16, slot: u16) -> Option<Status> {
        let p = self.parts_mut(qid, slot)?;
        p.finished().then_some(p.status)
    }

    /// Hold the command in `slot` back when [`MAX_COMPARES`] or [`MAX_PART_LISTS`] of its
    /// kind are in flight: true when it now waits ([`Controller::start_waiting`]).
    pub(crate) fn wait_for_room(&mut self, qid: u16, slot: u16, sqe: &Submission) -> bool {
        if self.has_room(qid, sqe) {
            return false;
        }
        self.waiting.push_back((qid, slot, *sqe));
        true
    }

    fn has_room(&self, qid: u16, sqe: &Submission) -> bool {
        match compound_kind(qid, sqe) {
            Some(true) => self.compares < MAX_COMPARES,
            Some(false) => self.part_lists < MAX_PART_LISTS,
            None => true,
        }
    }

    /// A compound command finished: let go of what its kind counts.
    pub(crate) fn compound_done(&mut self, c: &Compound) {
        match c {
            Compound::Compare(_) | Compound::Verify(_) => {
                self.compares = self.compares.saturating_sub(1);
            }
            Compound::Parts(_) => self.part_lists = self.part_lists.saturating_sub(1),
        }
    }

    /// Dispatch again the waiting commands that have room now, in order.
    pub(crate) fn start_waiting(&mut self, mem: &std::sync::Arc<crate::memory::MemoryMap>) {
        if self.compares >= MAX_COMPARES && self.part_lists >= MAX_PART_LISTS {
            return;
        }
        let mut waiting = std::mem::take(&mut self.waiting);
        for _ in 0..waiting.len() {
            let Some((qid, slot, sqe)) = waiting.pop_front() else {
                break;
            };
            if !self.has_room(qid, &sqe) {
                waiting.push_back((qid, slot, sqe));
                continue;
            }
            self.dispatch(qid, slot, &sqe, mem);
        }
        waiting.append(&mut self.waiting);
        self.waiting = waiting;
    }

    /// A backend request of the command in `slot` finished with `status`: the command's
    /// final status when that was the last one to wait for. A Compare's read is compared
    /// here. `None` for a compound command with parts still to come.
    pub(crate) fn request_done(&mut self, qid: u16, slot: u16, status: Status) -> Option<Status> {
        let resetting = self.quiesce.resetting.is_some();
        let ctx = self.queues.slot_mut(qid, slot)?;
        if let Some(p) = ctx.compound.as_deref_mut().and_then(Compound::parts) {
            p.in_flight = p.in_flight.saturating_sub(1);
            if p.status.is_success() {
                p.status = status;
            }
            if resetting {
                p.next = p.list.len(); // the queues are going away: start nothing more
            }
            self.submit_parts(qid, slot);
            return self.take_finished_parts(qid, slot);
        }
        if let Some(Compound::Compare(buf)) = ctx.compound.as_deref()
            && status.is_success()
        {
            let (host, media) = buf.split_at(buf.len() / 2);
            return Some(if host == media {
                Status::SUCCESS
            } else {
                Status::COMPARE_FAILURE
            });
        }
        Some(status)
    }

    /// The byte range a Compare or a Verify reads from the media: in the namespace, at most
    /// the maximum transfer size (Invalid Field otherwise), and no block marked
    /// uncorrectable (Unrecovered Read Error otherwise).
    fn media_read_range(&self, ns_idx: usize, sqe: &Submission) -> Result<(u64, u64), Status> {
        let (offset, len) = self.lba_range(ns_idx, sqe)?;
        if len > self.max_transfer() {
            return Err(Status::INVALID_FIELD);
        }
        if self.is_uncorrectable(ns_idx, offset, len) {
            return Err(Status::UNRECOVERED_READ_ERROR);
        }
        Ok((offset, len))
    }

    /// Compare (NVM command set 1.0 §3.2.1): the host's data is copied now, the blocks are
    /// read into a buffer of ours behind it, and the two compared when the read completes
    /// ([`Controller::request_done`]). With [`MAX_COMPARES`] in flight the command waits.
    pub(crate) fn compare(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        sqe: &Submission,
        mem: &crate::memory::MemoryMap,
    ) -> Outcome {
        let (offset, len) = match self.media_read_range(ns_idx, sqe) {
            Ok(r) => r,
            Err(s) => return Outcome::status(s),
        };
        if self.wait_for_room(qid, slot, sqe) {
            return Outcome::Pending;
        }
        let len = len as usize;
        let s = self.copy_from_host(sqe, len, mem, true);
        if !s.is_success() {
            return Outcome::status(s);
        }
        // a rare command: a buffer of its own, bounded by MDTS and MAX_COMPARES
        let mut buf = vec![0u8; 2 * len];
        buf[..len].copy_from_slice(&self.bounce[..len]);
        self.read_into_own_buffer(qid, slot, ns_idx, offset, Compound::Compare(buf))
    }

    /// Verify (NVM command set 1.0 §3.2.5, ONCS bit 7): the blocks are read into a buffer of
    /// ours (nothing goes to the host) and the command reports how the read went;
    /// uncorrectable blocks fail it with Unrecovered Read Error. Limited to the Verify Size
    /// Limit, reported equal to MDTS (Identify CNS 06h VSL): a larger one is Invalid Field in
    /// Command. Counted with the Compares ([`MAX_COMPARES`]).
    pub(crate) fn verify(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        sqe: &Submission,
    ) -> Outcome {
        let (offset, len) = match self.media_read_range(ns_idx, sqe) {
            Ok(r) => r,
            Err(s) => return Outcome::status(s),
        };
        if self.wait_for_room(qid, slot, sqe) {
            return Outcome::Pending;
        }
        let buf = vec![0u8; len as usize];
        self.read_into_own_buffer(qid, slot, ns_idx, offset, Compound::Verify(buf))
    }

    /// Start the read of a Compare or a Verify into the media part of its buffer (kept in
    /// the command's slot until the command completes).
    fn read_into_own_buffer(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        offset: u64,
        compound: Compound,
    ) -> Outcome {
        let tag = self.tag(qid, slot);
        let Some(ctx) = self.queues.slot_mut(qid, slot) else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        // the buffer is one segment: it needs no storage lent (`IoVecs::empty`)
        let compound = ctx.compound.insert(Box::new(compound));
        let Some(media) = compound.media() else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        ctx.bytes = media.len() as u64;
        // SAFETY: the buffer is the slot's own, freed only when the command completes (after
        // the backend answered, `Controller::complete`) or with the slot (a reset keeps a
        // slot with requests in flight until they are answered, `crate::quiesce`); nothing
        // reads it before the read's completion is reaped.
        if let Err(s) = unsafe { ctx.iov.set_buffer(media) } {
            return Outcome::status(s);
        }
        self.compares += 1;
        let ctx = self.queues.slot(qid, slot);
        let Some(ctx) = ctx else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        let req = IoRequest {
            tag,
            op: IoOp::Read,
            offset,
            iov: ctx.iov.buffers(),
        };
        match self.namespaces[ns_idx].backend.submit(&req) {
            Ok(()) => Outcome::Pending,
            Err(s) => Outcome::status(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use nvme_spec::Status;

    use super::{MAX_COMPARES, MAX_PART_LISTS};
    use crate::backend::{Backend, FileBackend, IoOp, MallocBackend};
    use crate::namespace::Namespace;
    use crate::test_harness::{DATA, Harness, HeldBackend, HeldState, sqe};

    const READ: u8 = 0x02;
    const WRITE: u8 = 0x01;
    const FLUSH: u8 = 0x00;
    const COMPARE: u8 = 0x05;
    const DSM: u8 = 0x09;
    const FORMAT: u8 = 0x80;

    /// 8 blocks (4 KiB) of a pattern, seeded.
    fn pattern(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
            .collect()
    }

    /// 8 blocks of namespace 1 at `lba`, read through the controller.
    fn read8(h: &mut Harness, lba: u32) -> Vec<u8> {
        let st = h.io_run(sqe(READ, 1, DATA + 0x8000, &[lba, 0, 7]));
        assert_eq!(st, Status::SUCCESS, "read LBA {lba}");
        h.read(DATA + 0x8000, 4096)
    }

    /// Dataset Management ranges (8 blocks each at `lbas`) at `DATA + 0x4000`.
    fn dsm_ranges(h: &Harness, lbas: &[u64]) {
        let mut r = Vec::new();
        for &lba in lbas {
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&8u32.to_le_bytes());
            r.extend_from_slice(&lba.to_le_bytes());
        }
        h.write(DATA + 0x4000, &r);
    }

    fn dsm(nr: u32) -> [u8; 64] {
        sqe(DSM, 1, DATA + 0x4000, &[nr - 1, 1 << 2])
    }

    /// Every command of the compound set on namespace 1 over `backend`, with its data
    /// effect: Compare equal and not, Flush of the namespace and of all, Dataset Management
    /// (its ranges read as zeroes, the rest untouched; a range out of range fails it before
    /// anything is deallocated), Format NVM (everything reads as zeroes) and its refusals.
    fn commands_and_their_effect(backend: Box<dyn Backend>) {
        let mut h = Harness::new(vec![Namespace::new(1, backend, 9, "T")]);
        let data = pattern(3);
        h.write(DATA, &data);
        for lba in [0, 8, 16, 24] {
            let st = h.io_run(sqe(WRITE, 1, DATA, &[lba, 0, 7]));
            assert_eq!(st, Status::SUCCESS);
        }
        // Compare
        assert_eq!(h.io_run(sqe(COMPARE, 1, DATA, &[8, 0, 7])), Status::SUCCESS);
        let mut other = data.clone();
        other[4095] ^= 0x10;
        h.write(DATA + 0x1000, &other);
        assert_eq!(
            h.io_run(sqe(COMPARE, 1, DATA + 0x1000, &[8, 0, 7])),
            Status::COMPARE_FAILURE
        );
        assert_eq!(
            h.io_run(sqe(COMPARE, 1, DATA, &[2047, 0, 7])),
            Status::LBA_OUT_OF_RANGE
        );
        // Flush, of namespace 1 and of every namespace
        assert_eq!(h.io_run(sqe(FLUSH, 1, 0, &[])), Status::SUCCESS);
        assert_eq!(h.io_run(sqe(FLUSH, u32::MAX, 0, &[])), Status::SUCCESS);
        // Dataset Management: a range past the end fails it, nothing deallocated
        dsm_ranges(&h, &[8, 2044]);
        assert_eq!(h.io_run(dsm(2)), Status::LBA_OUT_OF_RANGE);
        assert!(
            read8(&mut h, 8) == data,
            "nothing deallocated by a refused DSM"
        );
        dsm_ranges(&h, &[8, 16]);
        assert_eq!(h.io_run(dsm(2)), Status::SUCCESS);
        for (lba, zeroed) in [(0, false), (8, true), (16, true), (24, false)] {
            let got = read8(&mut h, lba);
            if zeroed {
                assert!(got.iter().all(|&b| b == 0), "LBA {lba} deallocated");
            } else {
                assert!(got == data, "LBA {lba} kept");
            }
        }
        // without the Deallocate attribute nothing happens
        assert_eq!(
            h.io_run(sqe(DSM, 1, DATA + 0x4000, &[0, 0])),
            Status::SUCCESS
        );
        assert!(read8(&mut h, 0) == data);
        // Format NVM: LBA format 0 only, SES 0 or 1, an attached namespace
        for (nsid, cdw10, want) in [
            (1, 1, Status::INVALID_FORMAT),
            (1, 2 << 9, Status::INVALID_FIELD),
            (7, 0, Status::INVALID_NAMESPACE),
            (1, 1 << 9, Status::SUCCESS),
        ] {
            let c = h.admin(sqe(FORMAT, nsid, 0, &[cdw10]));
            assert_eq!(h.admin_wait(c), want, "Format NSID {nsid} CDW10 {cdw10:#x}");
        }
        for lba in [0, 24, 2040] {
            assert!(read8(&mut h, lba).iter().all(|&b| b == 0), "formatted");
        }
        // everything in flight finished and every Compare buffer and part list is back
        assert_eq!((h.ctrl.compares, h.ctrl.part_lists), (0, 0));
        assert_eq!(h.ctrl.commands_in_flight, 0);
    }

    #[test]
    fn compare_flush_dsm_and_format_on_a_malloc_namespace() {
        commands_and_their_effect(Box::new(MallocBackend::new(1 << 20).unwrap()));
    }

    #[test]
    fn compare_flush_dsm_and_format_on_a_file_namespace() {
        let dir = std::env::temp_dir().join(format!("vnvme-compound-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ns.img");
        commands_and_their_effect(Box::new(FileBackend::open(&p, Some(1 << 20)).unwrap()));
        // the formatted file is a hole, not a file of zeroes
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&p).unwrap().blocks();
        assert!(
            blocks < 64,
            "{blocks} blocks of 512 bytes still allocated after Format"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A controller over a held (stalled) backend; namespace 1.
    fn held() -> (Harness, Arc<Mutex<HeldState>>) {
        let (b, st) = HeldBackend::new(1 << 20);
        let h = Harness::new(vec![Namespace::new(1, Box::new(b), 9, "H")]);
        (h, st)
    }

    fn set_frozen(st: &Mutex<HeldState>, frozen: bool) {
        st.lock().unwrap().frozen = frozen;
    }

    /// A stalled backend: Flush of every namespace, a 3-range DSM, Compares and Format NVM
    /// stay in flight while the controller keeps polling (nothing waits), a DSM has one
    /// range at a time in the backend, Compares beyond MAX_COMPARES wait for a buffer; once
    /// the backend answers, each completes with its status.
    #[test]
    fn long_commands_wait_on_the_backend_not_on_the_reactor() {
        let (mut h, st) = held();
        let data = pattern(9);
        h.write(DATA, &data);
        assert_eq!(h.io_run(sqe(WRITE, 1, DATA, &[0, 0, 7])), Status::SUCCESS);
        let mut other = data.clone();
        other[0] ^= 2;
        h.write(DATA + 0x1000, &other);
        dsm_ranges(&h, &[64, 72, 80]);
        set_frozen(&st, true);
        st.lock().unwrap().log.clear();
        let mut cids = vec![h.io(sqe(FLUSH, u32::MAX, 0, &[])), h.io(dsm(3))];
        for i in 0..MAX_COMPARES + 2 {
            let buf = if i % 2 == 0 { DATA } else { DATA + 0x1000 };
            cids.push(h.io(sqe(COMPARE, 1, buf, &[0, 0, 7])));
        }
        assert_eq!(h.reap(false), []); // fetched and started: the Format comes after them
        let format = h.admin(sqe(FORMAT, 1, 0, &[0]));
        for _ in 0..200 {
            assert_eq!(h.reap(false), [], "I/O completed on a stalled backend");
            assert_eq!(h.reap(true), [], "Format completed on a stalled backend");
        }
        {
            let s = st.lock().unwrap();
            let count = |f: fn(&IoOp) -> bool| s.log.iter().filter(|o| f(o)).count();
            assert_eq!(count(|o| *o == IoOp::Flush), 1);
            assert_eq!(
                count(|o| *o == IoOp::Read),
                MAX_COMPARES,
                "Compares beyond the cap wait"
            );
            assert_eq!(
                count(|o| *o == IoOp::Deallocate { len: 4096 }),
                1,
                "one DSM range at a time: {:?}",
                s.log
            );
            assert_eq!(
                count(|o| *o == IoOp::Deallocate { len: 1 << 20 }),
                1,
                "Format"
            );
        }
        set_frozen(&st, false);
        let mut got = h.wait(false, cids.len());
        got.sort_unstable_by_key(|g| g.0);
        let mut want = vec![(cids[0], Status::SUCCESS), (cids[1], Status::SUCCESS)];
        for (i, &c) in cids[2..].iter().enumerate() {
            want.push((
                c,
                if i % 2 == 0 {
                    Status::SUCCESS
                } else {
                    Status::COMPARE_FAILURE
                },
            ));
        }
        // the Format's deallocate went to the backend before the later Compares' reads:
        // those compare against zeroes
        let log = st.lock().unwrap().log.clone();
        let format_at = log
            .iter()
            .position(|o| *o == IoOp::Deallocate { len: 1 << 20 })
            .unwrap();
        let late_reads = log[format_at..]
            .iter()
            .filter(|o| **o == IoOp::Read)
            .count();
        let n = want.len();
        for w in &mut want[n - late_reads..] {
            w.1 = Status::COMPARE_FAILURE;
        }
        want.sort_unstable_by_key(|w| w.0);
        assert_eq!(got, want);
        assert_eq!(h.admin_wait(format), Status::SUCCESS);
        assert_eq!(st.lock().unwrap().most_held, 2 + MAX_COMPARES + 1);
        let log = st.lock().unwrap().log.clone();
        let ranges = log
            .iter()
            .filter(|o| **o == IoOp::Deallocate { len: 4096 })
            .count();
        assert_eq!(ranges, 3, "every DSM range deallocated: {log:?}");
        assert_eq!((h.ctrl.compares, h.ctrl.part_lists), (0, 0));
    }

    /// Commands with parts beyond MAX_PART_LISTS wait, fetched, for one to finish: a
    /// stalled backend sees MAX_PART_LISTS Flushes; once it answers, every command
    /// completes.
    #[test]
    fn commands_with_parts_beyond_the_cap_wait_their_turn() {
        let (mut h, st) = held();
        set_frozen(&st, true);
        let n = MAX_PART_LISTS + 3;
        assert!(n < crate::test_harness::QSIZE as usize);
        let cids: Vec<u16> = (0..n).map(|_| h.io(sqe(FLUSH, u32::MAX, 0, &[]))).collect();
        for _ in 0..20 {
            assert_eq!(h.reap(false), []);
        }
        assert_eq!(st.lock().unwrap().held, MAX_PART_LISTS);
        set_frozen(&st, false);
        let mut got = h.wait(false, n);
        got.sort_unstable_by_key(|g| g.0);
        let want: Vec<_> = cids.iter().map(|&c| (c, Status::SUCCESS)).collect();
        assert_eq!(got, want);
        assert_eq!(st.lock().unwrap().log.len(), n);
        assert_eq!((h.ctrl.part_lists, h.ctrl.waiting.len()), (0, 0));
    }

    /// Format of every namespace and Flush of every namespace report the first error of
    /// their parts; the others still run.
    #[test]
    fn commands_on_every_namespace_report_the_first_error() {
        let (a, sa) = HeldBackend::new(1 << 20);
        let (b, sb) = HeldBackend::new(1 << 20);
        let mut h = Harness::new(vec![
            Namespace::new(1, Box::new(a), 9, "A"),
            Namespace::new(2, Box::new(b), 9, "B"),
        ]);
        sb.lock().unwrap().fail = Some((|_| true, Status::WRITE_FAULT));
        assert_eq!(h.io_run(sqe(FLUSH, u32::MAX, 0, &[])), Status::WRITE_FAULT);
        let c = h.admin(sqe(FORMAT, u32::MAX, 0, &[0]));
        assert_eq!(h.admin_wait(c), Status::WRITE_FAULT);
        let sent = |s: &Mutex<HeldState>| s.lock().unwrap().log.clone();
        assert_eq!(sent(&sa), [IoOp::Flush, IoOp::Deallocate { len: 1 << 20 }]);
        assert_eq!(sent(&sb), [IoOp::Flush, IoOp::Deallocate { len: 1 << 20 }]);
        // a failing DSM range stops the ones after it
        sb.lock().unwrap().log.clear();
        dsm_ranges(&h, &[0, 8, 16]);
        let st = h.io_run(sqe(DSM, 2, DATA + 0x4000, &[2, 1 << 2]));
        assert_eq!(st, Status::WRITE_FAULT);
        assert_eq!(sent(&sb).len(), 1, "no range after the failed one");
    }

    /// A reset while compound commands wait on a stalled backend: the host re-enables before
    /// the reset's wait is over, so their requests are retired (the Compare's buffer kept);
    /// when the backend answers, the late answers are dropped (no part of the DSM is sent
    /// after the reset, nothing reaches the new queues) and the retired slots let go.
    #[test]
    fn a_reset_retires_compound_commands_and_drops_their_late_answers() {
        let (mut h, st) = held();
        dsm_ranges(&h, &[0, 8, 16]);
        set_frozen(&st, true);
        h.io(dsm(3));
        h.io(sqe(COMPARE, 1, DATA, &[0, 0, 7]));
        h.io(sqe(FLUSH, u32::MAX, 0, &[]));
        h.admin(sqe(FORMAT, u32::MAX, 0, &[0]));
        for _ in 0..10 {
            h.ctrl.poll();
        }
        assert_eq!(st.lock().unwrap().held, 4);
        h.ctrl.write_register(0x14, 0, 4); // CC.EN = 0: waits for the backend
        assert!(h.ctrl.is_resetting());
        h.enable(); // the host stops waiting: the 4 requests are retired
        assert!(!h.ctrl.is_resetting());
        assert!(h.ctrl.is_quiescing(), "retired requests are still out");
        set_frozen(&st, false);
        for _ in 0..10 {
            assert_eq!(h.reap(false), [], "a late answer reached the new queues");
            assert_eq!(
                h.reap(true),
                [],
                "a late answer reached the new admin queue"
            );
        }
        assert!(!h.ctrl.is_quiescing(), "the retired slots were let go");
        let s = st.lock().unwrap();
        let ranges = s
            .log
            .iter()
            .filter(|o| **o == IoOp::Deallocate { len: 4096 })
            .count();
        assert_eq!(ranges, 1, "DSM ranges sent after the reset: {:?}", s.log);
        drop(s);
        // and the controller works on
        assert_eq!(h.io_run(sqe(FLUSH, u32::MAX, 0, &[])), Status::SUCCESS);
        assert_eq!(h.ctrl.compares, 0);
    }

    /// A shutdown notification (CC.SHN) flushes every namespace without waiting for it:
    /// SHST stays "occurring" while the backend holds the Flush, "complete" once it answered.
    #[test]
    fn a_shutdown_notification_flushes_without_blocking() {
        let (mut h, st) = held();
        set_frozen(&st, true);
        h.ctrl
            .write_register(0x14, (1 << 14) | (6 << 16) | (4 << 20) | 1, 4);
        for _ in 0..100 {
            h.ctrl.poll();
        }
        let shst = |h: &Harness| (h.ctrl.read_register(0x1c, 4) >> 2) & 3;
        assert_eq!(shst(&h), 1, "shutdown occurring while the flush is held");
        assert_eq!(st.lock().unwrap().log, [IoOp::Flush]);
        set_frozen(&st, false);
        h.ctrl.poll();
        h.ctrl.poll();
        assert_eq!(shst(&h), 2, "shutdown complete once the flush answered");
    }

    /// The daemon's flush at stop waits for the backends' Flush through submit and poll.
    #[test]
    fn the_daemon_flush_waits_for_every_namespace() {
        let (a, sa) = HeldBackend::new(1 << 20);
        let (b, sb) = HeldBackend::new(1 << 20);
        let mut h = Harness::new(vec![
            Namespace::new(1, Box::new(a), 9, "A"),
            Namespace::new(2, Box::new(b), 9, "B"),
        ]);
        assert_eq!(h.ctrl.flush(), Ok(()));
        assert_eq!(sa.lock().unwrap().log, [IoOp::Flush]);
        sb.lock().unwrap().fail = Some((|o| *o == IoOp::Flush, Status::WRITE_FAULT));
        assert_eq!(h.ctrl.flush(), Err(Status::WRITE_FAULT));
    }

    /// A namespace detached with a read in flight on a stalled backend: gone for the host at
    /// once (the controller does not wait), the read still completes once the backend
    /// answers, and the backend is dropped then.
    #[test]
    fn a_detach_does_not_wait_for_the_namespace_requests() {
        let (mut h, st) = held();
        set_frozen(&st, true);
        let r = h.io(sqe(READ, 1, DATA, &[0, 0, 7]));
        h.ctrl.poll();
        h.ctrl.apply(crate::NamespaceChange::Detach(1));
        assert_eq!(
            h.io_run(sqe(READ, 1, DATA, &[0, 0, 7])),
            Status::INVALID_NAMESPACE,
            "detached at once"
        );
        assert_eq!(
            Arc::strong_count(&st),
            2,
            "the backend is kept while its read is out"
        );
        set_frozen(&st, false);
        assert_eq!(h.wait(false, 1), [(r, Status::SUCCESS)]);
        assert_eq!(Arc::strong_count(&st), 1, "and dropped once it answered");
    }
}
