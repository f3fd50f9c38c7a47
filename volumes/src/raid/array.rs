//! The array as a [`Backend`]: its state, members and records, and the entry points. The
//! work is done in sibling modules: [`super::direct`] (one-strip requests of the levels
//! without mirrors), [`super::requests`] (split and mirrored requests), [`super::rounds`]
//! (superblock and bitmap writes), [`super::step`] (what each poll runs),
//! [`super::manage`] (member changes), [`super::publish`] (status) and
//! [`super::rebuild_steps`]. Nothing here waits.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use device_model::backend::{Backend, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::bitmap::Bitmap;
use super::layout::{Extent, Layout};
use super::rebuild::{ChunkIo, DEPTH, Progress, RateLimit, Rebuild, RebuildKind};
use super::records::{Child, Directs, MetaOp, Parent};
use super::status::{ArrayStatus, Command, Shared};
use super::superblock::{DATA_OFFSET, SB_SIZE, SlotInfo, SlotState, Superblock};
use super::tags::{KIND_SHIFT, MAX_CHILD};

pub(super) const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// The lazy clear's tick: a region's bit is cleared one to two ticks after its last write.
pub(super) const CLEAR_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// One member slot.
pub(crate) struct Member {
    pub(crate) backend: Option<Box<dyn Backend>>,
    pub(crate) describe: String,
    /// The spec the superblocks record for this slot (how to open its member again).
    pub(crate) spec: String,
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
        // "(slot N)" names a slot whose member is unknown
        let spec = if describe.starts_with('(') {
            String::new()
        } else {
            describe.clone()
        };
        Self {
            backend,
            describe,
            spec,
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

/// An array of member backends, itself a backend.
pub struct Array {
    // members first: dropped before the records their requests use
    pub(crate) members: Vec<Member>,
    pub(crate) name: String,
    pub(crate) uuid: [u8; 16],
    pub(crate) layout: Layout,
    /// The layout's level keeps copies (asked on every request).
    pub(super) mirrored: bool,
    pub(crate) generation: u64,
    pub(crate) bitmap: Bitmap,
    pub(super) parents: Vec<Parent>,
    pub(super) free_parents: Vec<u32>,
    pub(super) children: Vec<Child>,
    pub(super) free_children: Vec<u32>,
    pub(super) directs: Directs,
    pub(super) waiting: VecDeque<u32>,
    pub(super) held: VecDeque<u32>,
    pub(super) done_q: Vec<(u64, Status)>,
    pub(super) done_scratch: Vec<(u64, Status)>,
    /// Fast-path completions a step without a caller collects for the next poll.
    pub(super) direct_done: Vec<(u64, Status)>,
    pub(super) events: Vec<(usize, u64, Status)>,
    pub(super) extents: Vec<Extent>,
    pub(super) in_flight: usize,
    // superblock + bitmap rounds
    pub(super) sb_dirty: bool,
    /// This round could not be written to the last copy of some leg.
    pub(super) round_failed: bool,
    /// This round writes the superblocks.
    pub(super) round_sb: bool,
    /// The guest memory of the controller the array serves, once known: given to members
    /// added later too ([`Backend::use_guest_memory`]).
    pub(crate) guest: Option<Arc<device_model::GuestMemory>>,
    pub(super) sb_bufs: Vec<IoBuffer>,
    pub(super) bm_buf: IoBuffer,
    pub(super) meta: Vec<MetaOp>,
    pub(super) meta_used: usize,
    pub(super) meta_pending: usize,
    pub(super) meta_round: u64,
    pub(super) round_blocks: Vec<u64>,
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
    pub(super) commands: Receiver<Command>,
    pub(super) shared: Arc<Shared>,
    pub(super) ops: u64,
    pub(super) polls: u32,
    pub(super) last_publish: Instant,
    pub(super) last_ops: u64,
    pub(super) last_clear: Instant,
    pub(super) status_dirty: bool,
    /// Guest I/O went idle: publish once more (at most every 100 ms).
    pub(super) publish_pending: bool,
    /// A thread steps it when no reactor polls (see [`super::driver`]).
    pub(crate) driven: bool,
    /// When a stopped rebuild is tried again.
    pub(super) retry_at: Option<Instant>,
    /// The clock as last read (see `step`).
    pub(super) now: Instant,
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
            round_failed: false,
            round_sb: false,
            guest: None,
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
            specs: self.members.iter().map(|m| m.spec.clone()).collect(),
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
    pub(super) fn state_name(&self) -> &'static str {
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

    fn use_guest_memory(&mut self, guest: &Arc<device_model::GuestMemory>) {
        for m in &mut self.members {
            if let Some(b) = m.backend.as_mut() {
                b.use_guest_memory(guest);
            }
        }
        self.guest = Some(Arc::clone(guest));
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
