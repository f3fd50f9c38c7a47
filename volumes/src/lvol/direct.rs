//! The fast path: a read, or a write that changes no mapping, within one cluster the
//! volume holds whole (a full entry; for a write, one no snapshot shares) goes to the base
//! as it came: the guest's buffer list passed through, one slab entry (handle and tag) in
//! flight, no piece bookkeeping. Its completion is handed to the handle from the poll that
//! finds it. What it does is what the general path does for such a request (the same base
//! request, no map change), so the crash and copy-on-write rules are untouched.

use device_model::backend::{IoOp, IoRequest};
use nvme_spec::Status;

use super::inflight::{DIRECT, Touch};
use super::map::Entry;
use super::store::Core;

impl Core {
    /// Where on the base request `req` on the volume with map `map` goes (offset, and the
    /// physical cluster), if it can take the fast path (checked again by the caller for a
    /// write: see [`Core::direct_write_ok`]).
    #[inline]
    pub(crate) fn direct_target(&self, map: &[Entry], req: &IoRequest<'_>) -> Option<(u64, u32)> {
        let write = match req.op {
            IoOp::Read => false,
            IoOp::Write { fua: false } => true,
            _ => return None,
        };
        let cs = self.geo.cluster_size;
        let coff = req.offset % cs;
        if coff + req.len() > cs {
            return None;
        }
        let Entry::Full(c) = map.get((req.offset / cs) as usize)? else {
            return None;
        };
        if write && self.refs.get(*c as usize) != Some(&1) {
            return None;
        }
        Some((self.geo.cluster_at(*c) + coff, *c))
    }

    /// A write may skip the general path: no mapping change of its own, and none of
    /// another's it would have to wait for (with mappings committed before the ack).
    #[inline]
    pub(crate) fn direct_write_ok(&self) -> bool {
        !self.mappings_before_ack
            || (self.dirty.is_empty() && self.records.is_empty() && self.job.is_none())
    }

    /// Send `req` of handle `user` to `at` in physical cluster `c` on the base.
    #[inline]
    pub(crate) fn submit_direct(
        &mut self,
        user: usize,
        req: &IoRequest<'_>,
        (at, c): (u64, u32),
    ) -> Result<(), Status> {
        let touch = Touch {
            cluster: c,
            write: req.op != IoOp::Read,
        };
        let i = self.dp.start_direct(user, req.tag, touch);
        self.touch(touch);
        let r = self.base.submit(&IoRequest {
            tag: DIRECT | u64::from(i),
            op: req.op,
            offset: at,
            iov: req.iov,
        });
        if r.is_err() {
            self.dp.finish_direct(i);
            self.untouch(touch);
        }
        r
    }
}
