//! Hot path, hops 1-3: one poll of the data plane reads the doorbells (register page or
//! shadow page, [`crate::shadow_doorbell`]), fetches SQEs within the fetch budget, QoS and
//! CQ room, and dispatches each command to the admin handlers ([`crate::admin`]) or the NVM
//! command set ([`crate::io`]), which hand it to a backend. Completions: `completion.rs`.

use std::sync::Arc;

use nvme_spec::Submission;
use zerocopy::{FromZeros, IntoBytes};

use crate::memory::MemoryMap;
use crate::shadow_doorbell;
use crate::state::async_events::{AsyncEvent, error_info, event_type};

use super::{Controller, MAX_COMMANDS_IN_FLIGHT, Outcome};

/// Commands fetched from one SQ per poll before moving on (fairness between queues).
const FETCH_BUDGET: usize = 64;

impl Controller {
    /// One pass of the data plane: doorbells, command fetch and dispatch, backend
    /// completions, interrupts. Returns how much work was done (0 = idle).
    pub fn poll(&mut self) -> usize {
        if self.journal.is_some() {
            self.save_run_time_changes();
        }
        if self.quiesce.resetting.is_some() {
            self.release_pass_map();
            return self.poll_reset();
        }
        self.poll_shutdown();
        if !self.is_ready() || self.is_fatal() {
            self.release_pass_map();
            if self.quiesce.retired_requests() > 0 || !self.detaching.is_empty() {
                let mem = self.mem.snapshot();
                return self.reap(&mem);
            }
            return 0;
        }
        if self.cfg.secondary_offline() {
            // taken offline by the primary: the controller is reset under its host
            log::info!(
                "{}: secondary controller taken offline: reset",
                self.cfg.serial
            );
            self.reset();
            return 1;
        }
        let (version, mem) = self.take_pass_map();
        self.refresh_shadow_view(&mem);
        let admin =
            self.quiet_passes >= Self::ADMIN_QUIET || self.admin_skipped >= Self::ADMIN_EVERY;
        self.admin_skipped = if admin { 0 } else { self.admin_skipped + 1 };
        let mut work = 0;
        let mut bad_doorbell = false;
        for i in 0..self.queues.active_cqs.len() {
            let id = self.queues.active_cqs[i];
            if id == 0 && !admin {
                continue;
            }
            let Some(cq) = self.queues.cqs[id as usize].as_mut() else {
                continue;
            };
            cq.refresh_view(&mem);
            if cq.tail_unrecorded
                && let Some(j) = &self.journal
            {
                // before any fetch of this pass (see `CompletionQueue::tail_unrecorded`)
                cq.tail_unrecorded = false;
                j.cq_moved(id, cq.tail, cq.phase);
            }
            let seen = cq.doorbell;
            let db = shadow_doorbell::current(
                &self.doorbells,
                self.shadow.as_ref(),
                self.shadow_view.as_ref(),
                &mem,
                2 * id as usize + 1,
                &mut cq.doorbell,
            );
            if cq.doorbell != seen
                && let Some(j) = &self.journal
            {
                j.doorbell_seen(id, true, &cq.doorbell);
            }
            if db != cq.head && !cq.update_head(db) && !self.warned_doorbell {
                self.warned_doorbell = true;
                bad_doorbell = true;
                crate::warn_limited!(
                    "{}: invalid CQ {id} head doorbell {db} (size {}, tail {})",
                    self.cfg.serial,
                    cq.size,
                    cq.tail
                );
            }
        }
        if bad_doorbell {
            self.raise_event(Self::INVALID_DOORBELL, &mem);
        }
        let mut i = 0;
        // the clock is read afresh for this pass (see `count_command`)
        (self.fetch_stamp, self.done_stamp) = (None, None);
        while i < self.queues.active_sqs.len() {
            let id = self.queues.active_sqs[i];
            if id != 0 || admin {
                work += self.process_sq(id, &mem);
            }
            i += 1;
        }
        work += self.reap(&mem);
        if !self.waiting.is_empty() {
            self.start_waiting(&mem);
        }
        self.stats.in_flight.store(
            self.io_in_flight() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.pass_map = Some((version, mem));
        let work = work + self.interrupts();
        self.quiet_passes = if work == 0 {
            self.quiet_passes.saturating_add(1)
        } else {
            0
        };
        work
    }

    /// While the controller is busy, at most this many passes in a row skip the admin queue
    /// pair's doorbells (about 70 instructions a pass; an admin command, which a host sends
    /// rarely, waits a few microseconds more).
    pub(crate) const ADMIN_EVERY: u8 = 8;
    /// After this many passes in a row found no work, every pass reads them (an idle
    /// controller answers admin commands at once). A pass waiting for a queued backend (the
    /// `nvme:` hop at low depth) finds none for a pass or three: those still skip them.
    pub(crate) const ADMIN_QUIET: u8 = 4;

    /// Not running: drop what the passes kept of the DMA map (a departed client's memory is
    /// not held by an idle controller).
    fn release_pass_map(&mut self) {
        if self.pass_map.is_some() || self.shadow_view.is_some() {
            self.pass_map = None;
            self.shadow_view = None;
        }
    }

    /// Find the shadow doorbell pages' view again when they or the map changed.
    fn refresh_shadow_view(&mut self, mem: &Arc<MemoryMap>) {
        match &self.shadow {
            Some(pages) => {
                if !self
                    .shadow_view
                    .as_ref()
                    .is_some_and(|v| v.is_current(pages, mem))
                {
                    self.shadow_view = Some(shadow_doorbell::ShadowView::new(
                        mem,
                        *pages,
                        self.page_size,
                    ));
                }
            }
            None => {
                if self.shadow_view.is_some() {
                    self.shadow_view = None;
                }
            }
        }
    }

    /// The DMA map for a pass: the last pass's while the map has not changed since (an
    /// atomic load), else a new snapshot. The version is read first, so a change racing
    /// with this only makes the next pass take a snapshot again.
    fn take_pass_map(&mut self) -> (u64, Arc<MemoryMap>) {
        let version = self.mem.version();
        match self.pass_map.take() {
            Some((seen, map)) if seen == version => (version, map),
            _ => (version, self.mem.snapshot()),
        }
    }

    pub(super) fn process_sq(&mut self, qid: u16, mem: &Arc<MemoryMap>) -> usize {
        let Some(sq) = self.queues.sqs[qid as usize].as_mut() else {
            return 0;
        };
        sq.refresh_view(mem);
        let seen = sq.doorbell;
        let db = shadow_doorbell::current(
            &self.doorbells,
            self.shadow.as_ref(),
            self.shadow_view.as_ref(),
            mem,
            2 * qid as usize,
            &mut sq.doorbell,
        );
        if sq.doorbell != seen
            && let Some(j) = &self.journal
        {
            j.doorbell_seen(qid, false, &sq.doorbell);
        }
        if db != sq.tail && !sq.update_tail(db) && !self.warned_doorbell {
            self.warned_doorbell = true;
            crate::warn_limited!(
                "{}: invalid SQ {qid} tail doorbell {db} (size {})",
                self.cfg.serial,
                sq.size
            );
            let deleting = sq.deleting.is_some();
            self.raise_event(Self::INVALID_DOORBELL, mem);
            if deleting {
                return 0;
            }
        } else if sq.deleting.is_some() || !sq.has_work() {
            return 0; // nothing to fetch: no QoS, CQ room or budget to look at
        }
        let mut sqe = Submission::new_zeroed();
        if qid != 0 {
            self.qos.sync(&self.qos_control);
        }
        // Commands this pass may fetch from the SQ, counted once: a free slot, room under
        // the in-flight bound and a reserved CQ entry each. Commands that complete during
        // the pass give slots and in-flight room back and turn their reservation into a
        // posted entry (the CQ's room stays as it was), so the count never overshoots; what
        // it leaves waits in the SQ for the next pass.
        let Some(sq) = self.queues.sqs[qid as usize].as_ref() else {
            return 0;
        };
        let cq_room = self
            .queues
            .cqs
            .get(sq.cqid as usize)
            .and_then(Option::as_ref)
            .map_or(0, crate::queue::CompletionQueue::room);
        let budget = if self.hold {
            0
        } else {
            FETCH_BUDGET
                .min(sq.free.len())
                .min(MAX_COMMANDS_IN_FLIGHT.saturating_sub(self.commands_in_flight))
                .min(cq_room as usize)
        };
        let mut n = 0;
        while n < budget {
            let Some(sq) = self.queues.sqs[qid as usize].as_mut() else {
                break;
            };
            if !sq.has_work() {
                break;
            }
            let cqid = sq.cqid as usize;
            let Some(cq) = self.queues.cqs[cqid].as_mut() else {
                break;
            };
            // QoS holds I/O commands in the SQ until their tokens are there
            if qid != 0 && !self.qos.take_op() {
                break;
            }
            if let Err(e) = sq.fetch(mem, &mut sqe) {
                crate::error_limited!(
                    "{}: SQ {qid} entry unreadable ({e}); controller fatal",
                    self.cfg.serial
                );
                self.set_fatal();
                return n;
            }
            cq.reserved += 1;
            let slot = sq.free.pop().unwrap_or_default();
            if let Some(j) = &self.journal {
                // the fetch position and the command, before anything acts on it
                let raw: &[u8; 64] = sqe.as_bytes().try_into().unwrap_or(&[0; 64]);
                let pos = sq.head.checked_sub(1).unwrap_or(sq.size - 1);
                j.fetched(qid, slot, pos, sq.head, raw);
            }
            self.commands_in_flight += 1;
            let ctx = &mut sq.slots[slot as usize];
            ctx.cid = sqe.cid.get();
            ctx.opcode = sqe.opcode;
            ctx.nsid = sqe.nsid.get();
            ctx.bytes = 0;
            // one clock read for the commands fetched in this pass (latency statistics)
            ctx.fetched = *self.fetch_stamp.get_or_insert_with(sys_util::clock::ticks);
            self.dispatch(qid, slot, &sqe, mem);
            n += 1;
        }
        n
    }

    /// Run the command in `slot` of SQ `qid` (admin or I/O) and post its completion when it
    /// finished at once; a pending one completes through its backend or its event.
    pub(crate) fn dispatch(&mut self, qid: u16, slot: u16, sqe: &Submission, mem: &Arc<MemoryMap>) {
        let outcome = if qid == 0 {
            self.admin_command(slot, sqe, mem)
        } else {
            self.io_command(qid, slot, sqe, mem)
        };
        if let Outcome::Done(status, dw0) = outcome {
            self.complete(qid, slot, status, dw0, mem);
        } // Pending completes later; Posted is done
    }

    /// The event for an invalid doorbell write value (§3.1.4.18 and §5.2).
    pub(super) const INVALID_DOORBELL: AsyncEvent = AsyncEvent {
        event_type: event_type::ERROR,
        info: error_info::INVALID_DOORBELL_VALUE,
        log_page: nvme_spec::log_page::lid::ERROR_INFORMATION,
    };
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nvme_spec::Status;

    use crate::backend::MallocBackend;
    use crate::memory::Protection;
    use crate::namespace::Namespace;
    use crate::test_harness::{DATA, Harness, MEM, sqe};

    const RW: Protection = Protection {
        read: true,
        write: true,
    };

    fn harness() -> Harness {
        let b = MallocBackend::new(1 << 20).unwrap();
        Harness::new(vec![Namespace::new(1, Box::new(b), 9, "P")])
    }

    /// The client moves its memory to another file at the same addresses, contents copied
    /// (a DMA_UNMAP and DMA_MAP): the controller's next pass must use the new file.
    fn move_memory(h: &Harness) {
        let contents = h.read(0, MEM as usize);
        let fd = crate::memory::tests::memfd(MEM);
        h.mem.unmap(0, MEM).unwrap();
        h.mem.map_fd(0, MEM, fd.as_fd(), 0, RW).unwrap();
        h.write(0, &contents);
    }

    /// The DMA map a pass polls with is kept for the next pass only while the map is
    /// unchanged: after a change, SQEs are read from and CQEs posted to the new memory (a
    /// stale map would read the old file's ring and post there: the command would never
    /// complete in the client's memory).
    #[test]
    fn a_pass_after_a_dma_map_change_uses_the_new_map() {
        let mut h = harness();
        h.write(DATA, &[7; 512]);
        assert_eq!(h.io_run(sqe(0x01, 1, DATA, &[0, 0, 0])), Status::SUCCESS);
        assert!(h.ctrl.pass_map.is_some(), "kept between passes");
        move_memory(&h);
        h.write(DATA, &[0; 512]);
        assert_eq!(h.io_run(sqe(0x02, 1, DATA, &[0, 0, 0])), Status::SUCCESS);
        assert_eq!(h.read(DATA, 512), [7; 512], "read into the new memory");
    }

    /// The shadow doorbell page's view follows a map change too (a stale view would read
    /// the old file's shadow copy and never see the new tail).
    #[test]
    fn shadow_doorbells_are_read_from_the_new_map_after_a_change() {
        let mut h = harness();
        let mut s = sqe(0x7c, 0, DATA + 0x20000, &[]);
        s[32..40].copy_from_slice(&(DATA + 0x21000).to_le_bytes());
        let c = h.admin(s);
        assert_eq!(h.admin_wait(c), Status::SUCCESS, "Doorbell Buffer Config");
        h.shadow_io = Some(DATA + 0x20000);
        assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
        assert!(h.ctrl.shadow_view.is_some(), "a view of the shadow pages");
        move_memory(&h);
        for _ in 0..3 {
            assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
        }
    }

    /// Get Features, Number of Queues: an admin command that needs no data.
    const GET_QUEUES: (u8, u32) = (0x0a, 0x07);

    /// While every pass finds I/O, the admin queue is still read within
    /// [`ADMIN_EVERY`](crate::controller::Controller::ADMIN_EVERY) + 1 passes, from whatever
    /// point of the count the admin command arrives at; on a quiet controller at the next
    /// pass.
    #[test]
    fn admin_commands_are_served_within_a_few_passes_of_a_busy_controller() {
        let mut h = harness();
        let every = usize::from(crate::controller::Controller::ADMIN_EVERY);
        let (op, fid) = GET_QUEUES;
        for _ in 0..crate::controller::Controller::ADMIN_QUIET {
            h.ctrl.poll(); // passes that find nothing
        }
        let c = h.admin(sqe(op, 0, 0, &[fid]));
        assert_eq!(h.reap(true), [(c, Status::SUCCESS)], "quiet: the next pass");
        for arrives_after in 0..2 * every {
            // busy passes: each finds a Flush (done at once by the RAM backend)
            for _ in 0..arrives_after {
                h.io(sqe(0x00, 1, 0, &[]));
                assert_eq!(h.reap(false).len(), 1);
            }
            let c = h.admin(sqe(op, 0, 0, &[fid]));
            let mut passes = 0;
            let got = loop {
                h.io(sqe(0x00, 1, 0, &[]));
                passes += 1;
                assert_eq!(h.reap(false).len(), 1, "the I/O of the pass");
                let got = h.posted(true);
                if !got.is_empty() || passes > every + 1 {
                    break got;
                }
            };
            assert_eq!(got, [(c, Status::SUCCESS)], "after {passes} busy passes");
        }
    }

    /// A controller that stops running (CC.EN = 0) lets go of the map it polled with, so a
    /// departed client's memory is not held.
    #[test]
    fn a_disabled_controller_holds_no_map() {
        let mut h = harness();
        assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
        let map = h
            .ctrl
            .pass_map
            .as_ref()
            .map(|(_, m)| std::sync::Arc::downgrade(m));
        h.ctrl.write_register(0x14, 0, 4);
        for _ in 0..10 {
            h.ctrl.poll();
        }
        assert!(h.ctrl.pass_map.is_none() && h.ctrl.shadow_view.is_none());
        h.mem.clear();
        let map = map.expect("a map was kept while running");
        assert!(map.upgrade().is_none(), "the old map is gone");
    }
}
