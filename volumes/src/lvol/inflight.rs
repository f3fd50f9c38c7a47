//! The data path's bookkeeping: guest requests and base requests in flight in slabs (no
//! allocation per request once warmed up), each handle's completion queue, and what waits
//! for a fill (`fill.rs`) or for freed clusters (`space.rs`).

use device_model::backend::{GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

/// Tags of fast-path requests (`direct.rs`) have this bit, an index in the direct slab
/// below it (data slab slots never reach it; metadata tags have `syncio::INTERNAL`, above).
pub(crate) const DIRECT: u64 = 1 << 38;

/// The physical cluster a base request reads or writes (counted per cluster in the core
/// while in flight: fills wait for writes, freed clusters for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Touch {
    pub(crate) cluster: u32,
    pub(crate) write: bool,
}

/// One guest request in flight.
#[derive(Debug)]
pub(super) struct GuestReq {
    pub(super) user: usize,
    pub(super) tag: u64,
    /// Base requests not yet complete (plus one while pieces are being submitted).
    pub(super) left: u32,
    pub(super) status: Status,
    pub(super) fua: bool,
    /// It changes data (a write, write zeroes or deallocate).
    pub(super) writes: bool,
}

/// What a base request's completion changes in the map.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum Action {
    #[default]
    None,
    /// Granules `[g0, g1)` of physical cluster `cluster` in entry `l` of volume `vol` hold
    /// data now.
    Bits {
        vol: u32,
        l: u32,
        cluster: u32,
        g0: u32,
        g1: u32,
    },
    /// The read of fill slot `.0` (`fill.rs`).
    FillRead(u32),
    /// The write of fill slot `.0`.
    FillWrite(u32),
}

/// One base request in flight.
#[derive(Debug, Default)]
pub(super) struct Sub {
    pub(super) req: u32,
    pub(super) list: GuestBufferList,
    pub(super) action: Action,
    /// The physical cluster it reads or writes.
    pub(super) touch: Option<Touch>,
}

/// A handle's completions.
#[derive(Debug, Default)]
pub(crate) struct User {
    pub(crate) done: Vec<(u64, Status)>,
    pub(crate) pending: usize,
    pub(crate) taken: bool,
}

/// Slabs of requests in flight and the handles' completion queues.
#[derive(Debug, Default)]
pub struct DataPath {
    pub(super) reqs: Vec<GuestReq>,
    pub(super) free_reqs: Vec<u32>,
    pub(super) subs: Vec<Sub>,
    pub(super) free_subs: Vec<u32>,
    pub(super) in_flight: usize,
    /// Fast-path requests in flight: handle, tag, and the cluster it reads or writes.
    pub(super) directs: Vec<(usize, u64, Touch)>,
    pub(super) free_directs: Vec<u32>,
    pub(crate) users: Vec<User>,
    /// Requests waiting for a commit to start: Flushes, and writes (FUA, or with mapping
    /// changes to commit before their ack) whose data is written.
    pub(super) commit_waiting: Vec<u32>,
    pub(super) scratch: Vec<(u64, Status)>,
}

impl DataPath {
    /// Base requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A new handle's index.
    pub(crate) fn register(&mut self) -> usize {
        let i = if let Some(i) = self.users.iter().position(|u| !u.taken && u.pending == 0) {
            i
        } else {
            self.users.push(User::default());
            self.users.len() - 1
        };
        self.users[i] = User {
            taken: true,
            ..User::default()
        };
        i
    }

    pub(super) fn new_req(&mut self, user: usize, tag: u64, fua: bool, writes: bool) -> u32 {
        let r = GuestReq {
            user,
            tag,
            left: 1,
            status: Status::SUCCESS,
            fua,
            writes,
        };
        if let Some(u) = self.users.get_mut(user) {
            u.pending += 1;
        }
        if let Some(i) = self.free_reqs.pop() {
            self.reqs[i as usize] = r;
            i
        } else {
            self.reqs.push(r);
            (self.reqs.len() - 1) as u32
        }
    }

    pub(super) fn new_sub(&mut self, req: u32, action: Action, touch: Option<Touch>) -> u32 {
        self.reqs[req as usize].left += 1;
        self.in_flight += 1;
        let i = if let Some(i) = self.free_subs.pop() {
            i
        } else {
            self.subs.push(Sub::default());
            (self.subs.len() - 1) as u32
        };
        let s = &mut self.subs[i as usize];
        s.req = req;
        s.action = action;
        s.touch = touch;
        s.list.clear();
        i
    }

