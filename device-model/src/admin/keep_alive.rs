//! Keep Alive (NVMe base 2.0 §3.9 and §5.24): once the host sets a non-zero Keep Alive
//! Timeout (feature 0Fh), it must send a Keep Alive command at least that often; when the
//! timer expires the controller stops processing commands and reports Controller Fatal
//! Status (CSTS.CFS), from which the host recovers with a controller reset. Traffic-based
//! keep alive is not supported (Identify CTRATT.TBKAS = 0): only Keep Alive restarts the
//! timer. Granularity: Identify KAS = 1 (100 ms).

use std::time::{Duration, Instant};

use nvme_spec::Status;

use crate::controller::Controller;

/// Keep Alive granularity in milliseconds (Identify KAS, in 100 ms units).
pub(crate) const KEEP_ALIVE_GRANULARITY_MS: u32 = 100;

impl Controller {
    /// Keep Alive command: restart the timer.
    pub(crate) fn keep_alive(&mut self) -> Status {
        self.admin.keep_alive_since = Some(Instant::now());
        Status::SUCCESS
    }

    /// Check the Keep Alive timer at `now`; on expiry the controller goes fatal.
    /// The reactor calls this every millisecond or so; cheap when KATO is 0.
    pub fn check_keep_alive(&mut self, now: Instant) {
        let kato = self.admin.features.keep_alive_ms;
        if kato == 0 || !self.is_ready() || self.is_fatal() {
            return;
        }
        let since = *self.admin.keep_alive_since.get_or_insert(now);
        // in u64: KATO FFFFFFFFh (about 50 days) is legal and rounds up past u32::MAX
        let limit = u64::from(kato.div_ceil(KEEP_ALIVE_GRANULARITY_MS))
            * u64::from(KEEP_ALIVE_GRANULARITY_MS);
        if now.saturating_duration_since(since) > Duration::from_millis(limit) {
            crate::error_limited!(
                "{}: keep alive timer expired (KATO {kato} ms without Keep Alive); controller fatal",
                self.cfg.serial
            );
            self.set_fatal();
        }
    }
}
