//! Writes that wait for space without waiting in place.
//!
//! A cluster whose last reference went is not reusable at once: its release must be
//! committed first (`pending_free` -> a commit -> `quarantine`), and no base request started
//! before may still read or write it (counted per physical cluster: `Core::touch`). A write
//! to a nearly full store that needs clusters only that path can give is parked here with
//! its buffers; a commit is started, the quarantine hands clusters out as their last request
//! ends, and the parked requests are tried again by the poll that sees it. Only when even
//! that cannot give the room does a write get Capacity Exceeded.

use device_model::backend::{GuestBufferList, IoRequest};

use super::inflight::{HeldRequest, Parked};
use super::store::Core;

impl Core {
    /// Whether a write needing `need` clusters can get them once what was released is
    /// committed and idle.
    pub(crate) fn space_coming(&self, need: usize) -> bool {
        need <= self.free.len() + self.pending_free.len() + self.quarantine.len()
    }

    /// Park request `req` of handle `user` on volume `vol` until clusters are freed.
    pub(crate) fn park_for_space(&mut self, user: usize, vol: u32, req: &IoRequest<'_>) {
        if let Some(u) = self.dp.users.get_mut(user) {
            u.pending += 1;
        }
        self.parked.push(Parked {
            user,
            vol,
            req: HeldRequest::keep(req, GuestBufferList::new()),
        });
        if !self.pending_free.is_empty() {
            self.commit_wanted = true;
            self.kick_commit();
        }
        self.release_quarantine();
    }

    /// Hand quarantined clusters out again once no base request is in flight on them.
    pub(crate) fn release_quarantine(&mut self) {
        self.quarantine_due = false;
        if self.quarantine.is_empty() {
            return;
        }
        let before = self.free.len();
        let mut q = std::mem::take(&mut self.quarantine);
        let mut i = 0;
        while i < q.len() {
            if self.cluster_idle(q[i]) {
                self.free.push(q.swap_remove(i));
            } else {
                i += 1;
            }
        }
        self.quarantine = q;
        if self.free.len() != before {
            self.update_warning();
            self.space_due = true;
        }
    }

    /// Try the parked requests again (clusters were handed out, or a commit ended).
    pub(crate) fn retry_parked(&mut self) {
        if !self.space_due {
            return;
        }
        self.space_due = false;
        for p in std::mem::take(&mut self.parked) {
            if let Some(u) = self.dp.users.get_mut(p.user) {
                u.pending = u.pending.saturating_sub(1);
            }
            if let Err(s) = self.submit(p.user, p.vol, &p.req.request()) {
                self.dp.deliver(p.user, p.req.tag(), s);
            }
        }
    }
}
