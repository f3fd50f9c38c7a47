//! Rebuilds: what they copy (the regions, in order), how fast (the rate limit), how far they
//! are (the progress the management plane shows), and the copying itself, driven from the
//! array's `poll`: one region at a time is locked (guest writes to it wait; those in flight
//! finish first), and up to [`DEPTH`] chunks of it are in flight at once, each read from an
//! in-sync mirror and then written to the mirrors being brought up to date. Nothing waits:
//! guest I/O goes on between and beside the chunks.

use std::time::{Duration, Instant};

use device_model::backend::{GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::array::{Array, KIND_REBUILD, KIND_SHIFT};
use super::superblock::{DATA_OFFSET, SlotState};

/// Bytes one chunk copies (a member request's largest transfer).
pub const CHUNK: u64 = super::array::MAX_CHILD;
/// Chunks in flight at once.
pub const DEPTH: usize = 4;
/// Why a rebuild stops for good at a clean stop.
pub(crate) const STOPPED: &str = "the array stopped";
/// Default rate limit: 200 MB/s.
pub const DEFAULT_RATE: u64 = 200_000_000;

/// Which copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildKind {
    /// After an unclean shutdown: make the in-sync mirrors agree on the dirty regions.
    Resync,
    /// Bring member `slot` up to date: the regions it missed (`partial`) or all of it.
    Recover { slot: usize, partial: bool },
}

impl RebuildKind {
    /// A word for listings.
    pub fn name(self) -> &'static str {
        match self {
            RebuildKind::Resync => "resync",
            RebuildKind::Recover { partial: true, .. } => "partial",
            RebuildKind::Recover { partial: false, .. } => "full",
        }
    }
}

/// A token bucket on bytes: a chunk may start when the bytes granted so far fit the rate
/// since the start (plus one chunk of burst). 0: no limit.
#[derive(Debug)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    start: Instant,
    granted: u64,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64, now: Instant) -> Self {
        Self {
            bytes_per_sec,
            start: now,
            granted: 0,
        }
    }

    /// Change the rate from now on.
    pub fn set(&mut self, bytes_per_sec: u64, now: Instant) {
        *self = Self::new(bytes_per_sec, now);
    }

    /// Take `bytes` if the rate allows it at `now`.
    pub fn try_take(&mut self, bytes: u64, now: Instant) -> bool {
        if self.bytes_per_sec == 0 {
            self.granted += bytes;
            return true;
        }
        let secs = now.duration_since(self.start).as_secs_f64();
        let allowed = (secs * self.bytes_per_sec as f64) as u64 + CHUNK;
        if self.granted + bytes <= allowed {
            self.granted += bytes;
            true
        } else {
            false
        }
    }
}

/// A rebuild's progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub kind: RebuildKind,
    /// Bytes to copy (per target), and copied so far.
    pub total: u64,
    pub copied: u64,
    pub regions: u64,
    pub regions_done: u64,
    pub elapsed: Duration,
    /// Rate limit in bytes/s (0: none).
    pub rate: u64,
    /// Done (the last rebuild, kept for listings).
    pub finished: bool,
    /// Why it stopped early, if it did.
    pub aborted: Option<String>,
}

impl Progress {
    /// Percent done.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            return 100.0;
        }
        self.copied as f64 * 100.0 / self.total as f64
    }
    /// Seconds left at the speed so far.
    pub fn eta_secs(&self) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        if self.copied == 0 || s <= 0.0 {
            return None;
        }
        Some((self.total - self.copied.min(self.total)) as f64 / (self.copied as f64 / s))
    }
}

/// Where one chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Free,
    Reading {
        leg: usize,
        off: u64,
        len: u64,
    },
    Writing {
        pending: u32,
        len: u64,
        failed: bool,
    },
}

/// One chunk's buffer, segment list and state (allocated once per array).
pub(crate) struct ChunkIo {
    buf: IoBuffer,
    iov: GuestBufferList,
    state: ChunkState,
}

impl ChunkIo {
    pub(crate) fn new() -> Self {
        Self {
            buf: IoBuffer::new(CHUNK as usize),
            iov: GuestBufferList::new(),
            state: ChunkState::Free,
        }
    }
}

/// Where the current region stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegionState {
    /// No region taken.
    Idle,
    /// Locked; waiting for the guest writes in flight to it.
    Locking,
    /// Chunks being copied.
    Copying,
}

/// A running rebuild.
pub(crate) struct Rebuild {
    pub(crate) kind: RebuildKind,
    regions: Vec<u64>,
    pos: usize,
    /// The next chunk of the current region: its leg and offset in the region.
    leg: usize,
    chunk_off: u64,
    region: RegionState,
    pub(crate) progress: Progress,
    pub(crate) started: Instant,
}

