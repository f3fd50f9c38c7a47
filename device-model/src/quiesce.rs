//! Resets and shutdowns that never block the reactor (NVMe base 2.0 §3.7.2, §3.6).
//!
//! A reset must not let a backend request outlive what it points into, and must not stop
//! every other controller on the same reactor while a slow backend (an NVMe/TCP target that
//! went away, a stalled SSD) finishes. So a reset is a state the controller polls through:
//! it stops fetching, keeps reaping its backends (completions are dropped: the queues they
//! would post to are going away) and finishes when nothing is in flight or after
//! [`RESET_WAIT`]. Requests still in flight then are *retired*: their queues, command slots
//! and guest memory snapshots move here and stay alive until the backend answers, and every
//! backend tag carries the controller's reset epoch, so a late completion is recognised and
//! dropped, never posted to a queue that reused the number.

use std::time::{Duration, Instant};

use nvme_spec::Status;

use crate::queue::SubmissionQueue;

/// How long a reset waits for in-flight backend requests before retiring them.
pub const RESET_WAIT: Duration = Duration::from_secs(10);
/// How long a shutdown notification waits for in-flight requests before flushing anyway, and
/// then for the flushes.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

const EPOCH_BITS: u32 = 24;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;

/// Backend request tag: reset epoch in bits 55:32, SQ id in bits 31:16, slot in bits 15:0
/// (bits 63:56 stay free for [`crate::backend::shared`]'s user index).
pub(crate) fn tag(epoch: u32, qid: u16, slot: u16) -> u64 {
    ((u64::from(epoch) & EPOCH_MASK) << 32) | (u64::from(qid) << 16) | u64::from(slot)
}

/// The parts of a tag: (epoch, SQ id, slot).
pub(crate) fn untag(t: u64) -> (u32, u16, u16) {
    (((t >> 32) & EPOCH_MASK) as u32, (t >> 16) as u16, t as u16)
}

/// A reset in progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingReset {
    pub until: Instant,
    /// A device-level reset (FLR, vfio-user reset, client gone) rather than CC.EN 1->0.
    pub device: bool,
}

/// Flushes the controller sent on its own, one per namespace (shutdown notification, daemon
/// stop): done when `left` is 0.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OwnFlush {
    /// In their tags' slot field: answers of an earlier round are told apart.
    pub seq: u16,
    pub left: usize,
    /// The first error.
    pub status: Status,
    pub until: Instant,
    /// For a shutdown notification (SHST complete once done).
    pub shutdown: bool,
}

/// Queues retired by one reset with backend requests still in flight.
#[derive(Debug)]
struct Retired {
    epoch: u32,
    /// Their command slots hold the guest memory snapshots the requests point into.
    _sqs: Vec<SubmissionQueue>,
    outstanding: usize,
}

/// A controller's reset and shutdown state.
#[derive(Debug, Default)]
pub(crate) struct Quiesce {
    epoch: u32,
    pub resetting: Option<PendingReset>,
    /// A shutdown notification waiting for in-flight requests (then: flush, SHST complete).
    pub shutting_down: Option<Instant>,
    /// The controller's own flushes in flight.
    pub flushing: Option<OwnFlush>,
    flush_seq: u16,
    retired: Vec<Retired>,
}

impl Quiesce {
    /// The current reset epoch (goes into every backend tag).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Start waiting for in-flight requests before a reset.
    pub fn begin_reset(&mut self, device: bool, now: Instant) {
        let device = device || self.resetting.is_some_and(|r| r.device);
        self.resetting = Some(PendingReset {
            until: now + RESET_WAIT,
            device,
        });
    }

    /// True while a reset waits, or retired requests are still out.
    pub fn busy(&self) -> bool {
        self.resetting.is_some() || !self.retired.is_empty()
    }

    /// Finish a reset: requests still in flight (`outstanding`) keep `sqs` alive here; the
    /// epoch moves on so their completions are recognised.
    pub fn retire(&mut self, sqs: Vec<SubmissionQueue>, outstanding: usize) {
        if outstanding > 0 {
            log::warn!(
                "reset with {outstanding} backend requests still in flight: their buffers \
                 stay mapped until the backend answers; the answers are dropped"
            );
            self.retired.push(Retired {
                epoch: self.epoch,
                _sqs: sqs,
                outstanding,
            });
        }
        self.epoch = (self.epoch + 1) & EPOCH_MASK as u32;
        self.resetting = None;
        self.shutting_down = None;
        self.flushing = None;
    }

    /// The sequence number of the next round of own flushes.
    pub fn next_flush_seq(&mut self) -> u16 {
        self.flush_seq = self.flush_seq.wrapping_add(1);
        self.flush_seq
    }

    /// One of the own flushes of round `seq` finished with `status`.
    pub fn own_flush_done(&mut self, seq: u16, status: Status) {
        if let Some(f) = self.flushing.as_mut().filter(|f| f.seq == seq) {
            f.left = f.left.saturating_sub(1);
            if f.status.is_success() {
                f.status = status;
            }
        }
    }

    /// A completion of an earlier epoch arrived: let go of what it held when it is the last.
    pub fn stale_completion(&mut self, epoch: u32) {
        if let Some(i) = self.retired.iter().position(|r| r.epoch == epoch) {
            let r = &mut self.retired[i];
            r.outstanding = r.outstanding.saturating_sub(1);
            if r.outstanding == 0 {
                self.retired.swap_remove(i);
            }
        }
    }

    /// Requests retired and not yet answered.
    pub fn retired_requests(&self) -> usize {
        self.retired.iter().map(|r| r.outstanding).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_the_epoch_and_leave_the_top_byte_free() {
        let t = tag(0xab_cdef, 0x1234, 0x5678);
        assert_eq!(t >> 56, 0);
        assert_eq!(untag(t), (0xab_cdef, 0x1234, 0x5678));
        assert_eq!(untag(tag(1 << 24, 1, 2)).0, 0, "epoch wraps in 24 bits");
    }

    #[test]
    fn retired_queues_live_until_their_last_request_answers() {
        let mut q = Quiesce::default();
        q.begin_reset(false, Instant::now());
        assert!(q.busy());
        q.retire(vec![SubmissionQueue::new(1, 0, 4, 1)], 2);
        assert_eq!(q.epoch(), 1);
        assert!(q.resetting.is_none() && q.busy());
        q.stale_completion(0);
        assert_eq!(q.retired_requests(), 1);
        q.stale_completion(7); // unknown epoch: ignored
        q.stale_completion(0);
        assert!(!q.busy());
        q.retire(Vec::new(), 0);
        assert!(!q.busy());
        assert_eq!(q.epoch(), 2);
    }
}
