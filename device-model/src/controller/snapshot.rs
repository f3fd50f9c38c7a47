//! A controller's state exported to, and imported from, its state memfd
//! ([`crate::journal`]) so that another worker process can carry on with it: after a planned
//! upgrade (fetching held, commands drained, state saved) and after a crash (the hot
//! journal tells which commands were fetched and not completed; the CQs past their recorded
//! tails, which completions were posted since; an admin completion's record, whether it was
//! being posted).
//!
//! The slow-state blob (registers, features, queues, the admin completion being posted,
//! QoS limits, SMART counters and error log, asynchronous events) is encoded and decoded in
//! `snapshot_blob.rs`. Namespaces added or removed at run time are not carried here: the
//! supervisor replays those calls to the next worker.

use std::fmt::Write as _;
use std::sync::Arc;

use nvme_spec::{Completion, Submission};
use zerocopy::{FromBytes, IntoBytes};

use super::snapshot_blob::PendingAdmin;

use crate::journal::{self, Journal, JournalError};
use crate::memory::MemoryMap;
use crate::queue::{CompletionQueue, SubmissionQueue};
use crate::registers::{Aqa, Cc, Csts};
use crate::shadow_doorbell::DoorbellSeen;
use crate::virt_link::VirtRole;

use super::Controller;

const OP_ASYNC_EVENT_REQUEST: u8 = 0x0c;

/// What a restore found and did (logged by the worker, counted by tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// A saved, enabled controller was brought back.
    pub enabled: bool,
    /// Commands fetched and not completed, run again.
    pub reissued: usize,
    /// Completions that were being posted: written now, or found already in the guest's CQ.
    pub reposted: usize,
    pub found_posted: usize,
}

/// A doorbell as the last worker saw it: without shadow doorbells the register itself (it
/// holds the host's latest value); with them, what the last worker recorded (the poll loop
/// then notices any newer write of the register or the shadow copy, whichever the host uses
/// for this queue: Linux rings its admin queue through the register only).
fn seen(j: &Journal, regs: &crate::Doorbells, shadow: bool, qid: u16, cq: bool) -> DoorbellSeen {
    if !shadow {
        let register = regs.load(2 * qid as usize + usize::from(cq));
        return DoorbellSeen {
            register,
            shadow: 0,
            value: register,
        };
    }
    j.doorbell(qid, cq)
}

/// Move `cq`'s tail (restored from its last record) past the completions posted since: the
/// entries from there on whose phase tag is the current one (a CQE's phase is written last,
/// and the guest never writes its CQ). Their SQ and command id go to `posted`. A lap at
/// most: an entry of the last lap has the other phase.
fn posted_since_record(mem: &MemoryMap, cq: &mut CompletionQueue, posted: &mut Vec<(u16, u16)>) {
    for _ in 1..cq.size {
        let mut e = Completion::default();
        let addr = cq.base.wrapping_add(u64::from(cq.tail) * 16);
        if mem.read(addr, e.as_mut_bytes()).is_err() || (e.status.get() & 1 != 0) != cq.phase {
            return;
        }
        posted.push((e.sq_id.get(), e.cid.get()));
        cq.advance_tail();
    }
}

impl Controller {
    /// Keep this controller's state in `journal` from now on (a worker under a supervisor).
    pub fn attach_journal(&mut self, journal: Journal) {
        self.journal = Some(Arc::new(journal));
    }

