//! Hot path, hop 6: raise each CQ's interrupt after a poll posted to it, unless interrupt
//! coalescing holds it (NVMe base 2.0 §5.27.1.9), adaptive when the host waits on few
//! commands.

use crate::irq_coalescing::Coalescing;
use crate::queue::Queues;

use super::Controller;

impl Controller {
    /// Raise the interrupt of every CQ that posted completions, unless coalescing holds it
    /// (§5.27.1.9). Returns the number of interrupts held, so the reactor keeps polling.
    pub(super) fn interrupts(&mut self) -> usize {
        let coalescing = Coalescing::from_dword(self.admin.features.coalescing);
        let mut now = None;
        let mut held = 0;
        for &id in &self.queues.active_cqs {
            let Some(cq) = self.queues.cqs[id as usize].as_mut() else {
                continue;
            };
            if cq.irq_pending == 0 {
                continue;
            }
            if !cq.irq_enabled {
                cq.irq_pending = 0;
                continue;
            }
            if coalescing.enabled()
                && cq.vector != 0
                && !self.admin.features.vector_cd[cq.vector as usize]
                && !(self.admin.features.coalescing_adaptive
                    && cq.last_irq_batch <= 1
                    && Queues::host_outstanding(&self.queues.sqs, &self.queues.active_sqs, cq) <= 1)
            {
                let now = *now.get_or_insert_with(std::time::Instant::now);
                let since = *cq.irq_pending_since.get_or_insert(now);
                if !coalescing.due(cq.irq_pending, since, now) {
                    held += 1;
                    continue;
                }
            }
            cq.last_irq_batch = cq.irq_pending;
            cq.irq_pending = 0;
            cq.irq_pending_since = None;
            self.irqs.signal(cq.vector);
        }
        held
    }
}
