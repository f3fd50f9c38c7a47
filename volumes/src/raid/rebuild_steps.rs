//! The rebuild as the array runs it from `poll`: which legs and regions to copy, chunk reads
//! and writes kept in flight up to the rate limit, and what a finished or failed chunk does.

use std::time::{Duration, Instant};

use device_model::backend::{IoOp, IoRequest};
use nvme_spec::Status;

use super::array::Array;
use super::rebuild::{CHUNK, ChunkState, Progress, Rebuild, RebuildKind, RegionState, STOPPED};
use super::superblock::{DATA_OFFSET, SlotState};
use super::tags::{KIND_REBUILD, KIND_SHIFT};

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
        let c = &mut self.rb_chunks[k];
        c.iov.set_range(c.buf.buffers(), 0, len);
        c.state = ChunkState::Reading { leg, off, len };
        self.submit_chunk(k, source, IoOp::Read, off);
    }

    /// Send chunk `k`'s buffer to member `slot` as `op` at data offset `off`; a request the
    /// member refuses completes as an event with its status.
    fn submit_chunk(&mut self, k: usize, slot: usize, op: IoOp, off: u64) {
        let tag = self.chunk_tag(k);
        let c = &self.rb_chunks[k];
        let m = &mut self.members[slot];
        m.outstanding += 1;
        let res = m
            .backend
            .as_mut()
            .map_or(Err(Status::INTERNAL_PATH_ERROR), |b| {
                b.submit(&IoRequest {
                    tag,
                    op,
                    offset: DATA_OFFSET + off,
                    iov: c.iov.as_buffers(),
                })
            });
        if let Err(s) = res {
            self.events.push((slot, tag, s));
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
                for t in 0..self.members.len() {
                    if targets & (1 << t) != 0 {
                        self.submit_chunk(k, t, IoOp::Write { fua: false }, off);
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
