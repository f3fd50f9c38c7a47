//! Partial granules without waiting in place.
//!
//! A write that covers part of a 4 KiB granule its volume's top layer does not hold yet
//! needs the granule's old contents there first (the rest of the granule would read zeroes
//! or garbage otherwise). The piece of the request waits in `stalled` while a fill copies the
//! granule up: read it from the layer that holds it (none: zeroes), write it to the top,
//! mark it valid; then the piece is tried again and, the granule now held, is written as
//! any other. A fill starts only when no write is in flight to any cluster of the entry
//! (counted per physical cluster in `cluster_writes`): a write still landing below would
//! be missed by the copy, one landing on the top could be overwritten by it. While a fill
//! runs on an entry, writes to the entry wait too. Nothing here waits for the base: the
//! reactor goes on; only the pieces concerned wait, and they are retried by the poll that
//! sees what they waited for complete.
//!
//! The same fills collapse an entry that has one layer more than [`MAX_LAYERS`] (a write
//! to a shared cluster whose entry was at the limit got a new top over it): every granule
//! the top lacks is copied up, a run of granules from the same layer per fill, and the entry
//! becomes that one full cluster when its last granule is in ([`Core::set_valid`]). The
//! write waits for that, not the reactor.

use device_model::backend::{GuestBufferList, GuestBuffers, IoBuffer, IoOp};
use nvme_spec::Status;

use super::inflight::{Action, Fill, Stalled, Touch};
use super::map::{Entry, MAX_LAYERS, bit};
use super::store::Core;

impl Core {
    /// The granules of `[coff, coff + n)` in entry `l` of `vol` that only partly belong to
    /// the write and that the top layer does not hold yet.
    fn partial_granules(&self, vol: u32, l: u32, coff: u64, n: u64) -> [Option<u32>; 2] {
        let g = self.geo.granule;
        let Some(Entry::Layered(ls)) = self
            .meta
            .volumes
            .get(&vol)
            .and_then(|v| v.map.get(l as usize))
        else {
            return [None, None];
        };
        let missing = |x: u32| (!bit(&ls[0].valid, x)).then_some(x);
        let g0 = (coff / g) as u32;
        let g1 = ((coff + n).div_ceil(g) - 1) as u32;
        let head = if coff.is_multiple_of(g) {
            None
        } else {
            missing(g0)
        };
        let tail = if (coff + n).is_multiple_of(g) || (head.is_some() && g1 == g0) {
            None
        } else {
            missing(g1)
        };
        [head, tail]
    }