impl Array {
    /// The legs a rebuild copies in: `first..end`.
    fn rebuild_legs(&self, kind: RebuildKind) -> (usize, usize) {
        match kind {
            RebuildKind::Recover { slot, .. } => {
                let l = self.layout.leg_of(slot);
                (l, l + 1)
            }
            RebuildKind::Resync => (0, self.layout.legs()),
        }
    }

    /// True when member `s` of `leg` receives the copy from `source` in a rebuild of `kind`.
    fn copy_target(&self, kind: RebuildKind, source: usize, s: usize) -> bool {
        s != source
            && self.members[s].backend.is_some()
            && match kind {
                RebuildKind::Recover { slot, .. } => s == slot,
                RebuildKind::Resync => self.members[s].state == SlotState::Active,
            }
    }

    /// The in-sync member a leg's chunks are read from.
    fn copy_source(&self, leg: usize) -> Option<usize> {
        self.layout.slots(leg).find(|&s| {
            self.members[s].state == SlotState::Active && self.members[s].backend.is_some()
        })
    }

    /// Start the next queued rebuild, if none runs.
    pub(super) fn start_next_rebuild(&mut self, now: Instant) {
        if self.rebuild.is_some() {
            return;
        }
        let Some(kind) = self.queued.pop_front() else {
            return;
        };
        let regions: Vec<u64> = match kind {
            RebuildKind::Recover { partial: false, .. } => (0..self.bitmap.regions()).collect(),
            _ => self.bitmap.sticky_regions(),
        };
        let (first, end) = self.rebuild_legs(kind);
        let region = self.bitmap.region();
        let leg_size = self.layout.leg_size(0);
        let total: u64 = regions
            .iter()
            .map(|&r| region.min(leg_size.saturating_sub(r * region)))
            .sum::<u64>()
            * (end - first) as u64;
        log::info!(
            "array {}: {} rebuild of {} regions ({} MiB) starts",
            self.name,
            kind.name(),
            regions.len(),
            total >> 20
        );
        self.rb_epoch += 1;
        for c in &mut self.rb_chunks {
            c.state = ChunkState::Free;
        }
        self.rebuild = Some(Rebuild {
            kind,
            progress: Progress {
                kind,
                total,
                copied: 0,
                regions: regions.len() as u64,
                regions_done: 0,
                elapsed: Duration::ZERO,
                rate: self.rate.bytes_per_sec,
                finished: false,
                aborted: None,
            },
            regions,
            pos: 0,
            leg: first,
            chunk_off: 0,
            region: RegionState::Idle,
            started: now,
        });
        let r = self.rate.bytes_per_sec;
        self.rate.set(r, now);
        self.status_dirty = true;
    }

    /// Stop the running rebuild. One that still has a purpose (its target is still being
    /// rebuilt, or mirrors are to be resynced) is tried again a second later: the regions
    /// done are not copied again. Chunks still out are ignored when they come back.
    pub(super) fn abort_rebuild(&mut self, why: String) {
        let Some(mut rb) = self.rebuild.take() else {
            return;
        };
        let again = match rb.kind {
            RebuildKind::Recover { slot, .. } => self.members[slot].state == SlotState::Rebuilding,
            RebuildKind::Resync => true,
        } && why != STOPPED;
        log::warn!(
            "array {}: rebuild stopped: {why}{}",
            self.name,
            if again { "; trying again in 1 s" } else { "" }
        );
        if again {
            if let RebuildKind::Recover { partial: false, .. } = rb.kind {
                // a full copy goes on with the regions it has not done
                for &r in &rb.regions[rb.pos..] {
                    self.bitmap.mark_sticky(r);
                }
            }
            let kind = match rb.kind {
                // what it copied is in sync: the rest is what is still marked
                RebuildKind::Recover { slot, .. } => RebuildKind::Recover {
                    slot,
                    partial: true,
                },
                RebuildKind::Resync => RebuildKind::Resync,
            };
            self.queued.push_front(kind);
            self.retry_at = Some(Instant::now() + Duration::from_secs(1));
        }
        rb.progress.aborted = Some(why);
        rb.progress.elapsed = rb.started.elapsed();
        self.last_rebuild = Some(rb.progress);
        if rb.region != RegionState::Idle {
            self.locked = None;
        }
        self.rb_epoch += 1;
        self.status_dirty = true;
    }

