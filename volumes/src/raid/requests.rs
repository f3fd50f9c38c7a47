//! Guest requests that do not take the fast path (see [`super::direct`]): a parent record
//! per request, split on strip boundaries into child requests on the members (zero copy: each
//! child's buffers are a range of the parent's), gathered back into one completion (the
//! first error wins). Mirrored levels fan writes out to every mirror after their
//! write-intent bits are durable, balance reads (fewest outstanding), retire a failing member
//! without a guest visible error while another mirror of its leg is in sync, and retry a
//! failed read on another mirror.
//!
//! Parent and child records live in slabs reused from request to request, with their
//! segment lists: no allocation per I/O once warm.
use super::array::Array;
use super::layout::Extent;
use super::rebuild::RebuildKind;
use super::records::{Child, Parent, Stage};
use super::superblock::{DATA_OFFSET, SlotState};
use super::tags::{KIND_CHILD, KIND_SHIFT, MAX_CHILD};
use device_model::backend::{GuestBufferList, GuestBuffers, IoOp, IoRequest};
use nvme_spec::Status;

impl Array {
    /// A request the fast path does not take: with a parent record, split into children,
    /// after its write-intent bits when mirrored (kept out of line: `submit` stays small).
    #[inline(never)]
    pub(super) fn submit_split(&mut self, req: &IoRequest<'_>, len: u64) {
        self.in_flight += 1;
        let pi = self.new_parent(req);
        let writes = !matches!(req.op, IoOp::Read | IoOp::Flush);
        if writes && self.mirrored() {
            let regions = self.write_regions(req.offset, len);
            self.parents[pi as usize].regions = Some(regions);
            let locked = self
                .locked
                .is_some_and(|r| (regions.0..=regions.1).contains(&r));
            let started = !locked && self.waiting.is_empty();
            let need = if started {
                self.bitmap.start_write(regions.0, regions.1)
            } else {
                0
            };
            if !started || need > self.bitmap.durable() {
                // it waits: its buffers are kept until it starts
                let p = &mut self.parents[pi as usize];
                p.iov.set(req.iov);
                p.stage = Stage::Waiting { started, need };
                self.waiting.push_back(pi);
                return;
            }
        }
        self.dispatch(pi, req.iov);
    }

    // ----- parents and children -----

    pub(super) fn new_parent(&mut self, req: &IoRequest<'_>) -> u32 {
        let i = if let Some(i) = self.free_parents.pop() {
            i
        } else {
            self.parents.push(Parent {
                stage: Stage::Free,
                tag: 0,
                op: IoOp::Flush,
                offset: 0,
                len: 0,
                iov: GuestBufferList::new(),
                pending: 0,
                status: Status::SUCCESS,
                regions: None,
                sticky: false,
                hold: 0,
            });
            (self.parents.len() - 1) as u32
        };
        let p = &mut self.parents[i as usize];
        p.stage = Stage::Running;
        p.tag = req.tag;
        p.op = req.op;
        p.offset = req.offset;
        p.len = req.len();
        p.pending = 0;
        p.status = Status::SUCCESS;
        p.regions = None;
        p.sticky = false;
        p.hold = 0;
        i
    }