    /// A fast-path request of handle `user` starts; its slot.
    #[inline]
    pub(super) fn start_direct(&mut self, user: usize, tag: u64, touch: Touch) -> u32 {
        if let Some(u) = self.users.get_mut(user) {
            u.pending += 1;
        }
        self.in_flight += 1;
        if let Some(i) = self.free_directs.pop() {
            self.directs[i as usize] = (user, tag, touch);
            i
        } else {
            self.directs.push((user, tag, touch));
            (self.directs.len() - 1) as u32
        }
    }

    /// Fast-path slot `i` is done (or was never started): its handle, tag and cluster.
    #[inline]
    pub(super) fn finish_direct(&mut self, i: u32) -> Option<(usize, u64, Touch)> {
        let (user, tag, touch) = *self.directs.get(i as usize)?;
        self.free_directs.push(i);
        self.in_flight -= 1;
        if let Some(u) = self.users.get_mut(user) {
            u.pending = u.pending.saturating_sub(1);
        }
        Some((user, tag, touch))
    }

    /// A fast-path request completed with `status`: the cluster it touched, none when no
    /// fast-path request has slot `i`.
    #[inline]
    pub(super) fn direct_done(&mut self, i: u32, status: Status) -> Option<Touch> {
        let (user, tag, touch) = self.finish_direct(i)?;
        self.deliver(user, tag, status);
        Some(touch)
    }

    /// Hand handle `user` the completion of its request `tag` (dropped if the handle is
    /// gone); its pending count is the caller's business (a request the store refused
    /// before starting it never had one).
    pub(crate) fn deliver(&mut self, user: usize, tag: u64, status: Status) {
        if let Some(u) = self.users.get_mut(user)
            && u.taken
        {
            u.done.push((tag, status));
        }
    }

    pub(super) fn push_done(&mut self, user: usize, tag: u64, status: Status) {
        if let Some(u) = self.users.get_mut(user) {
            u.pending = u.pending.saturating_sub(1);
        }
        self.deliver(user, tag, status);
    }
}

/// A piece of a guest write waiting for a fill (or for writes under it to land).
#[derive(Debug)]
pub(crate) struct Stalled {
    pub(super) r: u32,
    pub(super) vol: u32,
    pub(super) l: u32,
    pub(super) coff: u64,
    pub(super) n: u64,
    /// The guest's bytes for the piece; none for zeroes.
    pub(super) data: Option<GuestBufferList>,
}

/// A granule being copied up.
#[derive(Debug)]
pub(crate) struct Fill {
    pub(super) vol: u32,
    pub(super) l: u32,
    pub(super) top: u32,
    /// Granules `[g, g_end)`, held by one layer below (or none: zeroes).
    pub(super) g: u32,
    pub(super) g_end: u32,
    pub(super) buf: IoBuffer,
    pub(super) live: bool,
}

/// A guest request kept to be started later, its buffer list copied (the caller's lasts
/// only for its submit; the memory it describes until the completion).
#[derive(Debug)]
pub(crate) struct HeldRequest {
    tag: u64,
    op: IoOp,
    offset: u64,
    list: GuestBufferList,
}

impl HeldRequest {
    /// Keep `req`, its buffers described in `list` (a list to reuse, cleared here).
    pub(crate) fn keep(req: &IoRequest<'_>, mut list: GuestBufferList) -> Self {
        list.set_range(req.iov, 0, req.iov.len());
        Self {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            list,
        }
    }

    /// The caller's tag.
    pub(crate) fn tag(&self) -> u64 {
        self.tag
    }

    /// The request again.
    pub(crate) fn request(&self) -> IoRequest<'_> {
        IoRequest {
            tag: self.tag,
            op: self.op,
            offset: self.offset,
            iov: self.list.as_buffers(),
        }
    }

    /// Its buffer list, for reuse.
    pub(crate) fn into_list(mut self) -> GuestBufferList {
        self.list.clear();
        self.list
    }
}

/// A request waiting for clusters to become free.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(super) user: usize,
    pub(super) vol: u32,
    pub(super) req: HeldRequest,
}
