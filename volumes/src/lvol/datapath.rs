//! Guest I/O on volumes: a request is split on cluster boundaries, each piece read from
//! or written to the physical clusters its map entry names. Requests in flight live in
//! slabs (no allocation per request once warmed up); the base's completions come back
//! by slot number and are routed to the handle that submitted the request.
//!
//! A write to a cluster the volume does not own alone (unmapped, or shared with a
//! snapshot) first gets an exclusive top cluster ([`Core::writable_top`], `cow.rs`); the
//! granules it fills are recorded valid when the base completes the write. A FUA write
//! completes after a commit, as does a Flush (`commit.rs`).

use device_model::backend::{GuestBuffers, IoOp, IoRequest, zeroes};
use nvme_spec::Status;

use super::commit_plan::COMMIT;
use super::inflight::{Action, DIRECT, Touch};
use super::map::{Entry, all_set, set_bits};
use super::store::Core;
use super::syncio::INTERNAL;

/// NVMe "Namespace is Write Protected" (generic status 20h).
pub const WRITE_PROTECTED: Status = Status::dnr(nvme_spec::status::sct::GENERIC, 0x20);

impl Core {
    /// Start guest request `req` of handle `user` on volume `vol`.
    pub(crate) fn submit(
        &mut self,
        user: usize,
        vol: u32,
        req: &IoRequest<'_>,
    ) -> Result<(), Status> {
        let v = self
            .meta
            .volumes
            .get(&vol)
            .ok_or(Status::INVALID_NAMESPACE)?;
        let (size, read_only, thin) = (v.size, v.read_only, v.thin);
        let direct = self.direct_target(&v.map, req);
        if req.op == IoOp::Flush {
            // answered by a commit that starts after it arrived (NVMe base 2.0 §7.1: it
            // covers the writes completed before it)
            let r = self.dp.new_req(user, req.tag, false, false);
            self.dp.commit_waiting.push(r);
            self.kick_commit();
            return Ok(());
        }
        let len = req.len();
        if req.offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let writes = !matches!(req.op, IoOp::Read);
        if writes && read_only {
            return Err(WRITE_PROTECTED);
        }
        if writes && self.failed.is_some() {
            return Err(Status::INTERNAL_ERROR);
        }
        if let Some(at) = direct
            && (!writes || self.direct_write_ok())
        {
            return self.submit_direct(user, req, at);
        }
        // a request cannot need more new clusters than it spans: the exact count only
        // when the store is nearly full
        let spans =
            (req.offset + len).div_ceil(self.geo.cluster_size) - req.offset / self.geo.cluster_size;
        if writes && spans as usize > self.free.len() {
            let need = self.clusters_needed(vol, req.offset, len, req.op, thin);
            if need > self.free.len() {
                // clusters released but not yet reusable: wait for them (`space.rs`)
                if self.space_coming(need) && self.failed.is_none() {
                    self.park_for_space(user, vol, req);
                    return Ok(());
                }
                return Err(Status::CAPACITY_EXCEEDED);
            }
        }
        let fua = matches!(req.op, IoOp::Write { fua: true });
        let r = self.dp.new_req(user, req.tag, fua, writes);
        let cs = self.geo.cluster_size;
        let mut done = 0u64;
        while done < len {
            let at = req.offset + done;
            let l = (at / cs) as u32;
            let coff = at % cs;
            let n = (cs - coff).min(len - done);
            let res = match req.op {
                IoOp::Read => {
                    self.read_piece(r, vol, l, coff, n, (req.iov, done));
                    Ok(())
                }
                IoOp::Write { .. } => self.write_piece(r, vol, l, coff, n, Some((req.iov, done))),
                IoOp::WriteZeroes { .. } | IoOp::Deallocate { .. } => {
                    let whole = coff == 0 && (n == cs || at + n == size);
                    self.zero_piece(r, vol, l, coff, n, thin && whole)
                }
                IoOp::Flush => Ok(()),
            };
            if let Err(s) = res {
                self.dp.reqs[r as usize].status = s;
                break;
            }
            done += n;
        }
        self.piece_done(r, Status::SUCCESS);
        self.apply_deferred();
        Ok(())
    }

    /// New clusters a write-like request may need (unmapped or shared entries it touches).
    fn clusters_needed(&self, vol: u32, off: u64, len: u64, op: IoOp, thin: bool) -> usize {
        let Some(v) = self.meta.volumes.get(&vol) else {
            return 0;
        };
        let cs = self.geo.cluster_size;
        let zeroing = matches!(op, IoOp::WriteZeroes { .. } | IoOp::Deallocate { .. });
        let (first, last) = (off / cs, (off + len).div_ceil(cs));
        (first..last)
            .filter(|&l| {
                let e = &v.map[l as usize];
                let piece_start = (l * cs).max(off);
                let piece_end = ((l + 1) * cs).min(off + len).min(v.size);
                let whole =
                    piece_start == l * cs && (piece_end - piece_start == cs || piece_end == v.size);
                if zeroing && ((thin && whole) || !e.is_mapped()) {
                    return false;
                }
                match e.top() {
                    None => true,
                    Some(c) => self.refs[c as usize] > 1,
                }
            })
            .count()
    }

