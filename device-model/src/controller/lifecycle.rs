//! What the host's register writes set going: controller enable (NVMe base 2.0 §3.5.1),
//! Controller Level Reset and device reset (§3.7.2) without blocking the reactor
//! ([`crate::quiesce`]), and the state a reset clears.

use crate::queue::{CompletionQueue, SubmissionQueue};
use crate::registers::{Aqa, Cc, Csts, RegisterWrite, ShutdownStatus};
use crate::state::features::Features;
use crate::stats::ControllerStats;

use super::Controller;

impl Controller {
    /// Read a BAR0 register (offsets below the doorbell page). Unknown offsets read as zero.
    pub fn read_register(&self, offset: u64, len: usize) -> u64 {
        self.regs.read(self.cap(), offset, len)
    }

    /// Write a BAR0 register (1, 2, 4 or 8 bytes). Read-only and reserved registers ignore it.
    pub fn write_register(&mut self, offset: u64, value: u64, len: usize) {
        match self.regs.write(offset, value, len) {
            RegisterWrite::Stored => {}
            RegisterWrite::Cc { old } => self.cc_changed(old),
            RegisterWrite::SubsystemReset => {
                log::info!("NVM Subsystem Reset requested: not supported (CAP.NSSRS=0), ignored");
            }
            RegisterWrite::Ignored => {
                log::debug!("ignored register write offset={offset:#x} len={len} value={value:#x}");
            }
        }
        self.save_blob(None);
    }

    /// CC was written (it held `old`): reset, enable, or a shutdown notification
    /// (§3.1.4.5, §3.6).
    fn cc_changed(&mut self, old: Cc) {
        let new = self.regs.cc;
        if old.enabled() && !new.enabled() {
            log::info!("{}: controller reset (CC.EN 1->0)", self.cfg.serial);
            self.reset();
            return;
        }
        if !old.enabled() && new.enabled() {
            if self.quiesce.resetting.is_some() {
                // enabled again before CSTS.RDY cleared: the host stopped waiting
                self.finish_reset_now();
                self.regs.cc = new;
            }
            self.enable();
        }
        let (shn, old_shn) = (new.shutdown_notification(), old.shutdown_notification());
        if shn != 0 && old_shn == 0 {
            log::info!(
                "{}: shutdown notification ({})",
                self.cfg.serial,
                if shn == 1 { "normal" } else { "abrupt" }
            );
            self.regs.csts.set_shutdown(ShutdownStatus::Occurring);
            self.quiesce.shutting_down =
                Some(std::time::Instant::now() + crate::quiesce::SHUTDOWN_WAIT);
            self.poll_shutdown();
        } else if shn == 0 && old_shn != 0 {
            self.quiesce.shutting_down = None;
            self.quiesce.flushing = None; // late answers of its flushes are ignored
            self.regs.csts.set_shutdown(ShutdownStatus::Normal);
        }
    }

    /// CC.EN 0->1: check the configuration and bring up the admin queue pair (§3.5.1).
    pub(super) fn enable(&mut self) {
        let (mps, css) = (self.regs.cc.mps(), self.regs.cc.command_set());
        let (asqs, acqs) = (self.regs.aqa.sq_entries(), self.regs.aqa.cq_entries());
        let (asq, acq) = (self.regs.asq, self.regs.acq);
        let problem = if mps > 4 {
            Some("CC.MPS outside CAP.MPSMIN..MPSMAX")
        } else if css != 0 && css != 7 {
            Some("CC.CSS selects an unsupported command set")
        } else if asqs < 2 || acqs < 2 {
            Some("AQA: admin queues need at least 2 entries")
        } else if asq.checked_add(u64::from(asqs) * 64).is_none()
            || acq.checked_add(u64::from(acqs) * 16).is_none()
        {
            Some("ASQ/ACQ: the admin queue wraps past the end of the address space")
        } else {
            None
        };
        if let Some(p) = problem {
            crate::warn_limited!("{}: enable refused: {p}; setting CSTS.CFS", self.cfg.serial);
            self.regs.csts.set_fatal(true);
            return;
        }
        if self.cfg.secondary_offline() {
            // an offline secondary controller does not become ready (§8.26.3)
            log::info!(
                "{}: secondary controller offline: stays not ready",
                self.cfg.serial
            );
            return;
        }
        if let Some(n) = self.cfg.secondary_io_queues() {
            self.admin.features.max_queues = n;
        }
        self.page_size = 4096 << mps;
        self.regs.csts.set_fatal(false);
        self.regs.csts.set_shutdown(ShutdownStatus::Normal);
        self.queues.take_all();
        self.queues
            .insert_cq(CompletionQueue::new(0, acq, acqs, 0, true));
        self.queues.insert_sq(SubmissionQueue::new(0, asq, asqs, 0));
        self.regs.csts.set_ready(true);
        ControllerStats::bump(&self.stats.enables);
        self.stats
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        log::info!(
            "{}: enabled (admin SQ {asqs} entries at {:#x}, CQ {acqs} at {:#x}, page {} B)",
            self.cfg.serial,
            asq,
            acq,
            self.page_size
        );
    }

