//! The records an array keeps per request in flight: a guest request split into parts (its
//! parent record and stage), each part sent to a member (a child record), and a metadata
//! write of a round; a request of the fast path (see [`super::direct`]). Kept in slabs in [`super::array::Array`], reused from request to
//! request.

use device_model::backend::{GuestBufferList, IoOp};
use nvme_spec::Status;

use super::tags::{DIRECT_CARRIED, DIRECT_READ, KIND_DIRECT, KIND_SHIFT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Where a split request stands.
pub(super) enum Stage {
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

/// A guest request split into parts.
pub(super) struct Parent {
    pub(super) stage: Stage,
    pub(super) tag: u64,
    pub(super) op: IoOp,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) iov: GuestBufferList,
    pub(super) pending: u32,
    pub(super) status: Status,
    /// Member regions of a mirrored write (first, last).
    pub(super) regions: Option<(u64, u64)>,
    /// A mirror missed this write.
    pub(super) sticky: bool,
    /// Round that must be durable before completion (a member was retired under it).
    pub(super) hold: u64,
}

/// One part of a guest request, on one member.
pub(super) struct Child {
    pub(super) live: bool,
    pub(super) parent: u32,
    pub(super) slot: usize,
    pub(super) leg: usize,
    pub(super) op: IoOp,
    pub(super) member_off: u64,
    pub(super) iov: GuestBufferList,
    /// Slots tried (reads retried on another mirror).
    pub(super) tried: u32,
}

/// A superblock or bitmap block write of a round.
pub(super) struct MetaOp {
    pub(super) iov: GuestBufferList,
}

/// One request on the fast path whose caller's tag does not fit in the member tag.
struct Direct {
    /// The caller's tag.
    tag: u64,
    live: bool,
    read: bool,
}

/// The fast path's records, reused from request to request.
#[derive(Default)]
pub(super) struct Directs {
    slab: Vec<Direct>,
    free: Vec<u32>,
}

impl Directs {
    /// The member tag of a fast-path request with the caller's `tag`: the tag itself when
    /// it fits below [`DIRECT_READ`] (a controller's do while its reset epoch is below 2^20), else a record's index.
    #[inline]
    pub(super) fn start(&mut self, tag: u64, read: bool) -> u64 {
        let kind = KIND_DIRECT << KIND_SHIFT;
        if tag < DIRECT_READ {
            return kind | DIRECT_CARRIED | if read { DIRECT_READ } else { 0 } | tag;
        }
        let d = Direct {
            tag,
            live: true,
            read,
        };
        let i = if let Some(i) = self.free.pop() {
            self.slab[i as usize] = d;
            i
        } else {
            self.slab.push(d);
            (self.slab.len() - 1) as u32
        };
        kind | u64::from(i)
    }

    /// Member tag `t` (of kind [`KIND_DIRECT`]) is done: its caller's tag and whether it was
    /// a read (`None` for an index no live record has: a member's stray answer).
    #[inline]
    pub(super) fn finish(&mut self, t: u64) -> Option<(u64, bool)> {
        if t & DIRECT_CARRIED != 0 {
            return Some((t & (DIRECT_READ - 1), t & DIRECT_READ != 0));
        }
        let index = t & (DIRECT_CARRIED - 1);
        let d = self.slab.get_mut(usize::try_from(index).ok()?)?;
        if !d.live {
            return None;
        }
        d.live = false;
        self.free.push(index as u32);
        Some((d.tag, d.read))
    }

    /// Records allocated (a test checks they stop growing once warm).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.slab.capacity() + self.free.capacity()
    }
}