    fn read_piece(
        &mut self,
        r: u32,
        vol: u32,
        l: u32,
        coff: u64,
        n: u64,
        (iov, boff): (GuestBuffers<'_>, u64),
    ) {
        let g = self.geo.granule;
        let entry = &self.meta.volumes[&vol].map[l as usize];
        let e = match entry {
            Entry::Unmapped => return fill_zero(iov, boff, n),
            Entry::Full(c) => {
                let (c, off) = (*c, self.geo.cluster_at(*c) + coff);
                let touch = Some(Touch {
                    cluster: c,
                    write: false,
                });
                return self.sub(
                    r,
                    (Action::None, touch),
                    IoOp::Read,
                    off,
                    Some((iov, boff, n)),
                );
            }
            layered @ Entry::Layered(_) => layered.clone(),
        };
        // runs of granules served by one source
        let mut pos = coff;
        let end = coff + n;
        while pos < end {
            let src = e.source((pos / g) as u32);
            let mut stop = ((pos / g) + 1) * g;
            while stop < end && e.source((stop / g) as u32) == src {
                stop += g;
            }
            let stop = stop.min(end);
            let at = boff + pos - coff;
            match src {
                None => fill_zero(iov, at, stop - pos),
                Some(c) => {
                    let off = self.geo.cluster_at(c) + pos;
                    let touch = Some(Touch {
                        cluster: c,
                        write: false,
                    });
                    self.sub(
                        r,
                        (Action::None, touch),
                        IoOp::Read,
                        off,
                        Some((iov, at, stop - pos)),
                    );
                }
            }
            pos = stop;
        }
    }

    /// Submit one base request for guest request `r`: what its completion changes, and
    /// the physical cluster it reads or writes (counted while in flight).
    pub(crate) fn sub(
        &mut self,
        r: u32,
        (action, touch): (Action, Option<Touch>),
        op: IoOp,
        offset: u64,
        data: Option<(GuestBuffers<'_>, u64, u64)>,
    ) {
        if let Some(t) = touch {
            self.touch(t);
        }
        let i = self.dp.new_sub(r, action, touch);
        let s = &mut self.dp.subs[i as usize];
        if let Some((iov, boff, len)) = data {
            s.list.set_range(iov, boff, len);
        }
        let req = IoRequest {
            tag: u64::from(i),
            op,
            offset,
            iov: s.list.as_buffers(),
        };
        if let Err(st) = self.base.submit(&req) {
            self.complete_sub(u64::from(i), st);
        }
    }

    /// Write `n` bytes at `coff` of logical cluster `l` from `data` (guest buffers at an
    /// offset), or zeroes when `data` is none.
    pub(crate) fn write_piece(
        &mut self,
        r: u32,
        vol: u32,
        l: u32,
        coff: u64,
        n: u64,
        data: Option<(GuestBuffers<'_>, u64)>,
    ) -> Result<(), Status> {
        let top = self.writable_top(vol, l)?;
        // a partial granule the top does not hold yet gets its old contents first (`fill.rs`)
        if self.stall_for_fill(r, (vol, l), (coff, n), data) {
            return Ok(());
        }
        let g = self.geo.granule;
        let g0 = (coff / g) as u32;
        let g1 = (coff + n).div_ceil(g) as u32;
        let layered = matches!(self.meta.volumes[&vol].map[l as usize], Entry::Layered(_));
        let action = if layered {
            Action::Bits {
                vol,
                l,
                cluster: top,
                g0,
                g1,
            }
        } else {
            Action::None
        };
        let off = self.geo.cluster_at(top) + coff;
        let touch = Some(Touch {
            cluster: top,
            write: true,
        });
        match data {
            Some((iov, boff)) => self.sub(
                r,
                (action, touch),
                IoOp::Write { fua: false },
                off,
                Some((iov, boff, n)),
            ),
            None => self.sub(r, (action, touch), IoOp::WriteZeroes { len: n }, off, None),
        }
        Ok(())
    }

    /// Write Zeroes or Deallocate over a piece: a whole cluster of a thin volume is
    /// unmapped (its clusters return to the store), an unmapped one is left alone, else
    /// zeroes are written.
    fn zero_piece(
        &mut self,
        r: u32,
        vol: u32,
        l: u32,
        coff: u64,
        n: u64,
        unmap: bool,
    ) -> Result<(), Status> {
        let v = self
            .meta
            .volumes
            .get_mut(&vol)
            .ok_or(Status::INTERNAL_ERROR)?;
        let e = &mut v.map[l as usize];
        if !e.is_mapped() {
            return Ok(());
        }
        if unmap {
            let old = std::mem::take(e);
            for c in old.clusters() {
                self.unref(c);
            }
            self.dirty.insert((vol, l));
            return Ok(());
        }
        self.write_piece(r, vol, l, coff, n, None)
    }

    /// One piece of guest request `r` finished with `status`.
    pub(crate) fn piece_done(&mut self, r: u32, status: Status) {
        let q = &mut self.dp.reqs[r as usize];
        if !status.is_success() && q.status.is_success() {
            q.status = status;
        }
        q.left -= 1;
        if q.left > 0 {
            return;
        }
        let (user, tag, st, fua) = (q.user, q.tag, q.status, q.fua);
        // a write whose mapping change is still in memory only (or another's: the commit
        // takes them all), or in a commit that is not durable yet
        let mapped = q.writes
            && self.mappings_before_ack
            && !(self.dirty.is_empty() && self.records.is_empty() && self.job.is_none());
        if (fua || mapped) && st.is_success() {
            self.dp.commit_waiting.push(r);
            return;
        }
        self.dp.push_done(user, tag, st);
        self.dp.free_reqs.push(r);
    }

    /// A base request finished.
    fn complete_sub(&mut self, tag: u64, status: Status) {
        if tag & (INTERNAL | DIRECT) == DIRECT
            && let Some(t) = self.dp.direct_done(tag as u32, status)
        {
            return self.untouch(t);
        }
        if tag & INTERNAL != 0 {
            if tag & COMMIT != 0 {
                self.commit_step_done(tag, status);
            }
            return;
        }
        let Some(s) = self.dp.subs.get_mut(tag as usize) else {
            log::warn!(
                "volume store {}: a completion for unknown tag {tag:#x}",
                self.sb.name
            );
            return;
        };
        let (req, action, touch) = (s.req, s.action, s.touch);
        s.list.clear();
        self.dp.free_subs.push(tag as u32);
        self.dp.in_flight -= 1;
        if let Some(t) = touch {
            self.untouch(t);
        }
        match action {
            Action::Bits {
                vol,
                l,
                cluster,
                g0,
                g1,
            } if status.is_success() => self.set_valid(vol, l, cluster, g0, g1),
            Action::FillRead(f) => self.fill_step(req, f, false, status),
            Action::FillWrite(f) => self.fill_step(req, f, true, status),
            _ => {}
        }
        self.piece_done(req, status);
    }

    /// Granules `[g0, g1)` of `cluster` hold data in entry `l` of `vol` (the layer may
    /// have moved down under a newer top since the write started).
    pub(crate) fn set_valid(&mut self, vol: u32, l: u32, cluster: u32, g0: u32, g1: u32) {
        let granules = self.geo.granules();
        let Some(e) = self
            .meta
            .volumes
            .get_mut(&vol)
            .and_then(|v| v.map.get_mut(l as usize))
        else {
            return;
        };
        let Entry::Layered(ls) = e else {
            return;
        };
        let Some(layer) = ls.iter_mut().find(|x| x.cluster == cluster) else {
            return;
        };
        if !set_bits(&mut layer.valid, g0, g1) {
            return;
        }
        self.dirty.insert((vol, l));
        if ls[0].cluster == cluster && all_set(&ls[0].valid, granules) {
            // the top holds everything: the layers under it are no longer read
            let old = std::mem::replace(e, Entry::Full(cluster));
            for c in old.clusters().skip(1) {
                self.unref(c);
            }
        }
    }

    /// Poll the base: route completions (the running commit's steps among them), start
    /// the commit requests wait for.
    pub(crate) fn poll_base(&mut self) {
        let mut got = std::mem::take(&mut self.dp.scratch);
        self.base.poll(&mut |t, s| got.push((t, s)));
        for (t, s) in got.drain(..) {
            self.complete_sub(t, s);
        }
        self.dp.scratch = got;
        self.apply_deferred();
        self.retry_stalled();
        if self.quarantine_due {
            self.release_quarantine();
        }
        self.retry_parked();
        self.kick_commit();
    }

    /// Apply the data completions that arrived during metadata I/O.
    pub(crate) fn apply_deferred(&mut self) {
        while !self.sync.deferred.is_empty() {
            let d = std::mem::take(&mut self.sync.deferred);
            for (t, s) in d {
                self.complete_sub(t, s);
            }
        }
    }

    /// Wait until no data request is in flight on the base (nor a piece waits for a fill).
    pub(crate) fn wait_idle(&mut self) {
        self.apply_deferred();
        self.retry_stalled();
        while self.dp.in_flight() > 0 || self.stalled() > 0 {
            let mut got = std::mem::take(&mut self.dp.scratch);
            self.base.poll(&mut |t, s| got.push((t, s)));
            let idle = got.is_empty();
            for (t, s) in got.drain(..) {
                self.complete_sub(t, s);
            }
            self.dp.scratch = got;
            self.retry_stalled();
            if idle {
                std::thread::yield_now();
            }
        }
    }
}

/// Zero `len` bytes of `iov` from `off`.
fn fill_zero(iov: GuestBuffers<'_>, off: u64, len: u64) {
    let z = zeroes();
    let mut done = 0u64;
    while done < len {
        let k = (len - done).min(z.len() as u64) as usize;
        iov.write_at((off + done) as usize, &z[..k]);
        done += k as u64;
    }
}