    fn finish_rebuild(&mut self) {
        let Some(mut rb) = self.rebuild.take() else {
            return;
        };
        rb.progress.finished = true;
        rb.progress.elapsed = rb.started.elapsed();
        log::info!(
            "array {}: {} rebuild done: {} bytes copied in {:.1} s",
            self.name,
            rb.kind.name(),
            rb.progress.copied,
            rb.progress.elapsed.as_secs_f64()
        );
        if let RebuildKind::Recover { slot, .. } = rb.kind
            && self.members[slot].state == SlotState::Rebuilding
        {
            self.members[slot].state = SlotState::Active;
            self.bump_generation();
        }
        self.last_rebuild = Some(rb.progress);
        self.status_dirty = true;
    }

    /// The next chunk of the current region to copy: (leg, member offset, length), moving
    /// the cursor past it; `None` when the region has no more.
    fn next_piece(&mut self) -> Option<(usize, u64, u64)> {
        let region = self.bitmap.region();
        let rb = self.rebuild.as_ref()?;
        let (kind, r) = (rb.kind, rb.regions[rb.pos]);
        let (_, end) = self.rebuild_legs(kind);
        let (mut leg, mut chunk_off) = (rb.leg, rb.chunk_off);
        let piece = loop {
            if leg >= end {
                break None;
            }
            let off = r * region + chunk_off;
            let leg_size = self.layout.leg_size(leg);
            let needed = self.copy_source(leg).is_some_and(|src| {
                self.layout
                    .slots(leg)
                    .any(|s| self.copy_target(kind, src, s))
            });
            if chunk_off >= region || off >= leg_size || !needed {
                leg += 1;
                chunk_off = 0;
                continue;
            }
            let len = CHUNK.min(region - chunk_off).min(leg_size - off);
            chunk_off += len;
            break Some((leg, off, len));
        };
        let rb = self.rebuild.as_mut()?;
        rb.leg = leg;
        rb.chunk_off = chunk_off;
        piece
    }

    /// Advance the rebuild: take the next region, and keep up to [`DEPTH`] chunks of it in
    /// flight within the rate limit; a region whose chunks are all done is released.
    pub(super) fn rebuild_step(&mut self, now: Instant) {
        let Some(rb) = self.rebuild.as_ref() else {
            return;
        };
        match rb.region {
            RegionState::Idle => {
                if rb.pos == rb.regions.len() {
                    self.finish_rebuild();
                    return;
                }
                let r = rb.regions[rb.pos];
                let (first, _) = self.rebuild_legs(rb.kind);
                self.locked = Some(r);
                let rb = self.rebuild.as_mut().expect("rebuild");
                rb.region = RegionState::Locking;
                rb.leg = first;
                rb.chunk_off = 0;
                self.rebuild_step(now);
            }
            RegionState::Locking => {
                if self.bitmap.active(rb.regions[rb.pos]) > 0 {
                    return; // guest writes to it still in flight
                }
                self.rebuild.as_mut().expect("rebuild").region = RegionState::Copying;
                self.rebuild_step(now);
            }
            RegionState::Copying => {
                while let Some(k) = self
                    .rb_chunks
                    .iter()
                    .position(|c| c.state == ChunkState::Free)
                {
                    let Some((leg, off, len)) = self.next_piece() else {
                        break;
                    };
                    if !self.rate.try_take(len, now) {
                        // not yet: put the cursor back
                        let rb = self.rebuild.as_mut().expect("rebuild");
                        rb.leg = leg;
                        rb.chunk_off -= len;
                        break;
                    }
                    self.read_chunk(k, leg, off, len);
                    if self.rebuild.is_none() {
                        return;
                    }
                }
                let idle = self.rb_chunks.iter().all(|c| c.state == ChunkState::Free);
                let Some(rb) = self.rebuild.as_ref() else {
                    return;
                };
                let (_, end) = self.rebuild_legs(rb.kind);
                if idle && rb.leg >= end {
                    // region done
                    let r = rb.regions[rb.pos];
                    if !self.members.iter().any(|m| m.state == SlotState::Missing) {
                        self.bitmap.resynced(r);
                    }
                    self.locked = None;
                    let rb = self.rebuild.as_mut().expect("rebuild");
                    rb.pos += 1;
                    rb.progress.regions_done += 1;
                    rb.region = RegionState::Idle;
                }
            }
        }
    }

    fn chunk_tag(&self, k: usize) -> u64 {
        (KIND_REBUILD << KIND_SHIFT) | (self.rb_epoch << 8) | k as u64
    }

    /// Read chunk `k` (`len` bytes at `off` of `leg`) from the leg's in-sync member.
    fn read_chunk(&mut self, k: usize, leg: usize, off: u64, len: u64) {
        let Some(source) = self.copy_source(leg) else {
            self.abort_rebuild(format!("no in-sync member in leg {leg}"));
            return;
        };
        let tag = self.chunk_tag(k);
        let c = &mut self.rb_chunks[k];
        c.iov.set_range(c.buf.buffers(), 0, len);
        c.state = ChunkState::Reading { leg, off, len };
        let m = &mut self.members[source];
        m.outstanding += 1;
        let res = m
            .backend
            .as_mut()
            .map_or(Err(Status::INTERNAL_PATH_ERROR), |b| {
                b.submit(&IoRequest {
                    tag,
                    op: IoOp::Read,
                    offset: DATA_OFFSET + off,
                    iov: c.iov.as_buffers(),
                })
            });
        if let Err(s) = res {
            self.events.push((source, tag, s));
        }
    }

