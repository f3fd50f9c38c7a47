//! The array as a [`Backend`]: guest requests split on strip boundaries into child requests
//! on the members (zero copy: each child's buffers are a range of the parent's), gathered
//! back into one completion (the first error wins); mirrored levels fan writes out to every
//! mirror, balance reads (fewest outstanding), retire a failing member without a guest
//! visible error while another mirror of its leg is in sync, and retry a failed read on
//! another mirror. Superblock and bitmap rounds, rebuild chunks and management commands all
//! run from [`poll`](Backend::poll): nothing here waits.
//!
//! Parent and child records live in slabs reused from request to request, with their
//! segment lists: no allocation per I/O once warm.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use device_model::backend::{Backend, GuestBufferList, GuestBuffers, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::bitmap::{BLOCK, Bitmap};
use super::direct::Directs;
use super::layout::{Extent, Layout};
use super::rebuild::{ChunkIo, DEPTH, Progress, RateLimit, Rebuild, RebuildKind};
use super::status::{AddOutcome, ArrayStatus, Command, MemberStatus, Shared};
use super::superblock::{BITMAP_OFFSET, DATA_OFFSET, SB_SIZE, SlotInfo, SlotState, Superblock};
use super::tags::{KIND_CHILD, KIND_DIRECT, KIND_META, KIND_REBUILD, KIND_SHIFT, MAX_CHILD};

const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// The lazy clear's tick: a region's bit is cleared one to two ticks after its last write.
const CLEAR_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// One member slot.
pub(crate) struct Member {
    pub(crate) backend: Option<Box<dyn Backend>>,
    pub(crate) describe: String,
    pub(crate) state: SlotState,
    pub(crate) data_size: u64,
    pub(crate) lost_gen: u64,
    pub(crate) outstanding: usize,
    pub(crate) reads: u64,
    pub(crate) writes: u64,
    pub(crate) errors: u64,
}