    /// Controller Level Reset (§3.7.2): stop fetching; once backend requests in flight have
    /// finished (or after [`crate::quiesce::RESET_WAIT`], retiring them) drop every queue
    /// and clear the state the host must set up again; CSTS.RDY clears then. The reactor is
    /// never blocked meanwhile ([`crate::quiesce`]). Namespaces and their data are untouched.
    pub fn reset(&mut self) {
        self.begin_reset(false);
    }

    /// Full device reset (FLR, vfio-user DEVICE_RESET, client gone): controller reset plus
    /// admin queue registers, interrupt routes and the backends' view of guest memory.
    pub fn device_reset(&mut self) {
        self.begin_reset(true);
    }

    /// True while a reset waits for backend requests (CSTS.RDY still set).
    pub fn is_resetting(&self) -> bool {
        self.quiesce.resetting.is_some()
    }

    /// True while a reset waits or requests retired by an earlier one are still out: the
    /// controller must stay alive (and polled) until this is false.
    pub fn is_quiescing(&self) -> bool {
        self.quiesce.busy()
    }

    fn begin_reset(&mut self, device: bool) {
        self.quiesce.begin_reset(device, std::time::Instant::now());
        self.poll_reset();
    }

    /// Reap while a reset waits; finish it when nothing is in flight or time is up.
    pub(super) fn poll_reset(&mut self) -> usize {
        let Some(pending) = self.quiesce.resetting else {
            return 0;
        };
        let mem = self.mem.snapshot();
        let n = self.reap(&mem);
        if self.requests_in_flight() > 0 && std::time::Instant::now() < pending.until {
            return n.max(1);
        }
        self.finish_reset_now();
        n + 1
    }

    /// Finish the pending reset now, retiring whatever is still in flight.
    pub(super) fn finish_reset_now(&mut self) {
        let Some(pending) = self.quiesce.resetting else {
            return;
        };
        let outstanding = self.requests_in_flight();
        let sqs = self.queues.take_all();
        self.quiesce.retire(sqs, outstanding);
        self.clear_state();
        if pending.device {
            for ns in &mut self.namespaces {
                ns.backend.guest_memory_changed();
            }
            self.regs.aqa = Aqa(0);
            self.regs.asq = 0;
            self.regs.acq = 0;
            self.irqs.clear();
            self.regs.cc = Cc(0);
        }
        self.save_blob(None);
    }

    /// Drop every queue and the state the host sets up after a reset.
    pub(super) fn clear_state(&mut self) {
        self.queues.take_all();
        self.commands_in_flight = 0;
        self.stats
            .in_flight
            .store(0, std::sync::atomic::Ordering::Relaxed);
        // buffers and lists stay with the retired slots
        self.compares = 0;
        self.part_lists = 0;
        self.waiting.clear();
        self.reset_events();
        self.shadow = None;
        self.admin.keep_alive_since = None;
        self.doorbells.clear();
        self.admin.features =
            Features::new(self.cfg.max_io_queues, self.cfg.irq_coalescing.dword());
        self.regs.cc = self.regs.cc.disabled();
        self.regs.csts = Csts(0);
        self.stats
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.regs.intms = 0;
        self.page_size = 4096;
        self.warned_doorbell = false;
    }
}