    /// Stop (or resume) fetching commands: a planned upgrade drains first.
    pub fn hold_fetch(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// True when nothing but parked Asynchronous Event Requests is in flight (the new
    /// worker parks those again from the journal).
    pub fn drained(&self) -> bool {
        let parked = self
            .queues
            .sq(0)
            .map_or(0, |sq| self.admin.events.slots.len().min(sq.in_flight()));
        self.commands_in_flight <= parked && self.quiesce.retired_requests() == 0
    }

    /// QoS limits changed by the management plane, asynchronous event state outside an
    /// admin command or SR-IOV assignments since the last save, or statistics a second old:
    /// save them (the next worker must keep a tenant's limits, report its events, keep its
    /// VFs and count on).
    pub(super) fn save_run_time_changes(&mut self) {
        if self.journal_owned
            && (self.events_unsaved
                || self.qos_control.generation() != self.qos_saved
                || self.virt_generation() != self.virt_saved
                || self.stats_due())
        {
            self.save_blob(None);
        }
    }

    /// The generation of the SR-IOV pools of a primary (0 for any other controller).
    fn virt_generation(&self) -> u64 {
        match &self.cfg.virt {
            Some(VirtRole::Primary(p)) => p.generation(),
            _ => 0,
        }
    }

    /// A primary's SR-IOV assignments as its journal saved them, put back before any of its
    /// secondaries runs (a new worker builds the primary first): the secondaries the host
    /// had online are online again, with their resources (NVMe base 2.0 §8.26). The rest of
    /// the state comes back with [`restore`](Self::restore).
    pub fn restore_sriov(&mut self) {
        let (Some(VirtRole::Primary(p)), Some(j)) = (self.cfg.virt.clone(), self.journal.clone())
        else {
            return;
        };
        let Some(saved) = j
            .load_blob()
            .and_then(|raw| self.decode(&raw))
            .and_then(|b| b.virt)
        else {
            return;
        };
        match p.restore(&saved) {
            Ok(()) => log::info!(
                "{}: SR-IOV state restored: {} of {} VFs online",
                self.cfg.serial,
                saved.secondaries.iter().filter(|s| s.online).count(),
                saved.secondaries.len()
            ),
            Err(e) => crate::error_limited!(
                "{}: saved SR-IOV state refused ({e:?}): VFs as the configuration has them",
                self.cfg.serial
            ),
        }
        self.virt_saved = p.generation();
    }

    /// Write the slow state now (a planned upgrade, after draining). Errors are logged.
    pub fn save_state(&mut self) {
        self.record_cq_tails();
        self.save_blob(None);
        log::info!("{}: state saved: {}", self.cfg.serial, self.queue_summary());
    }

    /// Record every queue's doorbell as the controller sees it now (Doorbell Buffer Config
    /// moved them onto the shadow page): the next worker must tell the shadow copies from
    /// the registers as this one does, or it takes a stale copy for a new value.
    pub(crate) fn journal_doorbells(&self) {
        let Some(j) = &self.journal else {
            return;
        };
        for sq in self.queues.sqs.iter().flatten() {
            j.doorbell_seen(sq.id, false, &sq.doorbell);
        }
        for cq in self.queues.cqs.iter().flatten() {
            j.doorbell_seen(cq.id, true, &cq.doorbell);
        }
    }

    /// Record the tails of the I/O CQs that moved since their last record (a planned
    /// upgrade; the poll loop does it once per pass).
    fn record_cq_tails(&mut self) {
        let Some(j) = &self.journal else {
            return;
        };
        for cq in self.queues.cqs.iter_mut().flatten() {
            if cq.tail_unrecorded {
                cq.tail_unrecorded = false;
                j.cq_moved(cq.id, cq.tail, cq.phase);
            }
        }
    }

    /// Each queue's position, live and as journalled (logged at upgrade and restore).
    fn queue_summary(&self) -> String {
        let j = self.journal.as_deref();
        let mut out = String::new();
        for &id in &self.queues.active_cqs {
            if let Some(c) = self.queues.cq(id) {
                let rec = j.map(|j| j.cq_tail(id));
                let _ = write!(
                    out,
                    "CQ{id} tail {} phase {} head {} (journal {rec:?}); ",
                    c.tail, c.phase, c.head
                );
            }
        }
        for &id in &self.queues.active_sqs {
            if let Some(q) = self.queues.sq(id) {
                let rec = j.map(|j| j.sq_head(id));
                let _ = write!(
                    out,
                    "SQ{id} head {} tail {} in flight {} (journal {rec:?}); ",
                    q.head,
                    q.tail,
                    q.in_flight()
                );
            }
        }
        out
    }

    /// Save the slow state, first bringing the hot records of queues created since the last
    /// save to their initial values (a queue id may have had an earlier life).
    pub(super) fn save_blob(&mut self, pending: Option<PendingAdmin>) {
        let Some(j) = self.journal.clone() else {
            return;
        };
        let now = self.queue_keys();
        for q in &now {
            if !self.journaled_queues.contains(q) {
                if q.0 {
                    j.init_sq(q.1, q.3);
                } else {
                    j.init_cq(q.1);
                }
            }
        }
        self.journaled_queues = now;
        self.journal_owned = true;
        self.qos_saved = self.qos_control.generation();
        self.virt_saved = self.virt_generation();
        self.events_unsaved = false;
        self.stats_saved();
        if let Err(e) = j.save_blob(&self.encode(pending)) {
            crate::error_limited!("{}: state not saved: {e}", self.cfg.serial);
        }
    }

    /// The queues as the journal knows them: SQ or CQ, id, base, size, reset epoch.
    fn queue_keys(&self) -> Vec<super::JournaledQueue> {
        let epoch = self.quiesce.epoch();
        let mut now = Vec::with_capacity(self.queues.active_sqs.len() * 2);
        for &id in &self.queues.active_cqs {
            if let Some(c) = self.queues.cq(id) {
                now.push((false, id, c.base, c.size, epoch));
            }
        }
        for &id in &self.queues.active_sqs {
            if let Some(s) = self.queues.sq(id) {
                now.push((true, id, s.base, s.size, epoch));
            }
        }
        now
    }

    /// Before an admin completion is posted: save the slow state with it, so that recovery
    /// either posts that very completion or finds it posted, and never runs the command again.
    pub(super) fn journal_admin_completion(&mut self, slot: u16, cqe: &Completion) {
        if self.journal.is_none() {
            return;
        }
        let Some(cq) = self.queues.cq(0) else {
            return;
        };
        let Some(rec) = self.journal.as_ref().and_then(|j| j.slot(0, slot)) else {
            return;
        };
        let mut bytes: [u8; 16] = cqe.as_bytes().try_into().unwrap_or([0; 16]);
        bytes[14] = bytes[14] & !1 | u8::from(cq.phase);
        let pending = PendingAdmin {
            slot,
            sq_pos: rec.sq_pos,
            cq_pos: cq.tail,
            phase: cq.phase,
            cqe: bytes,
        };
        self.save_blob(Some(pending));
    }

    /// Bring back the state saved in the journal (a new worker, after the supervisor replayed
    /// the client's memory map and interrupts). A fresh or unusable journal leaves the
    /// controller as it is (reset), which is also what a client would find after a reset.
    pub fn restore(&mut self) -> Result<Restored, JournalError> {
        let mut out = Restored::default();
        let Some(j) = self.journal.clone() else {
            return Ok(out);
        };
        // from here on the journal is this worker's to write (whatever it held is read now)
        self.journal_owned = true;
        if let Some(VirtRole::Primary(p)) = &self.cfg.virt {
            // the host's replayed configuration writes are in: VF Enable applies again
            p.resume();
        }
        let Some(raw) = j.load_blob() else {
            return Ok(out);
        };
        let Some(b) = self.decode(&raw) else {
            crate::error_limited!(
                "{}: saved state unreadable (corrupt or another version): starting from reset",
                self.cfg.serial
            );
            return Ok(out);
        };
        if let Some(q) = b.qos {
            self.qos_control.set(q);
        }
        if let Some(s) = &b.stats {
            self.carry_stats(s);
        }
        if let Some(l) = b.logs {
            let s = &mut self.admin.smart;
            s.bytes_read = l.bytes_read;
            s.bytes_written = l.bytes_written;
            s.reads = l.reads;
            s.writes = l.writes;
            s.power_on_before = l.power_on_secs;
            s.started = std::time::Instant::now();
            self.admin.errors.count = l.errors;
            self.admin.errors.entries = l.entries.into();
        }
        self.regs.cc = Cc(b.cc);
        self.regs.aqa = Aqa(b.aqa);
        self.regs.asq = b.asq;
        self.regs.acq = b.acq;
        self.regs.intms = b.intms;
        if !self.regs.cc.enabled() || Csts(b.csts).fatal() {
            // disabled (or a reset was under way): the host finds the reset finished
            self.regs.csts = Csts(b.csts & 0b10);
            self.journaled_queues.clear();
            self.save_blob(None);
            return Ok(out);
        }
        self.regs.csts = Csts(b.csts);
        self.page_size = b.page_size;
        self.admin.features = b.features;
        self.shadow = b.shadow;
        // what the subsystem's settle told this controller (the most recent change, whose
        // notice the last worker may not have given): reported with what it had not
        let told = std::mem::take(&mut self.admin.changed_ns.nsids);
        if let Some(e) = b.events {
            // parked requests come back below, as the reissued commands they are
            self.admin.events.masked = e.masked;
            self.admin.events.queued = e.queued.into();
            self.admin.changed_ns.overflow = e.changed_overflow;
            self.admin.changed_ns.nsids = e.changed;
            self.admin.pool_warning = e.pool_warning;
        }
        let mem = self.mem.snapshot();
        for &nsid in &told {
            self.admin.changed_ns.record(nsid);
        }
        if !told.is_empty()
            && self.admin.features.async_event_config
                & crate::state::changed_namespaces::NS_ATTRIBUTE_NOTICES
                != 0
        {
            // queued: the host's parked requests are run again below and take it
            self.raise_event(crate::state::changed_namespaces::NS_ATTRIBUTE_CHANGED, &mem);
        }
        self.queues.take_all();
        // I/O completions posted after their CQ's last recorded tail: (SQ, command id)
        let mut posted = Vec::new();
        for &(id, base, size, vector, irq) in &b.cqs {
            let mut cq = CompletionQueue::new(id, base, size, vector, irq);
            let (tail, phase) = j.cq_tail(id);
            cq.tail = tail % size;
            cq.phase = phase;
            if id != 0 {
                posted_since_record(&mem, &mut cq, &mut posted);
                j.cq_moved(id, cq.tail, cq.phase);
            }
            cq.doorbell = seen(&j, &self.doorbells, self.shadow.is_some(), id, true);
            cq.head = if cq.doorbell.value < size {
                cq.doorbell.value
            } else {
                cq.tail
            };
            self.queues.insert_cq(cq);
        }
        let mut reissue = Vec::new();
        for &(id, base, size, cqid) in &b.sqs {
            let mut sq = SubmissionQueue::new(id, base, size, cqid);
            let (head, mut count) = j.sq_head(id);
            let mut head = head % size;
            let mut posting = Vec::new();
            let first = reissue.len();
            for slot in 0..size as u16 {
                let Some(rec) = j.slot(id, slot) else { break };
                match rec.state {
                    journal::FETCHED
                        if Submission::read_from_bytes(&rec.sqe)
                            .is_ok_and(|sqe| posted.contains(&(id, sqe.cid.get()))) =>
                    {
                        // its completion is in the CQ already: done, not run again
                        j.freed(id, slot);
                        out.found_posted += 1;
                    }
                    journal::FETCHED => reissue.push((id, slot, rec)),
                    journal::POSTING => posting.push((slot, rec)),
                    _ => {}
                }
            }
            // the fetch whose head store did not happen yet, by its number (a command fetched
            // from the same position a lap earlier may still be in flight), in any slot
            while reissue[first..]
                .iter()
                .any(|(_, _, r)| r.seq == Journal::next_seq(count) && r.sq_pos == head)
            {
                head = (head + 1) % size;
                count = Journal::next_seq(count);
            }
            // the head and fetch count as restored: the next fetch gets the next number, so a
            // crash before the commands run again complete cannot count one fetch twice
            j.set_sq_head(id, head, count);
            sq.head = head;
            sq.doorbell = seen(&j, &self.doorbells, self.shadow.is_some(), id, false);
            sq.tail = if sq.doorbell.value < size {
                sq.doorbell.value
            } else {
                head
            };
            self.queues.insert_sq(sq);
            for (slot, rec) in posting {
                self.repost(
                    &mem, id, cqid, slot, rec.cq_pos, rec.phase, &rec.cqe, &mut out,
                );
            }
        }
        // the admin completion the blob was saved with, unless it went further already
        if let Some(p) = b.pending
            && let Some(i) = reissue
                .iter()
                .position(|(q, s, r)| *q == 0 && *s == p.slot && r.sq_pos == p.sq_pos)
        {
            reissue.remove(i);
            self.repost(&mem, 0, 0, p.slot, p.cq_pos, p.phase, &p.cqe, &mut out);
        }
        // the records of the queues just restored are current: no re-initialising them
        self.journaled_queues = self.queue_keys();
        self.save_blob(None);
        log::info!("{}: restored: {}", self.cfg.serial, self.queue_summary());
        self.stats
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        out.enabled = true;
        for (qid, slot, rec) in reissue {
            let sqe = Submission::read_from_bytes(&rec.sqe).unwrap_or_default();
            if self.take_slot(qid, slot) {
                let ctx = &mut self.queues.sqs[qid as usize]
                    .as_mut()
                    .expect("taken above")
                    .slots[slot as usize];
                ctx.cid = sqe.cid.get();
                ctx.opcode = sqe.opcode;
                ctx.nsid = sqe.nsid.get();
                ctx.bytes = 0;
                ctx.fetched = sys_util::clock::ticks();
                out.reissued += 1;
                if qid == 0 && sqe.opcode != OP_ASYNC_EVENT_REQUEST {
                    log::info!(
                        "{}: admin command {:#04x} (cid {}) run again after recovery",
                        self.cfg.serial,
                        sqe.opcode,
                        sqe.cid.get()
                    );
                }
                // a change command the dead worker applied answers as then (and only a
                // command run again: a new one may carry the same tag after a reset)
                self.reissuing = true;
                self.dispatch(qid, slot, &sqe, &mem);
                self.reissuing = false;
            }
        }
        // every enabled vector once: a completion posted by the dead worker may have lost
        // its interrupt
        for &id in &self.queues.active_cqs {
            if let Some(cq) = self.queues.cq(id)
                && cq.irq_enabled
            {
                self.irqs.signal(cq.vector);
            }
        }
        Ok(out)
    }

    /// Mark `slot` of SQ `qid` in flight again (a command run again after recovery).
    fn take_slot(&mut self, qid: u16, slot: u16) -> bool {
        let Some(sq) = self.queues.sq_mut(qid) else {
            return false;
        };
        let Some(i) = sq.free.iter().position(|&s| s == slot) else {
            return false;
        };
        sq.free.remove(i);
        let cqid = sq.cqid;
        if let Some(cq) = self.queues.cq_mut(cqid) {
            cq.reserved += 1;
        }
        self.commands_in_flight += 1;
        true
    }

    /// A completion was being posted when the last worker stopped: write it unless the
    /// guest's CQ already holds it (or the CQ moved past it).
    #[allow(clippy::too_many_arguments)]
    fn repost(
        &mut self,
        mem: &MemoryMap,
        qid: u16,
        cqid: u16,
        slot: u16,
        cq_pos: u32,
        phase: bool,
        cqe: &[u8; 16],
        out: &mut Restored,
    ) {
        let j = self.journal.clone();
        let Some(cq) = self.queues.cq_mut(cqid) else {
            return;
        };
        if cq.tail == cq_pos && cq.phase == phase {
            let mut there = [0u8; 16];
            let addr = cq.base.wrapping_add(u64::from(cq_pos) * 16);
            let written = mem.read(addr, &mut there).is_ok() && there == *cqe;
            if written {
                cq.advance_tail();
                out.found_posted += 1;
            } else {
                let c = Completion::read_from_bytes(cqe).unwrap_or_default();
                if cq.post(mem, c).is_ok() {
                    out.reposted += 1;
                }
            }
            if let Some(j) = &j {
                j.cq_moved(cqid, cq.tail, cq.phase);
            }
        }
        if let Some(j) = &j {
            j.freed(qid, slot);
        }
    }
}