    pub(super) fn complete_parent(&mut self, pi: u32) {
        let p = &mut self.parents[pi as usize];
        self.done_q.push((p.tag, p.status));
        p.stage = Stage::Free;
        self.free_parents.push(pi);
        self.ops += 1;
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new_child(
        &mut self,
        parent: u32,
        slot: usize,
        leg: usize,
        op: IoOp,
        e: Option<Extent>,
        pbufs: GuestBuffers<'_>,
    ) -> u32 {
        let i = if let Some(i) = self.free_children.pop() {
            i
        } else {
            self.children.push(Child {
                live: false,
                parent: 0,
                slot: 0,
                leg: 0,
                op: IoOp::Flush,
                member_off: 0,
                iov: GuestBufferList::new(),
                tried: 0,
            });
            (self.children.len() - 1) as u32
        };
        let c = &mut self.children[i as usize];
        c.live = true;
        c.parent = parent;
        c.slot = slot;
        c.leg = leg;
        c.tried = 1 << slot;
        c.member_off = 0;
        c.op = op;
        c.iov.clear();
        if let Some(e) = e {
            c.member_off = e.member_off;
            c.op = match op {
                IoOp::WriteZeroes { .. } => IoOp::WriteZeroes { len: e.len },
                IoOp::Deallocate { .. } => IoOp::Deallocate { len: e.len },
                other => other,
            };
            if matches!(op, IoOp::Read | IoOp::Write { .. }) {
                if e.buf_off == 0 && e.len == pbufs.len() {
                    c.iov.set(pbufs); // the whole request
                } else {
                    c.iov.set_range(pbufs, e.buf_off, e.len);
                }
            }
        }
        self.parents[parent as usize].pending += 1;
        i
    }

    /// Submit child `ci` to its member; a refusal becomes its completion.
    pub(super) fn submit_child(&mut self, ci: u32) {
        let c = &self.children[ci as usize];
        let slot = c.slot;
        let offset = if matches!(c.op, IoOp::Flush) {
            0
        } else {
            DATA_OFFSET + c.member_off
        };
        let m = &mut self.members[slot];
        let r = match m.backend.as_mut() {
            Some(b) => b.submit(&IoRequest {
                tag: (KIND_CHILD << KIND_SHIFT) | u64::from(ci),
                op: c.op,
                offset,
                iov: c.iov.as_buffers(),
            }),
            None => Err(Status::INTERNAL_PATH_ERROR),
        };
        match r {
            Ok(()) => m.outstanding += 1,
            Err(s) => {
                // completes at the next poll, as if the member had answered
                m.outstanding += 1;
                self.events
                    .push((slot, (KIND_CHILD << KIND_SHIFT) | u64::from(ci), s));
            }
        }
    }

    /// The in-sync mirror of `leg` with the fewest requests outstanding, not in `tried`.
    pub(super) fn pick_read(&self, leg: usize, tried: u32) -> Option<usize> {
        self.layout
            .slots(leg)
            .filter(|&s| {
                tried & (1 << s) == 0
                    && self.members[s].state == SlotState::Active
                    && self.members[s].backend.is_some()
            })
            .min_by_key(|&s| self.members[s].outstanding)
    }

    /// The member regions a write of parent `pi` touches.
    pub(super) fn write_regions(&mut self, offset: u64, len: u64) -> (u64, u64) {
        let mut lo = u64::MAX;
        let mut hi = 0;
        self.layout.map(offset, len, |e| {
            lo = lo.min(e.member_off);
            hi = hi.max(e.member_off + e.len);
        });
        self.bitmap.regions_of(lo, hi - lo)
    }

    /// Start parent `pi` (its bits are durable and its regions unlocked).
    pub(super) fn dispatch(&mut self, pi: u32, bufs: GuestBuffers<'_>) {
        let (op, offset, len) = {
            let p = &self.parents[pi as usize];
            (p.op, p.offset, p.len)
        };
        self.parents[pi as usize].stage = Stage::Running;
        // one pending count for the dispatch itself: no completion before all are out
        self.parents[pi as usize].pending += 1;
        if op == IoOp::Flush {
            for s in 0..self.members.len() {
                if self.members[s].state != SlotState::Missing && self.members[s].backend.is_some()
                {
                    let leg = self.layout.leg_of(s);
                    let ci = self.new_child(pi, s, leg, op, None, bufs);
                    self.submit_child(ci);
                }
            }
            // a leg with no member in sync holds no complete copy to make durable: the
            // Flush cannot succeed (it used to, with no member flushed at all)
            if (0..self.layout.legs()).any(|leg| self.leg_active(leg) == 0) {
                self.fail(pi, Status::INTERNAL_PATH_ERROR);
            }
            self.parent_step(pi);
            return;
        }
        let data = matches!(op, IoOp::Read | IoOp::Write { .. });
        // the common case, one piece (within a strip, at most MAX_CHILD): no list
        if let Some(e) = self
            .layout
            .single(offset, len)
            .filter(|_| !data || len <= MAX_CHILD)
        {
            self.dispatch_extent(pi, op, e, bufs);
            self.parent_step(pi);
            return;
        }
        let mut ext = std::mem::take(&mut self.extents);
        ext.clear();
        self.layout.map(offset, len, |e| {
            let step = if data { MAX_CHILD } else { e.len };
            let mut done = 0;
            while done < e.len {
                let n = (e.len - done).min(step);
                ext.push(Extent {
                    leg: e.leg,
                    member_off: e.member_off + done,
                    buf_off: e.buf_off + done,
                    len: n,
                });
                done += n;
            }
        });
        for &e in &ext {
            self.dispatch_extent(pi, op, e, bufs);
        }
        self.extents = ext;
        self.parent_step(pi);
    }

    /// Send extent `e` of parent `pi`: a read to one in-sync mirror, anything else to
    /// every member of the leg that is there.
    pub(super) fn dispatch_extent(&mut self, pi: u32, op: IoOp, e: Extent, bufs: GuestBuffers<'_>) {
        if op == IoOp::Read {
            match self.pick_read(e.leg, 0) {
                Some(s) => {
                    let ci = self.new_child(pi, s, e.leg, op, Some(e), bufs);
                    self.submit_child(ci);
                }
                None => self.parents[pi as usize].status = Status::INTERNAL_PATH_ERROR,
            }
            return;
        }
        let mut any = false;
        for s in self.layout.slots(e.leg) {
            if self.members[s].state != SlotState::Missing && self.members[s].backend.is_some() {
                any = true;
                let ci = self.new_child(pi, s, e.leg, op, Some(e), bufs);
                self.submit_child(ci);
            } else {
                self.parents[pi as usize].sticky = true;
            }
        }
        if !any {
            self.parents[pi as usize].status = Status::INTERNAL_PATH_ERROR;
        }
    }

    /// One of parent `pi`'s pending counts is done.
    pub(super) fn parent_step(&mut self, pi: u32) {
        let p = &mut self.parents[pi as usize];
        p.pending -= 1;
        if p.pending > 0 {
            return;
        }
        if let Some((a, b)) = p.regions {
            let sticky = p.sticky;
            self.bitmap.end_write(a, b, sticky);
        }
        let p = &mut self.parents[pi as usize];
        if p.hold > self.bitmap.durable() {
            p.stage = Stage::Held { need: p.hold };
            self.held.push_back(pi);
        } else {
            self.complete_parent(pi);
        }
    }

    /// Take member `slot` out of service (its state is recorded at the next round);
    /// requests still out on it finish as they come back.
    pub(crate) fn retire(&mut self, slot: usize, why: &str) {
        let m = &mut self.members[slot];
        if m.state == SlotState::Missing {
            return;
        }
        log::warn!(
            "array {}: member {slot} ({}) retired: {why}",
            self.name,
            m.describe
        );
        m.state = SlotState::Missing;
        m.lost_gen = self.generation;
        if m.outstanding == 0 {
            m.backend = None;
        }
        self.bump_generation();
        if let Some(rb) = &self.rebuild {
            let abort = match rb.kind {
                RebuildKind::Recover { slot: s, .. } => s == slot,
                RebuildKind::Resync => false,
            };
            if abort {
                self.abort_rebuild(format!("member {slot} retired"));
            }
        }
    }

    pub(super) fn on_child(&mut self, ci: u32, status: Status) {
        let (slot, pi, op, leg, tried) = {
            let c = &self.children[ci as usize];
            (c.slot, c.parent, c.op, c.leg, c.tried)
        };
        let m = &mut self.members[slot];
        m.outstanding = m.outstanding.saturating_sub(1);
        let missing = m.state == SlotState::Missing;
        if status.is_success() {
            match op {
                IoOp::Read => m.reads += 1,
                IoOp::Flush => {}
                _ => m.writes += 1,
            }
        } else {
            m.errors += 1;
        }
        if missing && m.outstanding == 0 {
            m.backend = None;
        }
        let ok = status.is_success() && !missing;
        if !ok {
            if self.mirrored() {
                let others = self
                    .layout
                    .slots(leg)
                    .any(|s| s != slot && self.members[s].state == SlotState::Active);
                if others && !missing {
                    self.retire(slot, &format!("{op:?} failed: {status:?}"));
                }
                if op == IoOp::Read {
                    if let Some(s) = self.pick_read(leg, tried) {
                        let c = &mut self.children[ci as usize];
                        c.slot = s;
                        c.tried |= 1 << s;
                        self.submit_child(ci);
                        return;
                    }
                    self.fail(pi, status);
                } else if others || (missing && self.leg_active(leg) > 0) {
                    // absorbed: the leg's other mirror has it; complete once the
                    // member's loss is on disk
                    let hold = if self.sb_dirty {
                        self.bitmap.issued() + 1
                    } else {
                        self.bitmap.issued()
                    };
                    let p = &mut self.parents[pi as usize];
                    p.sticky = true;
                    p.hold = p.hold.max(hold);
                } else {
                    self.fail(pi, status);
                }
            } else {
                self.fail(pi, status);
            }
        }
        let c = &mut self.children[ci as usize];
        c.live = false;
        c.iov.clear();
        self.free_children.push(ci);
        self.parent_step(pi);
    }

    pub(super) fn fail(&mut self, pi: u32, status: Status) {
        let p = &mut self.parents[pi as usize];
        if p.status.is_success() {
            p.status = if status.is_success() {
                Status::INTERNAL_PATH_ERROR
            } else {
                status
            };
        }
    }

    /// Start what waits, in order, while the head is ready.
    pub(super) fn run_waiting(&mut self) {
        while let Some(&pi) = self.waiting.front() {
            let Stage::Waiting { started, need } = self.parents[pi as usize].stage else {
                self.waiting.pop_front();
                continue;
            };
            let (a, b) = self.parents[pi as usize].regions.unwrap_or((0, 0));
            if !started {
                if self.locked.is_some_and(|r| (a..=b).contains(&r)) {
                    return;
                }
                let need = self.bitmap.start_write(a, b);
                self.parents[pi as usize].stage = Stage::Waiting {
                    started: true,
                    need,
                };
                continue;
            }
            if need > self.bitmap.durable() {
                return;
            }
            self.waiting.pop_front();
            let list = std::mem::take(&mut self.parents[pi as usize].iov);
            self.dispatch(pi, list.as_buffers());
            let p = &mut self.parents[pi as usize];
            p.iov = list;
            p.iov.clear();
        }
    }

    pub(super) fn run_held(&mut self) {
        while let Some(&pi) = self.held.front() {
            let Stage::Held { need } = self.parents[pi as usize].stage else {
                self.held.pop_front();
                continue;
            };
            if need > self.bitmap.durable() {
                return;
            }
            self.held.pop_front();
            self.complete_parent(pi);
        }
    }
}
