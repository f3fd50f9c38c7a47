//! The controller's queues by id (NVMe base 2.0 §3.3): the SQ and CQ of every id in use and
//! the ids themselves, so the hot path iterates queues without scanning every slot.

use super::{CompletionQueue, Slot, SubmissionQueue};

/// Every SQ and CQ of one controller, indexed by queue id (0 is the admin pair).
#[derive(Debug)]
pub struct Queues {
    pub sqs: Vec<Option<SubmissionQueue>>,
    pub cqs: Vec<Option<CompletionQueue>>,
    /// Ids of existing SQs / CQs, in creation order.
    pub active_sqs: Vec<u16>,
    pub active_cqs: Vec<u16>,
}

impl Queues {
    /// Room for queue ids `0..count`, none created.
    pub fn new(count: usize) -> Self {
        Self {
            sqs: (0..count).map(|_| None).collect(),
            cqs: (0..count).map(|_| None).collect(),
            active_sqs: Vec::with_capacity(count),
            active_cqs: Vec::with_capacity(count),
        }
    }

    /// Queue ids this controller can have: `0..capacity()`.
    pub fn capacity(&self) -> usize {
        self.sqs.len()
    }

    /// SQ `id`, if it exists.
    pub fn sq(&self, id: u16) -> Option<&SubmissionQueue> {
        self.sqs.get(id as usize)?.as_ref()
    }

    /// SQ `id`, if it exists.
    pub fn sq_mut(&mut self, id: u16) -> Option<&mut SubmissionQueue> {
        self.sqs.get_mut(id as usize)?.as_mut()
    }

    /// CQ `id`, if it exists.
    pub fn cq(&self, id: u16) -> Option<&CompletionQueue> {
        self.cqs.get(id as usize)?.as_ref()
    }

    /// CQ `id`, if it exists.
    pub fn cq_mut(&mut self, id: u16) -> Option<&mut CompletionQueue> {
        self.cqs.get_mut(id as usize)?.as_mut()
    }

    /// True when an I/O queue exists (Number of Queues may no longer change, §5.27.1.5).
    pub fn has_io_queues(&self) -> bool {
        self.active_sqs.len() > 1 || self.active_cqs.len() > 1
    }

    /// The context of the command in `slot` of SQ `qid`.
    pub fn slot_mut(&mut self, qid: u16, slot: u16) -> Option<&mut Slot> {
        self.sq_mut(qid)?.slots.get_mut(slot as usize)
    }

    /// The context of the command in `slot` of SQ `qid`.
    pub fn slot(&self, qid: u16, slot: u16) -> Option<&Slot> {
        self.sq(qid)?.slots.get(slot as usize)
    }

    /// Add a CQ under its id (the caller checked the id is free and in range).
    pub fn insert_cq(&mut self, cq: CompletionQueue) {
        let id = cq.id;
        self.cqs[id as usize] = Some(cq);
        self.active_cqs.push(id);
    }

    /// Add an SQ under its id, counted on the CQ it posts to (which must exist).
    pub fn insert_sq(&mut self, sq: SubmissionQueue) {
        let id = sq.id;
        if let Some(cq) = self.cq_mut(sq.cqid) {
            cq.sq_count += 1;
        }
        self.sqs[id as usize] = Some(sq);
        self.active_sqs.push(id);
    }

    /// Remove SQ `id`; its CQ counts one SQ less.
    pub fn remove_sq(&mut self, id: u16) {
        if let Some(sq) = self.sqs.get_mut(id as usize).and_then(Option::take)
            && let Some(cq) = self.cq_mut(sq.cqid)
        {
            cq.sq_count -= 1;
        }
        self.active_sqs.retain(|&q| q != id);
    }

    /// Remove CQ `id` (the caller checked no SQ posts to it).
    pub fn remove_cq(&mut self, id: u16) {
        if let Some(q) = self.cqs.get_mut(id as usize) {
            *q = None;
        }
        self.active_cqs.retain(|&q| q != id);
    }

    /// Take every SQ out (a reset retires them with their commands in flight) and drop every
    /// CQ.
    pub fn take_all(&mut self) -> Vec<SubmissionQueue> {
        let sqs = self.sqs.iter_mut().filter_map(Option::take).collect();
        for q in &mut self.cqs {
            *q = None;
        }
        self.active_sqs.clear();
        self.active_cqs.clear();
        sqs
    }

    /// Commands the host has outstanding on the SQs that post to `cq`: not yet fetched, in
    /// flight, or completed but not yet consumed by the host.
    pub fn host_outstanding(
        sqs: &[Option<SubmissionQueue>],
        active: &[u16],
        cq: &CompletionQueue,
    ) -> u32 {
        let mut n = cq.used();
        for &q in active {
            if let Some(sq) = sqs[q as usize].as_ref()
                && sq.cqid == cq.id
            {
                n += super::ring_distance(sq.head, sq.tail, sq.size) + sq.in_flight() as u32;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqs_are_counted_on_their_cq_and_removal_keeps_the_ids_true() {
        let mut q = Queues::new(4);
        q.insert_cq(CompletionQueue::new(1, 0x1000, 16, 1, true));
        q.insert_sq(SubmissionQueue::new(1, 0x2000, 16, 1));
        q.insert_sq(SubmissionQueue::new(2, 0x3000, 16, 1));
        assert_eq!(q.cq(1).map(|c| c.sq_count), Some(2));
        assert!(q.has_io_queues());
        q.remove_sq(1);
        assert_eq!(q.cq(1).map(|c| c.sq_count), Some(1));
        assert_eq!(q.active_sqs, vec![2]);
        q.remove_sq(3); // never existed: nothing changes
        assert_eq!(q.cq(1).map(|c| c.sq_count), Some(1));
        assert_eq!(q.take_all().len(), 1);
        assert!(q.cq(1).is_none() && q.active_cqs.is_empty() && !q.has_io_queues());
        assert!(q.sq(9).is_none() && q.slot(9, 0).is_none());
    }
}
