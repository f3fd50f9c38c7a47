//! Doorbell Buffer Config (NVMe base 2.0 §5.8): PRP1 is the shadow doorbell page, PRP2 the
//! EventIdx page, both page aligned and each holding one 4-byte entry per doorbell
//! (CAP.DSTRD = 0). The setting lasts until the next controller reset.

use nvme_spec::{Status, Submission};

use crate::controller::Controller;
use crate::memory::MemoryMap;
use crate::shadow_doorbell::ShadowDoorbells;
use crate::stats::ControllerStats;

impl Controller {
    pub(crate) fn doorbell_buffer_config(&mut self, sqe: &Submission, mem: &MemoryMap) -> Status {
        let shadow = sqe.prp1.get();
        let event_idx = sqe.prp2.get();
        let mask = self.page_size - 1;
        if shadow & mask != 0 || event_idx & mask != 0 || shadow == event_idx {
            return Status::INVALID_FIELD;
        }
        // one SQ tail and one CQ head entry per queue the controller can have
        let len = self.sqs.len() as u64 * 8;
        if mem.check_range(shadow, len, true).is_err()
            || mem.check_range(event_idx, len, true).is_err()
        {
            return Status::INVALID_FIELD;
        }
        let buf = ShadowDoorbells { shadow, event_idx };
        // existing queues (the admin queue at least) carry on from their current values
        for sq in self.sqs.iter_mut().flatten() {
            match buf.attach(mem, 2 * sq.id as usize, sq.tail) {
                Ok(seen) => sq.doorbell = seen,
                Err(_) => return Status::DATA_TRANSFER_ERROR,
            }
        }
        for cq in self.cqs.iter_mut().flatten() {
            match buf.attach(mem, 2 * cq.id as usize + 1, cq.head) {
                Ok(seen) => cq.doorbell = seen,
                Err(_) => return Status::DATA_TRANSFER_ERROR,
            }
        }
        log::info!(
            "{}: shadow doorbells at {shadow:#x}, EventIdx at {event_idx:#x}",
            self.cfg.serial
        );
        self.shadow = Some(buf);
        ControllerStats::bump(&self.stats.shadow_doorbell_configs);
        Status::SUCCESS
    }
}
