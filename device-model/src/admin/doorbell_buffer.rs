//! Doorbell Buffer Config (NVMe base 2.0 §5.8): PRP1 is the shadow doorbell page, PRP2 the
//! EventIdx page, both page aligned and each holding one 4-byte entry per doorbell
//! (CAP.DSTRD = 0). The setting lasts until the next controller reset.

use nvme_spec::{Status, Submission};

use crate::memory::MemoryMap;
use crate::queue::Queues;
use crate::shadow_doorbell::ShadowDoorbells;

/// Check the two pages and move every existing queue's doorbell onto them (the admin queue
/// at least, which carries on from its current values). The caller keeps the result.
pub(crate) fn doorbell_buffer_config(
    queues: &mut Queues,
    page_size: u64,
    sqe: &Submission,
    mem: &MemoryMap,
) -> Result<ShadowDoorbells, Status> {
    let shadow = sqe.prp1.get();
    let event_idx = sqe.prp2.get();
    let mask = page_size - 1;
    if shadow & mask != 0 || event_idx & mask != 0 || shadow == event_idx {
        return Err(Status::INVALID_FIELD);
    }
    // one SQ tail and one CQ head entry per queue the controller can have
    let len = queues.capacity() as u64 * 8;
    if mem.check_range(shadow, len, true).is_err() || mem.check_range(event_idx, len, true).is_err()
    {
        return Err(Status::INVALID_FIELD);
    }
    let buf = ShadowDoorbells { shadow, event_idx };
    for sq in queues.sqs.iter_mut().flatten() {
        sq.doorbell = buf
            .attach(mem, 2 * sq.id as usize, sq.tail)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
    }
    for cq in queues.cqs.iter_mut().flatten() {
        cq.doorbell = buf
            .attach(mem, 2 * cq.id as usize + 1, cq.head)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
    }
    Ok(buf)
}
