//! Hot path, hops 4-5: backend completions are reaped and each command's CQE is posted
//! (NVMe base 2.0 §4.2.4), freeing its slot and counting it in the statistics; the
//! interrupt that follows is `interrupt.rs`.

use std::sync::Arc;

use nvme_spec::{Completion, Status};
use zerocopy::IntoBytes;

use crate::memory::MemoryMap;

use super::{Controller, OWN_FLUSH_QID};

impl Controller {
    /// Collect backend completions and post them; drop detached namespaces that are done.
    pub(super) fn reap(&mut self, mem: &Arc<MemoryMap>) -> usize {
        for ns in &mut self.namespaces {
            if ns.backend.in_flight() > 0 {
                ns.backend.poll_into(&mut self.done);
            }
        }
        if !self.detaching.is_empty() {
            for d in &mut self.detaching {
                if d.ns.backend.in_flight() > 0 {
                    d.ns.backend.poll_into(&mut self.done);
                }
            }
        } else if self.done.is_empty() {
            self.done_stamp = None; // as below: the waiting commands read the clock afresh
            return 0; // the common idle case: nothing more to look at
        }
        let mut done = std::mem::take(&mut self.done);
        let n = done.len();
        self.done_stamp = None; // this pass's completions read the clock once, afresh
        for &(t, status) in &done {
            self.request_finished(t, status, mem);
        }
        self.done_stamp = None;
        if n > 0 {
            self.check_pool_warning(mem);
            self.check_sizes();
        }
        done.clear();
        self.done = done;
        if !self.detaching.is_empty() {
            self.poll_detaching();
        }
        n
    }

    /// A namespace's backend changed size (a resized volume): Namespace Attribute Changed,
    /// as for an attachment (the host reads Identify again).
    fn check_sizes(&mut self) {
        let mut changed = Vec::new();
        for ns in &mut self.namespaces {
            let now = ns.blocks();
            if now != ns.reported_blocks {
                ns.reported_blocks = now;
                changed.push(ns.nsid);
            }
        }
        for nsid in changed {
            log::info!("{}: namespace {nsid} changed size", self.cfg.serial);
            self.admin.changed_ns.record(nsid);
            self.events_unsaved = true;
            if self.is_ready()
                && self.admin.features.async_event_config
                    & crate::state::changed_namespaces::NS_ATTRIBUTE_NOTICES
                    != 0
            {
                let mem = self.mem.snapshot();
                self.raise_event(crate::state::changed_namespaces::NS_ATTRIBUTE_CHANGED, &mem);
            }
        }
    }

    /// A thin namespace's pool crossed its warning threshold: report it once (SMART /
    /// Health event, Available Spare below threshold) until it clears.
    fn check_pool_warning(&mut self, mem: &MemoryMap) {
        let now = self
            .namespaces
            .iter()
            .filter_map(|ns| ns.backend.capacity_warning())
            .min();
        match (self.admin.pool_warning, now) {
            (None, Some(_)) => {
                self.admin.pool_warning = now;
                self.events_unsaved = true;
                self.raise_event(
                    crate::state::async_events::AsyncEvent {
                        event_type: crate::state::async_events::event_type::SMART,
                        info: crate::state::async_events::smart_info::SPARE_BELOW_THRESHOLD,
                        log_page: nvme_spec::log_page::lid::SMART_HEALTH,
                    },
                    mem,
                );
            }
            (Some(_), _) => {
                self.events_unsaved |= self.admin.pool_warning != now;
                self.admin.pool_warning = now;
            }
            (None, None) => {}
        }
    }

    /// Backend request `t` finished with `status`: count it, and post its command's
    /// completion when it was the last the command waited for.
    pub(super) fn request_finished(&mut self, t: u64, status: Status, mem: &MemoryMap) {
        let (epoch, qid, slot) = crate::quiesce::untag(t);
        if epoch != self.quiesce.epoch() {
            self.quiesce.stale_completion(epoch);
            return;
        }
        if qid == OWN_FLUSH_QID {
            self.quiesce.own_flush_done(slot, status);
            return;
        }
        let Some(result) = self.request_done(qid, slot, status) else {
            return; // more requests of the same command to come
        };
        // the body inlined: once per queued command, in the reap loop
        self.complete_known(qid, slot, result, 0, None, mem);
    }