    /// Whether piece `[coff, coff + n)` of entry `l` of `vol` (whose top is exclusive) must
    /// wait: stalled, with a fill started when nothing is in flight on the entry. The
    /// caller submits the piece itself when this returns false.
    pub(crate) fn stall_for_fill(
        &mut self,
        r: u32,
        (vol, l): (u32, u32),
        (coff, n): (u64, u64),
        data: Option<(GuestBuffers<'_>, u64)>,
    ) -> bool {
        let filling = self.filling.contains_key(&(vol, l));
        let collapse = self.over_the_layer_limit(vol, l);
        let need = self.partial_granules(vol, l, coff, n);
        if !filling && !collapse && need == [None, None] {
            return false;
        }
        let data = data.map(|(iov, boff)| {
            let mut list = GuestBufferList::new();
            list.set_range(iov, boff, n);
            list
        });
        self.dp.reqs[r as usize].left += 1;
        self.stalled.push(Stalled {
            r,
            vol,
            l,
            coff,
            n,
            data,
        });
        if !filling && self.entry_quiet(vol, l) {
            if collapse {
                for (g, g_end) in self.missing_runs(vol, l) {
                    self.start_fill(r, vol, l, g, g_end);
                }
            } else {
                for g in need.into_iter().flatten() {
                    self.start_fill(r, vol, l, g, g + 1);
                }
            }
        }
        true
    }

    /// Entry `l` of `vol` has more layers than [`MAX_LAYERS`]: its top is to take every
    /// granule before a write lands there.
    fn over_the_layer_limit(&self, vol: u32, l: u32) -> bool {
        matches!(
            self.meta.volumes.get(&vol).and_then(|v| v.map.get(l as usize)),
            Some(Entry::Layered(ls)) if ls.len() > MAX_LAYERS
        )
    }

    /// The granules the top layer of entry `l` of `vol` lacks, as runs `[g, g_end)` each
    /// held by one layer below (or by none).
    fn missing_runs(&self, vol: u32, l: u32) -> Vec<(u32, u32)> {
        let granules = self.geo.granules();
        let Some(e @ Entry::Layered(ls)) = self
            .meta
            .volumes
            .get(&vol)
            .and_then(|v| v.map.get(l as usize))
        else {
            return Vec::new();
        };
        let mut runs = Vec::new();
        let mut g = 0;
        while g < granules {
            if bit(&ls[0].valid, g) {
                g += 1;
                continue;
            }
            let src = e.source(g);
            let mut end = g + 1;
            while end < granules && !bit(&ls[0].valid, end) && e.source(end) == src {
                end += 1;
            }
            runs.push((g, end));
            g = end;
        }
        runs
    }

    /// No write is in flight to any cluster of entry `l` of `vol`.
    fn entry_quiet(&self, vol: u32, l: u32) -> bool {
        self.meta
            .volumes
            .get(&vol)
            .and_then(|v| v.map.get(l as usize))
            .is_none_or(|e| {
                e.clusters()
                    .all(|c| self.cluster_writes.get(c as usize).is_none_or(|&w| w == 0))
            })
    }

    /// Copy granules `[g, g_end)` of entry `l` of `vol` (held by one layer below, or none)
    /// into its top layer, for guest request `r`.
    fn start_fill(&mut self, r: u32, vol: u32, l: u32, g: u32, g_end: u32) {
        let e = &self.meta.volumes[&vol].map[l as usize];
        let (Some(top), src) = (e.top(), e.source(g)) else {
            return;
        };
        let gs = self.geo.granule;
        let fill = Fill {
            vol,
            l,
            top,
            g,
            g_end,
            buf: IoBuffer::new((u64::from(g_end - g) * gs) as usize),
            live: true,
        };
        let f = if let Some(i) = self.fills.iter().position(|f| !f.live) {
            self.fills[i] = fill;
            i as u32
        } else {
            self.fills.push(fill);
            (self.fills.len() - 1) as u32
        };
        *self.filling.entry((vol, l)).or_default() += 1;
        match src {
            Some(c) => self.fill_io(r, Action::FillRead(f), IoOp::Read, c),
            None => self.fill_write(r, f),
        }
    }

    /// Submit the read or the write of fill `f` over its buffer, on cluster `c`.
    fn fill_io(&mut self, r: u32, action: Action, op: IoOp, c: u32) {
        let f = match action {
            Action::FillRead(f) | Action::FillWrite(f) => f as usize,
            _ => return,
        };
        let gs = self.geo.granule;
        let (g, g_end) = (self.fills[f].g, self.fills[f].g_end);
        let off = self.geo.cluster_at(c) + u64::from(g) * gs;
        let len = u64::from(g_end - g) * gs;
        let touch = Touch {
            cluster: c,
            write: op != IoOp::Read,
        };
        let buf = std::mem::replace(&mut self.fills[f].buf, IoBuffer::new(0));
        self.sub(
            r,
            (action, Some(touch)),
            op,
            off,
            Some((buf.buffers(), 0, len)),
        );
        self.fills[f].buf = buf;
    }

    /// Write fill `f`'s granule (read, or zeroes) to the top.
    fn fill_write(&mut self, r: u32, f: u32) {
        let top = self.fills[f as usize].top;
        self.fill_io(r, Action::FillWrite(f), IoOp::Write { fua: false }, top);
    }

    /// A fill's read (`write` false) or write completed for guest request `r`.
    pub(crate) fn fill_step(&mut self, r: u32, f: u32, write: bool, status: Status) {
        if !write && status.is_success() {
            self.fill_write(r, f);
            return;
        }
        let fill = &mut self.fills[f as usize];
        fill.live = false;
        let (vol, l, top, g, g_end) = (fill.vol, fill.l, fill.top, fill.g, fill.g_end);
        if let Some(n) = self.filling.get_mut(&(vol, l)) {
            *n -= 1;
            if *n == 0 {
                self.filling.remove(&(vol, l));
            }
        }
        if status.is_success() {
            self.set_valid(vol, l, top, g, g_end);
        } else {
            // the pieces of this request give up with it (another's retry starts afresh)
            let mut i = 0;
            while i < self.stalled.len() {
                if self.stalled[i].r == r {
                    self.stalled.swap_remove(i);
                    self.piece_done(r, status);
                } else {
                    i += 1;
                }
            }
        }
        self.retry_due = true;
    }

    /// The in-flight count of `t`'s cluster and kind.
    #[inline]
    fn count_of(&mut self, t: Touch) -> Option<&mut u32> {
        let counts = if t.write {
            &mut self.cluster_writes
        } else {
            &mut self.cluster_reads
        };
        counts.get_mut(t.cluster as usize)
    }

    /// A base request on a physical cluster starts.
    #[inline]
    pub(crate) fn touch(&mut self, t: Touch) {
        if let Some(n) = self.count_of(t) {
            *n += 1;
        }
    }

    /// A base request on a physical cluster ended: a stalled piece or a quarantined
    /// cluster may have waited for it.
    #[inline]
    pub(crate) fn untouch(&mut self, t: Touch) {
        let Some(n) = self.count_of(t) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.retry_due |= t.write && !self.stalled.is_empty();
            self.quarantine_due |= !self.quarantine.is_empty();
        }
    }

    /// No base request is in flight on physical cluster `c`.
    pub(crate) fn cluster_idle(&self, c: u32) -> bool {
        let i = c as usize;
        self.cluster_writes.get(i).is_none_or(|&n| n == 0)
            && self.cluster_reads.get(i).is_none_or(|&n| n == 0)
    }

    /// Try the stalled pieces again (what they waited for completed).
    pub(crate) fn retry_stalled(&mut self) {
        if !self.retry_due {
            return;
        }
        self.retry_due = false;
        for s in std::mem::take(&mut self.stalled) {
            let res = if self.meta.volumes.contains_key(&s.vol) {
                let data = s.data.as_ref().map(|d| (d.as_buffers(), 0));
                self.write_piece(s.r, s.vol, s.l, s.coff, s.n, data)
            } else {
                Err(Status::ABORT_REQUESTED)
            };
            self.piece_done(s.r, res.err().unwrap_or(Status::SUCCESS));
        }
    }

    /// Pieces waiting for a fill.
    pub(crate) fn stalled(&self) -> usize {
        self.stalled.len()
    }
}