impl Member {
    pub(crate) fn new(describe: String, backend: Option<Box<dyn Backend>>, info: SlotInfo) -> Self {
        Self {
            backend,
            describe,
            state: info.state,
            data_size: info.data_size,
            lost_gen: info.lost_gen,
            outstanding: 0,
            reads: 0,
            writes: 0,
            errors: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Free,
    /// Waiting for its bitmap round or a locked region (`started`: bits counted).
    Waiting {
        started: bool,
        need: u64,
    },
    Running,
    /// Done, held until the superblock recording a member's loss is on disk.
    Held {
        need: u64,
    },
}

struct Parent {
    stage: Stage,
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    iov: GuestBufferList,
    pending: u32,
    status: Status,
    /// Member regions of a mirrored write (first, last).
    regions: Option<(u64, u64)>,
    /// A mirror missed this write.
    sticky: bool,
    /// Round that must be durable before completion (a member was retired under it).
    hold: u64,
}

struct Child {
    live: bool,
    parent: u32,
    slot: usize,
    leg: usize,
    op: IoOp,
    member_off: u64,
    iov: GuestBufferList,
    /// Slots tried (reads retried on another mirror).
    tried: u32,
}

struct MetaOp {
    iov: GuestBufferList,
}

/// An array of member backends, itself a backend.
pub struct Array {
    // members first: dropped before the records their requests use
    pub(crate) members: Vec<Member>,
    pub(crate) name: String,
    pub(crate) uuid: [u8; 16],
    pub(crate) layout: Layout,
    /// The layout's level keeps copies (asked on every request).
    mirrored: bool,
    pub(crate) generation: u64,
    pub(crate) bitmap: Bitmap,
    parents: Vec<Parent>,
    free_parents: Vec<u32>,
    children: Vec<Child>,
    free_children: Vec<u32>,
    pub(super) directs: Directs,
    waiting: VecDeque<u32>,
    held: VecDeque<u32>,
    done_q: Vec<(u64, Status)>,
    done_scratch: Vec<(u64, Status)>,
    /// Fast-path completions a step without a caller collects for the next poll.
    direct_done: Vec<(u64, Status)>,
    pub(super) events: Vec<(usize, u64, Status)>,
    extents: Vec<Extent>,
    pub(super) in_flight: usize,
    // superblock + bitmap rounds
    sb_dirty: bool,
    sb_bufs: Vec<IoBuffer>,
    bm_buf: IoBuffer,
    meta: Vec<MetaOp>,
    meta_used: usize,
    meta_pending: usize,
    meta_round: u64,
    round_blocks: Vec<u64>,
    // rebuild
    pub(super) rebuild: Option<Rebuild>,
    pub(super) queued: VecDeque<RebuildKind>,
    pub(super) last_rebuild: Option<Progress>,
    pub(super) locked: Option<u64>,
    pub(super) rb_chunks: Vec<ChunkIo>,
    /// Tags of the current rebuild's requests carry it: late answers of a stopped one are
    /// told apart.
    pub(super) rb_epoch: u64,
    pub(super) rate: RateLimit,
    // control
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    ops: u64,
    polls: u32,
    last_publish: Instant,
    last_ops: u64,
    last_clear: Instant,
    pub(super) status_dirty: bool,
    /// Guest I/O went idle: publish once more (at most every 100 ms).
    publish_pending: bool,
    /// A thread steps it when no reactor polls (see [`super::driver`]).
    pub(crate) driven: bool,
    /// When a stopped rebuild is tried again.
    pub(super) retry_at: Option<Instant>,
    /// The clock as last read (see `step`).
    now: Instant,
}

/// Parts of a new array (from creation or assembly).
pub(crate) struct Parts {
    pub name: String,
    pub uuid: [u8; 16],
    pub layout: Layout,
    pub generation: u64,
    pub bitmap: Bitmap,
    pub members: Vec<Member>,
}

impl Array {
    pub(crate) fn from_parts(p: Parts, commands: Receiver<Command>, shared: Arc<Shared>) -> Self {
        let now = Instant::now();
        let n = p.members.len();
        let bm_bytes = p.bitmap.disk_bytes() as usize;
        let mut a = Self {
            members: p.members,
            name: p.name,
            uuid: p.uuid,
            mirrored: p.layout.level.mirrored(),
            layout: p.layout,
            generation: p.generation,
            bitmap: p.bitmap,
            parents: Vec::new(),
            free_parents: Vec::new(),
            children: Vec::new(),
            free_children: Vec::new(),
            directs: Directs::default(),
            waiting: VecDeque::new(),
            held: VecDeque::new(),
            done_q: Vec::new(),
            done_scratch: Vec::new(),
            direct_done: Vec::new(),
            events: Vec::new(),
            extents: Vec::new(),
            in_flight: 0,
            sb_dirty: false,
            sb_bufs: (0..n).map(|_| IoBuffer::new(SB_SIZE)).collect(),
            bm_buf: IoBuffer::new(bm_bytes),
            meta: Vec::new(),
            meta_used: 0,
            meta_pending: 0,
            meta_round: 0,
            round_blocks: Vec::new(),
            rebuild: None,
            queued: VecDeque::new(),
            last_rebuild: None,
            locked: None,
            rb_chunks: (0..DEPTH).map(|_| ChunkIo::new()).collect(),
            rb_epoch: 0,
            rate: RateLimit::new(shared.initial_rate(), now),
            commands,
            shared,
            ops: 0,
            polls: 0,
            last_publish: now,
            last_ops: 0,
            last_clear: now,
            status_dirty: true,
            publish_pending: false,
            driven: false,
            retry_at: None,
            now,
        };
        a.publish(now);
        a
    }

    /// The superblock for member `slot` as the array stands.
    pub(crate) fn superblock(&self, slot: usize) -> Superblock {
        Superblock {
            uuid: self.uuid,
            name: self.name.clone(),
            level: self.layout.level,
            strip: self.layout.strip as u32,
            slot: slot as u8,
            generation: self.generation,
            region_size: self.bitmap.region(),
            data_offset: DATA_OFFSET,
            slots: self
                .members
                .iter()
                .map(|m| SlotInfo {
                    state: m.state,
                    data_size: m.data_size,
                    lost_gen: m.lost_gen,
                })
                .collect(),
        }
    }

    /// Record a change of membership: a new generation, written at the next round.
    pub(crate) fn bump_generation(&mut self) {
        self.generation += 1;
        self.sb_dirty = true;
        self.status_dirty = true;
    }

    /// Queue a rebuild (it starts when the one running, if any, is done).
    pub(crate) fn queue_rebuild(&mut self, kind: RebuildKind) {
        self.queued.push_back(kind);
    }

    pub(super) fn mirrored(&self) -> bool {
        self.mirrored
    }

    pub(super) fn leg_active(&self, leg: usize) -> usize {
        self.layout
            .slots(leg)
            .filter(|&s| self.members[s].state == SlotState::Active)
            .count()
    }

    /// "online", "degraded", "rebuilding" or "offline".
    fn state_name(&self) -> &'static str {
        if (0..self.layout.legs()).any(|l| self.leg_active(l) == 0) {
            "offline"
        } else if self
            .members
            .iter()
            .any(|m| m.state == SlotState::Rebuilding)
        {
            "rebuilding"
        } else if self.members.iter().any(|m| m.state == SlotState::Missing) {
            "degraded"
        } else {
            "online"
        }
    }

    /// A request the fast path does not take: with a parent record, split into children,
    /// after its write-intent bits when mirrored (kept out of line: `submit` stays small).
    #[inline(never)]
    fn submit_split(&mut self, req: &IoRequest<'_>, len: u64) {
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

    fn new_parent(&mut self, req: &IoRequest<'_>) -> u32 {
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

    fn complete_parent(&mut self, pi: u32) {
        let p = &mut self.parents[pi as usize];
        self.done_q.push((p.tag, p.status));
        p.stage = Stage::Free;
        self.free_parents.push(pi);
        self.ops += 1;
    }

    #[allow(clippy::too_many_arguments)]
    fn new_child(
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
    fn submit_child(&mut self, ci: u32) {
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
    fn pick_read(&self, leg: usize, tried: u32) -> Option<usize> {
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
    fn write_regions(&mut self, offset: u64, len: u64) -> (u64, u64) {
        let mut lo = u64::MAX;
        let mut hi = 0;
        self.layout.map(offset, len, |e| {
            lo = lo.min(e.member_off);
            hi = hi.max(e.member_off + e.len);
        });
        self.bitmap.regions_of(lo, hi - lo)
    }

    /// Start parent `pi` (its bits are durable and its regions unlocked).
    fn dispatch(&mut self, pi: u32, bufs: GuestBuffers<'_>) {
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
    fn dispatch_extent(&mut self, pi: u32, op: IoOp, e: Extent, bufs: GuestBuffers<'_>) {
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
    fn parent_step(&mut self, pi: u32) {
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

    fn on_child(&mut self, ci: u32, status: Status) {
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

    fn fail(&mut self, pi: u32, status: Status) {
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
    fn run_waiting(&mut self) {
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

    fn run_held(&mut self) {
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

    // ----- superblock and bitmap rounds -----

    fn maybe_round(&mut self) {
        if self.meta_pending > 0 {
            return;
        }
        if !(self.bitmap.round_due() || self.sb_dirty) {
            return;
        }
        let mut blocks = std::mem::take(&mut self.round_blocks);
        self.meta_round = self.bitmap.issue(&mut blocks);
        self.meta_used = 0;
        let mut block = vec![0u8; BLOCK as usize];
        for &b in &blocks {
            self.bitmap.block_bytes(b, &mut block);
            self.bm_buf.write_at((b * BLOCK) as usize, &block);
        }
        let sb = std::mem::take(&mut self.sb_dirty);
        for slot in 0..self.members.len() {
            if self.members[slot].state == SlotState::Missing
                || self.members[slot].backend.is_none()
            {
                continue;
            }
            if self.mirrored() {
                for &b in &blocks {
                    self.meta_op_bm(slot, b);
                }
            }
            if sb {
                let enc = self.superblock(slot).encode();
                self.sb_bufs[slot].write_at(0, &enc);
                self.meta_op_sb(slot);
            }
        }
        self.round_blocks = blocks;
        if self.meta_pending == 0 {
            let r = self.meta_round;
            self.bitmap.round_done(r);
        }
    }

    fn meta_op_bm(&mut self, slot: usize, b: u64) {
        let k = self.meta_slot();
        self.meta[k]
            .iov
            .set_range(self.bm_buf.buffers(), b * BLOCK, BLOCK);
        self.submit_meta(slot, k, BITMAP_OFFSET + b * BLOCK);
    }

    fn meta_op_sb(&mut self, slot: usize) {
        let k = self.meta_slot();
        self.meta[k].iov.set(self.sb_bufs[slot].buffers());
        self.submit_meta(slot, k, 0);
    }

    /// A record for one superblock or bitmap write of this round (reused round to round).
    fn meta_slot(&mut self) -> usize {
        if self.meta_used == self.meta.len() {
            self.meta.push(MetaOp {
                iov: GuestBufferList::new(),
            });
        }
        self.meta_used += 1;
        self.meta_used - 1
    }

    fn submit_meta(&mut self, slot: usize, k: usize, offset: u64) {
        let tag = (KIND_META << KIND_SHIFT) | k as u64;
        let m = &mut self.members[slot];
        let Some(b) = m.backend.as_mut() else {
            return;
        };
        m.outstanding += 1;
        self.meta_pending += 1;
        let r = b.submit(&IoRequest {
            tag,
            op: IoOp::Write { fua: true },
            offset,
            iov: self.meta[k].iov.as_buffers(),
        });
        if let Err(s) = r {
            self.events.push((slot, tag, s));
        }
    }

    fn on_meta(&mut self, slot: usize, status: Status) {
        let m = &mut self.members[slot];
        m.outstanding = m.outstanding.saturating_sub(1);
        if m.state == SlotState::Missing && m.outstanding == 0 {
            m.backend = None;
        }
        if !status.is_success() {
            m.errors += 1;
            let leg = self.layout.leg_of(slot);
            let others = self
                .layout
                .slots(leg)
                .any(|s| s != slot && self.members[s].state == SlotState::Active);
            if others {
                self.retire(slot, &format!("superblock/bitmap write failed: {status:?}"));
            } else {
                log::warn!(
                    "array {}: superblock/bitmap write to member {slot} failed: {status:?}",
                    self.name
                );
            }
        }
        self.meta_pending -= 1;
        if self.meta_pending == 0 {
            let r = self.meta_round;
            self.bitmap.round_done(r);
            self.status_dirty = true;
        }
    }

    // ----- management -----

    fn run_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.commands.try_recv() {
            self.shared.command_taken();
            self.command(cmd, now);
            self.status_dirty = true;
        }
    }

    pub(crate) fn command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::SetRate(r) => {
                self.rate.set(r, now);
                if let Some(rb) = self.rebuild.as_mut() {
                    rb.progress.rate = r;
                }
            }
            // the status is published before the answer: a listing right after shows it
            Command::Remove { slot, reply } => {
                let r = self.remove_member(slot);
                self.publish_now(now);
                let _ = reply.send(r);
            }
            Command::Add {
                backend,
                describe,
                sb,
                reply,
            } => {
                let r = self.add_member(backend, describe, sb.as_ref());
                self.publish_now(now);
                let _ = reply.send(r);
            }
        }
    }

    fn remove_member(&mut self, slot: usize) -> Result<(), String> {
        if slot >= self.members.len() {
            return Err(format!("no member slot {slot}"));
        }
        if !self.mirrored() {
            return Err(format!(
                "{} has no redundancy: removing a member would lose data",
                self.layout.level.name()
            ));
        }
        if self.members[slot].state == SlotState::Missing {
            return Err(format!("member slot {slot} is already missing"));
        }
        let leg = self.layout.leg_of(slot);
        let others = self
            .layout
            .slots(leg)
            .any(|s| s != slot && self.members[s].state == SlotState::Active);
        if !others {
            return Err(format!(
                "member slot {slot} is the last in-sync copy of its data"
            ));
        }
        self.retire(slot, "removed by request");
        Ok(())
    }

    fn add_member(
        &mut self,
        backend: Box<dyn Backend>,
        describe: String,
        sb: Option<&Superblock>,
    ) -> Result<AddOutcome, String> {
        if !self.mirrored() {
            return Err(format!(
                "{} has no redundancy to rebuild a member from",
                self.layout.level.name()
            ));
        }
        let need = self.layout.leg_size(0) + DATA_OFFSET;
        if backend.size() < need {
            return Err(format!(
                "{describe}: {} bytes, the array's members need {need}",
                backend.size()
            ));
        }
        // a returning member goes back to its slot; otherwise the first missing one
        let returning = sb.filter(|s| {
            s.uuid == self.uuid
                && (s.slot as usize) < self.members.len()
                && self.members[s.slot as usize].state == SlotState::Missing
                && self.members[s.slot as usize].backend.is_none()
        });
        if let Some(s) = sb
            && s.uuid != self.uuid
        {
            return Err(format!(
                "{describe} belongs to another array ({} {}); wipe it first",
                s.name,
                nvme_spec::uuid::format(&s.uuid)
            ));
        }
        let slot = match returning {
            Some(s) => s.slot as usize,
            None => self
                .members
                .iter()
                .position(|m| m.state == SlotState::Missing && m.backend.is_none())
                .ok_or_else(|| "no missing member slot to fill".to_string())?,
        };
        let partial = returning.is_some_and(|s| s.generation >= self.members[slot].lost_gen);
        let m = &mut self.members[slot];
        m.backend = Some(backend);
        m.describe = describe;
        m.state = SlotState::Rebuilding;
        m.outstanding = 0;
        m.data_size = self.layout.leg_size(0);
        self.bump_generation();
        self.queue_rebuild(RebuildKind::Recover { slot, partial });
        Ok(AddOutcome { slot, partial })
    }

    // ----- status -----

    /// Publish, waiting for a reader to let go of the status if one holds it.
    fn publish_now(&mut self, now: Instant) {
        self.publish(now);
        if self.status_dirty {
            drop(self.shared.status.lock());
            self.publish(now);
        }
    }

    fn publish(&mut self, now: Instant) {
        let dt = now.duration_since(self.last_publish).as_secs_f64();
        let iops = if dt > 0.0 {
            (self.ops - self.last_ops) as f64 / dt
        } else {
            0.0
        };
        let rebuild = self.rebuild.as_ref().map(|rb| {
            let mut p = rb.progress.clone();
            p.elapsed = now.duration_since(rb.started);
            p
        });
        let st = ArrayStatus {
            name: self.name.clone(),
            uuid: nvme_spec::uuid::format(&self.uuid),
            level: self.layout.level.name(),
            strip: self.layout.strip,
            size: self.layout.size(),
            state: self.state_name(),
            generation: self.generation,
            region_size: self.bitmap.region(),
            dirty_regions: self.bitmap.count_set(),
            ops: self.ops,
            iops,
            members: self
                .members
                .iter()
                .enumerate()
                .map(|(slot, m)| MemberStatus {
                    slot,
                    describe: m.describe.clone(),
                    state: match m.state {
                        SlotState::Active => "active",
                        SlotState::Rebuilding => "rebuilding",
                        SlotState::Missing => "missing",
                    },
                    reads: m.reads,
                    writes: m.writes,
                    errors: m.errors,
                    outstanding: m.outstanding,
                })
                .collect(),
            rebuild,
            last_rebuild: self.last_rebuild.clone(),
            rate: self.rate.bytes_per_sec,
        };
        if let Ok(mut g) = self.shared.status.try_lock() {
            *g = st;
            self.last_publish = now;
            self.last_ops = self.ops;
            self.status_dirty = false;
            self.publish_pending = false;
        }
    }

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
    fn step_begin(&mut self) -> (Instant, bool) {
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
    fn poll_members(&mut self, direct: &mut dyn FnMut(u64, Status)) -> usize {
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
                } else if let Some((tag, read)) = directs.finish(t & INDEX_MASK) {
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
    fn step_end(&mut self, (now, check_time): (Instant, bool)) {
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

    /// Records and the capacity of every list the I/O path reuses (a test checks they stop
    /// growing once warm: no allocation per I/O).
    #[cfg(test)]
    pub(crate) fn footprint(&self) -> (usize, usize, usize) {
        let lists = self
            .parents
            .iter()
            .map(|p| p.iov.capacity())
            .chain(self.children.iter().map(|c| c.iov.capacity()))
            .sum::<usize>()
            + self.events.capacity()
            + self.extents.capacity()
            + self.done_q.capacity()
            + self.done_scratch.capacity()
            + self.direct_done.capacity()
            + self.directs.capacity()
            + self.waiting.capacity()
            + self.held.capacity();
        (self.parents.len(), self.children.len(), lists)
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
    fn background(&self) -> bool {
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

    /// The last finished (or stopped) rebuild's progress.
    pub fn last_rebuild(&self) -> Option<&Progress> {
        self.last_rebuild.as_ref()
    }

    /// The array's status now.
    pub fn status(&mut self) -> ArrayStatus {
        self.status_dirty = true;
        self.publish(Instant::now());
        self.shared
            .status
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }
}

impl Backend for Array {
    fn describe(&self) -> String {
        format!(
            "array:{} ({}, {} members)",
            self.name,
            self.layout.level.name(),
            self.members.len()
        )
    }

    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let len = req.len();
        if req.op != IoOp::Flush
            && (len == 0
                || req
                    .offset
                    .checked_add(len)
                    .is_none_or(|end| end > self.layout.size()))
        {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        // a one-piece read or write of a level without mirrors: straight to its member
        if !self.mirrored()
            && matches!(req.op, IoOp::Read | IoOp::Write { .. })
            && len <= MAX_CHILD
            && let Some(e) = self.layout.single(req.offset, len)
        {
            return self.submit_direct(req, e);
        }
        self.submit_split(req, len);
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let now = self.step_begin();
        let direct = self.poll_members(done);
        self.step_end(now);
        std::mem::swap(&mut self.done_q, &mut self.done_scratch);
        let n = self.done_scratch.len() + direct;
        for (t, s) in self.done_scratch.drain(..) {
            done(t, s);
        }
        self.in_flight -= n;
        if n > 0 && self.in_flight == 0 {
            self.publish_pending = true; // show the idle state soon
        }
        n
    }

    /// Guest requests in flight (and completions not yet handed out), plus, for an array no
    /// thread drives, one while background work waits for polls (a rebuild, a superblock or
    /// bitmap round, bits to clear, a management command): a controller polls a backend
    /// only while it has requests in flight.
    fn in_flight(&self) -> usize {
        self.in_flight + usize::from(!self.driven && self.background())
    }

    fn guest_memory_changed(&mut self) {
        for m in &mut self.members {
            if let Some(b) = m.backend.as_mut() {
                b.guest_memory_changed();
            }
        }
    }
}

impl Array {
    /// A clean stop: no guest request in flight, so every bit not sticky is cleared and
    /// written (the next assembly then has nothing to resync); bounded by `limit`.
    fn stop_cleanly(&mut self, limit: std::time::Duration) {
        if self.in_flight > 0 || self.members.iter().all(|m| m.backend.is_none()) {
            return;
        }
        self.queued.clear();
        if self.rebuild.is_some() {
            self.abort_rebuild(super::rebuild::STOPPED.into());
        }
        self.bitmap.clear_all_idle();
        let t = Instant::now();
        while self.meta_busy() && t.elapsed() < limit {
            self.poll(&mut |_, _| {});
            std::thread::yield_now();
        }
    }

    /// Stop the array cleanly and give its members back (describe, backend).
    pub fn take_members(&mut self) -> Vec<(String, Box<dyn Backend>)> {
        self.stop_cleanly(std::time::Duration::from_secs(5));
        self.members
            .iter_mut()
            .filter(|m| m.outstanding == 0)
            .filter_map(|m| Some((m.describe.clone(), m.backend.take()?)))
            .collect()
    }
}

impl Drop for Array {
    fn drop(&mut self) {
        self.stop_cleanly(std::time::Duration::from_millis(500));
        self.shared.closed();
    }
}