    /// Post the completion of the command in `slot` of SQ `qid` and free the slot.
    pub(crate) fn complete(
        &mut self,
        qid: u16,
        slot: u16,
        status: Status,
        dw0: u32,
        mem: &MemoryMap,
    ) {
        self.complete_known(qid, slot, status, dw0, None, mem);
    }

    /// [`complete`](Self::complete) of a read or write an instant backend finished in its
    /// fetch pass: successful, on namespace `ns_idx` (the same body, with the status known
    /// and the namespace not looked up again).
    #[inline]
    pub(crate) fn complete_instant(&mut self, qid: u16, slot: u16, ns_idx: usize, mem: &MemoryMap) {
        self.complete_known(qid, slot, Status::SUCCESS, 0, Some(ns_idx), mem);
    }

    /// The body of [`complete`](Self::complete); `ns_idx` is the command's namespace when
    /// the caller knows it, which is an instant read or write (holding no guest memory).
    /// Inlined into both callers, so that each is compiled for what it knows (measured: 19
    /// instructions per instant I/O less than a shared body).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn complete_known(
        &mut self,
        qid: u16,
        slot: u16,
        status: Status,
        dw0: u32,
        ns_idx: Option<usize>,
        mem: &MemoryMap,
    ) {
        let Some(sq) = self
            .queues
            .sqs
            .get_mut(qid as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(ctx) = sq.slots.get_mut(slot as usize) else {
            return;
        };
        let (cid, opcode, nsid) = (ctx.cid, ctx.opcode, ctx.nsid);
        let (bytes, fetched) = (ctx.bytes, ctx.fetched);
        // what only some commands hold: guest memory (a queued request; let go inline), a
        // compound state, iovec storage (out of line)
        let mem_held = if ns_idx.is_none() {
            ctx.mem.take()
        } else {
            debug_assert!(
                ctx.mem.is_none(),
                "an instant command holds no guest memory"
            );
            None
        };
        let held = (ctx.compound.is_some() || ctx.iov.has_storage())
            .then(|| (ctx.compound.take(), ctx.iov.take_storage()));
        sq.free.push(slot);
        let sq_head = sq.head as u16;
        let cqid = sq.cqid;
        let finish_delete = sq.deleting.filter(|_| sq.in_flight() == 0);
        self.commands_in_flight = self.commands_in_flight.saturating_sub(1);
        drop(mem_held);
        if let Some(held) = held {
            self.release_held(held);
        }
        if self.quiesce.resetting.is_some() {
            if let Some(cq) = self.queues.cq_mut(cqid) {
                cq.reserved = cq.reserved.saturating_sub(1);
            }
            return; // the queues are going away: nothing is posted
        }
        if !status.is_success() {
            self.admin.errors.record(qid, cid, status, nsid, opcode);
        } else if qid != 0 {
            self.admin.smart.account(opcode, bytes); // SMART / Health (data units, commands)
        }
        self.count_command(qid, opcode, (nsid, ns_idx), bytes, fetched, status);
        let cqe = Completion {
            dw0: dw0.into(),
            dw1: 0.into(),
            sq_head: sq_head.into(),
            sq_id: qid.into(),
            cid: cid.into(),
            status: status.cqe_bits().into(),
        };
        if qid == 0 || finish_delete.is_some() {
            self.post_admin_completion(qid, slot, cqid, cqe, finish_delete, mem);
            return;
        }
        let Some(cq) = self.queues.cq_mut(cqid) else {
            return;
        };
        cq.reserved = cq.reserved.saturating_sub(1);
        // the journal: an I/O completion needs no record of its own (a restore finds the
        // completions posted since the last recorded tail in the CQ itself, by their phase:
        // see `snapshot.rs`), only its slot's release, after the CQE
        let posted = cq.post(mem, cqe);
        if let Some(j) = &self.journal {
            cq.tail_unrecorded |= posted.is_ok();
            j.freed(qid, slot);
        }
        if let Err(e) = posted {
            self.cq_not_writable(cqid, &e);
        }
    }

    /// What a command held until its completion goes back, besides its guest memory: its
    /// compound state's count, its iovec storage (out of line: the common read or write,
    /// queued or instant, holds neither).
    #[inline(never)]
    fn release_held(
        &mut self,
        (compound, storage): (
            Option<Box<crate::compound::Compound>>,
            Option<crate::dptr::IoVecBlock>,
        ),
    ) {
        if let Some(block) = storage {
            self.iov_pool.put(block);
        }
        if let Some(c) = compound {
            self.compound_done(&c);
        }
    }

    #[cold]
    fn cq_not_writable(&mut self, cqid: u16, e: &crate::memory::AccessError) {
        crate::error_limited!(
            "{}: CQ {cqid} not writable ({e}); controller fatal",
            self.cfg.serial
        );
        self.set_fatal();
    }

    /// [`complete`](Self::complete) of an admin command (its effect saved with its
    /// completion before it is posted), or of the last command of an SQ being deleted (the
    /// deletion's own completion follows).
    #[cold]
    fn post_admin_completion(
        &mut self,
        qid: u16,
        slot: u16,
        cqid: u16,
        cqe: Completion,
        finish_delete: Option<u16>,
        mem: &MemoryMap,
    ) {
        if qid == 0 {
            self.journal_admin_completion(slot, &cqe);
        }
        if let Some(cq) = self.queues.cqs[cqid as usize].as_mut() {
            cq.reserved = cq.reserved.saturating_sub(1);
            // the journal: an admin completion is recorded as being posted, then its CQ
            // tail; an I/O completion needs neither, only its slot's release
            let admin_journal = self.journal.as_ref().filter(|_| qid == 0);
            if let Some(j) = admin_journal {
                let mut b: [u8; 16] = cqe.as_bytes().try_into().unwrap_or([0; 16]);
                b[14] = b[14] & !1 | u8::from(cq.phase);
                j.posting(qid, slot, cq.tail, cq.phase, &b);
            }
            if let Err(e) = cq.post(mem, cqe) {
                self.cq_not_writable(cqid, &e);
            } else if let Some(j) = admin_journal {
                j.cq_moved(cqid, cq.tail, cq.phase);
            } else if self.journal.is_some() {
                cq.tail_unrecorded = true;
            }
        }
        if let Some(j) = &self.journal {
            j.freed(qid, slot);
        }
        if let Some(admin_slot) = finish_delete {
            self.queues.remove_sq(qid);
            self.complete(0, admin_slot, Status::SUCCESS, 0, mem);
        }
    }

    /// Count a completed command in the statistics: admin commands by outcome, I/O commands
    /// with their latency since the SQE fetch, by their namespace (`ns_idx` when the caller
    /// knows it, else looked up by `nsid`; the controller's totals
    /// add up its namespaces', [`crate::ControllerStats::io`]). The
    /// clock is read at the first fetch of a pass and at the first completion of a fetch or
    /// reap pass, so a latency is exact to within the passes around it. Inlined like
    /// [`complete_known`](Self::complete_known), its only caller (measured: a call cost 20
    /// instructions per command).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(super) fn count_command(
        &mut self,
        qid: u16,
        opcode: u8,
        (nsid, ns_idx): (u32, Option<usize>),
        bytes: u64,
        fetched: u64,
        status: Status,
    ) {
        if qid == 0 {
            self.stats.record_admin(status);
            return;
        }
        let now = *self.done_stamp.get_or_insert_with(sys_util::clock::ticks);
        let ns = self.tick_rate.ns(now.saturating_sub(fetched));
        match ns_idx.or_else(|| self.namespace_index(nsid)) {
            Some(i) => self.namespaces[i].stats.record(opcode, bytes, status, ns),
            None => self.stats.others.record(opcode, bytes, status, ns),
        }
        if !status.is_success() {
            self.stats.record_io_error(status);
        }
    }
}
