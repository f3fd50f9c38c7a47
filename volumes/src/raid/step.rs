//! One step of an array, run from every [`poll`](device_model::backend::Backend::poll) and
//! by a driver thread while no reactor polls: management commands, member completions (the
//! fast path's handed straight to the caller), rounds, waiting and held requests, the lazy
//! clear of bitmap bits, the rebuild, the status.
use super::array::{Array, CLEAR_TICK, INDEX_MASK};
use super::superblock::SlotState;
use super::tags::{KIND_CHILD, KIND_DIRECT, KIND_META, KIND_REBUILD, KIND_SHIFT};
use device_model::backend::Backend;
use nvme_spec::Status;
use std::time::Instant;

impl Array {
    /// True when nothing is in flight or waiting (no guest request, round or rebuild).
    pub fn idle(&self) -> bool {
        self.in_flight == 0 && self.meta_pending == 0 && self.rebuild.is_none()
    }

    /// Drive rounds and the rebuild until `cond` holds or `timeout` passes (creation,
    /// assembly and tests, off the reactor); returns whether it held.
    pub fn poll_until(
        &mut self,
        timeout: std::time::Duration,
        mut cond: impl FnMut(&Array) -> bool,
    ) -> bool {
        let t = Instant::now();
        loop {
            self.poll(&mut |_, _| {});
            if cond(self) {
                return true;
            }
            if t.elapsed() > timeout {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Everything a poll does but hand out completions (they wait for the next
    /// [`poll`](Backend::poll)): member completions, commands, rounds, waiting and held
    /// requests, the lazy clear, the rebuild, the status. A [`DrivenArray`]'s thread calls
    /// it while no reactor polls.
    ///
    /// [`DrivenArray`]: super::driver::DrivenArray
    pub fn step(&mut self) {
        let now = self.step_begin();
        let mut q = std::mem::take(&mut self.direct_done);
        self.poll_members(&mut |t, s| q.push((t, s)));
        self.done_q.append(&mut q);
        self.direct_done = q;
        self.step_end(now);
    }

    /// A step's start: the clock (now and then) and management commands.
    pub(super) fn step_begin(&mut self) -> (Instant, bool) {
        self.polls = self.polls.wrapping_add(1);
        // the clock is read every 64th step (every 4th during a rebuild, whose rate limit
        // needs it), not per I/O
        let check_time = self.polls.is_multiple_of(64)
            || self.status_dirty
            || (self.rebuild.is_some() && self.polls.is_multiple_of(4))
            || self.shared.commands_pending();
        if check_time {
            self.now = Instant::now();
        }
        let now = self.now;
        if check_time {
            self.run_commands(now);
        }
        (now, check_time)
    }

    /// Poll the members with requests outstanding: fast-path completions go to `direct`
    /// (their count is returned), the rest wait in `events` for [`step_end`](Self::step_end).
    pub(super) fn poll_members(&mut self, direct: &mut dyn FnMut(u64, Status)) -> usize {
        let mut ev = std::mem::take(&mut self.events);
        let directs = &mut self.directs;
        let mut total = 0;
        for (slot, m) in self.members.iter_mut().enumerate() {
            let Some(b) = m.backend.as_mut().filter(|_| m.outstanding > 0) else {
                continue;
            };
            let (mut n, mut reads, mut writes, mut errors) = (0, 0, 0, 0);
            b.poll(&mut |t, s| {
                if t >> KIND_SHIFT != KIND_DIRECT {
                    ev.push((slot, t, s));
                } else if let Some((tag, read)) = directs.finish(t) {
                    n += 1;
                    match (s.is_success(), read) {
                        (false, _) => errors += 1,
                        (true, true) => reads += 1,
                        (true, false) => writes += 1,
                    }
                    direct(tag, s);
                }
            });
            m.outstanding -= n;
            m.reads += reads;
            m.writes += writes;
            m.errors += errors;
            if m.state == SlotState::Missing && m.outstanding == 0 {
                m.backend = None;
            }
            total += n;
        }
        self.events = ev;
        self.ops += total as u64;
        total
    }

    /// A step's end: member completions other than the fast path's, rounds, waiting and held
    /// requests, the lazy clear, the rebuild, the status.
    pub(super) fn step_end(&mut self, (now, check_time): (Instant, bool)) {
        let mut ev = std::mem::take(&mut self.events);
        let mut i = 0;
        while i < ev.len() {
            let (slot, tag, s) = ev[i];
            i += 1;
            match tag >> KIND_SHIFT {
                KIND_CHILD => {
                    let ci = (tag & INDEX_MASK) as u32;
                    if self.children.get(ci as usize).is_some_and(|c| c.live) {
                        self.on_child(ci, s);
                    }
                }
                KIND_META => self.on_meta(slot, s),
                KIND_REBUILD => self.on_rebuild(slot, tag & INDEX_MASK, s, now),
                _ => {}
            }
            // completions pushed while handling (refused resubmissions) run in this pass
            if i == ev.len() && !self.events.is_empty() {
                ev.append(&mut self.events);
            }
        }
        ev.clear();
        self.events = ev;
        if self.mirrored() {
            if check_time && now.duration_since(self.last_clear) >= CLEAR_TICK {
                self.last_clear = now;
                if self.bitmap.clear_idle() > 0 {
                    self.status_dirty = true;
                }
            }
            self.maybe_round();
            self.run_held();
            self.run_waiting();
            if self.rebuild.is_none()
                && !self.queued.is_empty()
                && self.retry_at.is_none_or(|t| Instant::now() >= t)
            {
                self.retry_at = None;
                self.start_next_rebuild(Instant::now());
            }
            if self.rebuild.is_some() {
                self.rebuild_step(now);
            }
        } else {
            self.maybe_round();
        }
        let due = |at: u128| now.duration_since(self.last_publish).as_millis() >= at;
        if self.status_dirty || (self.publish_pending && due(100)) || (check_time && due(500)) {
            self.publish(now);
        }
    }

    /// True while work is under way that progresses with every step (a rebuild, a round,
    /// requests waiting for one): a driver thread then steps it often, not every 2 ms.
    pub fn busy(&self) -> bool {
        self.rebuild.is_some()
            || self.meta_pending > 0
            || self.sb_dirty
            || !self.waiting.is_empty()
            || !self.held.is_empty()
            || self.shared.commands_pending()
    }

    /// True while work other than guest requests needs polls.
    pub(super) fn background(&self) -> bool {
        self.rebuild.is_some()
            || !self.queued.is_empty()
            || self.meta_busy()
            || self.bitmap.has_candidates()
            || !self.held.is_empty()
            || self.status_dirty
            || self.publish_pending
            || self.shared.commands_pending()
    }

    /// Rounds still to write or in flight.
    pub fn meta_busy(&self) -> bool {
        self.meta_pending > 0 || self.sb_dirty || self.bitmap.round_due()
    }
}