    /// A rebuild request of member `slot` finished (`tag`: epoch and chunk).
    pub(super) fn on_rebuild(&mut self, slot: usize, tag: u64, status: Status, now: Instant) {
        let m = &mut self.members[slot];
        m.outstanding = m.outstanding.saturating_sub(1);
        if m.state == SlotState::Missing && m.outstanding == 0 {
            m.backend = None;
        }
        let (epoch, k) = (tag >> 8, (tag & 0xff) as usize);
        if epoch != self.rb_epoch || k >= self.rb_chunks.len() {
            return; // a stopped rebuild's late answer
        }
        let Some(kind) = self.rebuild.as_ref().map(|rb| rb.kind) else {
            return;
        };
        match self.rb_chunks[k].state {
            ChunkState::Reading { leg, off, len } => {
                if !status.is_success() {
                    self.abort_rebuild(format!("read from member {slot} failed: {status:?}"));
                    return;
                }
                let targets: u32 = self
                    .layout
                    .slots(leg)
                    .filter(|&s| self.copy_target(kind, slot, s))
                    .map(|s| 1 << s)
                    .sum();
                self.rb_chunks[k].state = ChunkState::Writing {
                    pending: targets.count_ones(),
                    len,
                    failed: false,
                };
                if targets == 0 {
                    self.rb_chunks[k].state = ChunkState::Free;
                    return;
                }
                let tag = self.chunk_tag(k);
                for t in 0..self.members.len() {
                    if targets & (1 << t) == 0 {
                        continue;
                    }
                    let c = &self.rb_chunks[k];
                    let m = &mut self.members[t];
                    m.outstanding += 1;
                    let res = m
                        .backend
                        .as_mut()
                        .map_or(Err(Status::INTERNAL_PATH_ERROR), |b| {
                            b.submit(&IoRequest {
                                tag,
                                op: IoOp::Write { fua: false },
                                offset: DATA_OFFSET + off,
                                iov: c.iov.as_buffers(),
                            })
                        });
                    if let Err(s) = res {
                        self.events.push((t, tag, s));
                    }
                }
            }
            ChunkState::Writing {
                pending,
                len,
                failed,
            } => {
                let failed = failed || !status.is_success();
                if !status.is_success() {
                    let leg = self.layout.leg_of(slot);
                    if self.leg_active(leg) > 1 || self.members[slot].state != SlotState::Active {
                        self.retire(slot, &format!("rebuild write failed: {status:?}"));
                    }
                    if self.rebuild.is_none() {
                        return;
                    }
                }
                if pending > 1 {
                    self.rb_chunks[k].state = ChunkState::Writing {
                        pending: pending - 1,
                        len,
                        failed,
                    };
                    return;
                }
                self.rb_chunks[k].state = ChunkState::Free;
                if failed {
                    self.abort_rebuild("a write failed".into());
                    return;
                }
                if let Some(rb) = self.rebuild.as_mut() {
                    rb.progress.copied += len;
                }
                self.rebuild_step(now);
            }
            ChunkState::Free => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_holds_a_rebuild_to_its_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10 << 20, t0); // 10 MiB/s
        let mut granted = 0u64;
        // simulated clock: 2 s in 1 ms steps, asking for a chunk each step
        for ms in 0..2000u64 {
            let now = t0 + Duration::from_millis(ms);
            if r.try_take(CHUNK, now) {
                granted += CHUNK;
            }
        }
        let want = 20u64 << 20;
        assert!(
            granted <= want + CHUNK && granted >= want - 2 * CHUNK,
            "granted {granted}, want about {want}"
        );
        let mut free = RateLimit::new(0, t0);
        assert!((0..1000).all(|_| free.try_take(CHUNK, t0)));
    }

    #[test]
    fn progress_percent_and_eta() {
        let p = Progress {
            kind: RebuildKind::Recover {
                slot: 1,
                partial: true,
            },
            total: 100,
            copied: 25,
            regions: 4,
            regions_done: 1,
            elapsed: Duration::from_secs(1),
            rate: 0,
            finished: false,
            aborted: None,
        };
        assert!((p.percent() - 25.0).abs() < 1e-9);
        assert!((p.eta_secs().unwrap() - 3.0).abs() < 1e-9);
    }
}
