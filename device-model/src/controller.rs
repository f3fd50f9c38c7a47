//! The NVMe controller: BAR0 register file (NVMe base 2.0 §3.1.4), controller enable, reset
//! and shutdown (§3.5-3.6), and the polling loop that fetches commands from submission
//! queues, dispatches them and posts completions. One thread owns a controller; the control
//! plane reaches it by message (see [`crate::reactor`]).

use std::sync::Arc;

use nvme_spec::registers::cap;
use nvme_spec::{Completion, Status, Submission};

use crate::backend::{IoOp, IoRequest};
use crate::doorbell::Doorbells;
use crate::dptr::IoVecs;
use crate::irq::Interrupts;
use crate::irq_coalescing::Coalescing;
use crate::memory::{GuestMemory, MemoryMap};
use crate::namespace::Namespace;
use crate::pci::PciIds;
use crate::queue::{CompletionQueue, SubmissionQueue};
use crate::registers::{Aqa, Cc, Csts, RegisterWrite, Registers, ShutdownStatus};
use crate::shadow_doorbell::{self, ShadowDoorbells};
use crate::state::AdminState;
use crate::state::async_events::{AsyncEvent, error_info, event_type};
use crate::state::features::Features;
use crate::stats::ControllerStats;

/// Static configuration of a controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub ids: PciIds,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cntlid: u16,
    /// I/O queue pairs the controller supports (1..=128).
    pub max_io_queues: u16,
    /// Maximum queue entries supported, 0's based (CAP.MQES).
    pub mqes: u16,
    /// Maximum data transfer size as a power of two in units of the minimum page (4 KiB).
    pub mdts: u8,
    pub subnqn: String,
    /// Power-on value of Interrupt Coalescing (feature 08h); off by default.
    pub irq_coalescing: Coalescing,
    /// Set when the controller is exported over NVMe over Fabrics: what Identify
    /// Controller reports in its fabrics fields.
    pub fabrics: Option<FabricsIdentify>,
    /// Power-on IOPS and bandwidth limits (changed at run time through
    /// [`Controller::qos_control`]).
    pub qos: crate::qos::QosLimits,
    /// Primary or secondary controller of an SR-IOV arrangement.
    pub virt: Option<crate::virt_link::VirtRole>,
    /// The namespaces are attached to other controllers of the subsystem too (NMIC bit 0,
    /// CMIC bit 1): hosts see one namespace through several controllers.
    pub shared_namespaces: bool,
    /// The NVM subsystem this controller belongs to: its other controllers and its
    /// namespaces (Identify CNS 10h-13h, NN, capacity); `None`: this controller alone.
    pub subsystem: Option<Arc<dyn crate::NvmSubsystem>>,
    /// Namespace Management and Attachment (OACS bit 3) are offered here (the PF of a
    /// subsystem that manages namespaces).
    pub namespace_management: bool,
}

/// Identify Controller fields of a controller reached over a fabric (base 2.0 §5.17.2.1,
/// bytes 1792..2047, and MAXCMD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FabricsIdentify {
    /// I/O command capsule size in 16-byte units (64-byte SQE + in-capsule data).
    pub ioccsz: u32,
    /// I/O response capsule size in 16-byte units.
    pub iorcsz: u32,
    /// Commands one queue may have outstanding (MAXCMD).
    pub maxcmd: u16,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            ids: PciIds::default(),
            serial: "VNVME0001".into(),
            model: "vnvme emulated NVMe controller".into(),
            firmware: env!("CARGO_PKG_VERSION").into(),
            cntlid: 1,
            max_io_queues: 128,
            mqes: 1023,
            mdts: 7,
            subnqn: "nqn.2026-11.io.vnvme:default".into(),
            irq_coalescing: Coalescing::default(),
            fabrics: None,
            qos: crate::qos::QosLimits::default(),
            virt: None,
            shared_namespaces: false,
            subsystem: None,
            namespace_management: false,
        }
    }
}

/// What a command handler did with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Complete now with this status and dword 0.
    Done(Status, u32),
    /// Handed to a backend (or parked); completion comes later.
    Pending,
}

impl Outcome {
    pub(crate) fn status(s: Status) -> Self {
        Outcome::Done(s, 0)
    }
}

/// Commands fetched from one SQ per poll before moving on (fairness between queues).
const FETCH_BUDGET: u32 = 64;
/// Commands one controller has in flight at most, whatever its queue sizes: bounds the
/// iovec storage (4 KiB each, [`crate::dptr::IoVecBlock`]) a guest can make us hold.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 1024;

/// Commands the host has outstanding on the SQs that post to `cq`: not yet fetched, in
/// flight, or completed but not yet consumed by the host.
fn host_outstanding(sqs: &[Option<SubmissionQueue>], active: &[u16], cq: &CompletionQueue) -> u32 {
    let mut n = cq.used();
    for &q in active {
        if let Some(sq) = sqs[q as usize].as_ref()
            && sq.cqid == cq.id
        {
            n += (sq.tail + sq.size - sq.head) % sq.size + sq.in_flight() as u32;
        }
    }
    n
}

/// An emulated NVMe controller.
pub struct Controller {
    pub(crate) cfg: ControllerConfig,
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) doorbells: Arc<Doorbells>,
    pub(crate) irqs: Interrupts,
    pub(crate) namespaces: Vec<Namespace>,
    /// CC, CSTS, the admin queue registers and the interrupt masks.
    regs: Registers,
    pub(crate) page_size: u64,
    pub(crate) sqs: Vec<Option<SubmissionQueue>>,
    pub(crate) cqs: Vec<Option<CompletionQueue>>,
    /// Ids of existing SQs / CQs, for iteration without scanning every slot.
    pub(crate) active_sqs: Vec<u16>,
    pub(crate) active_cqs: Vec<u16>,
    /// What admin commands read and change: features, events, logs, keep alive.
    pub(crate) admin: AdminState,
    pub(crate) stats: Arc<ControllerStats>,
    /// Converts [`sys_util::clock::ticks`] to nanoseconds for the latency histograms.
    tick_rate: sys_util::clock::TickRate,
    /// Shadow doorbell and EventIdx pages, when the host configured them.
    pub(crate) shadow: Option<ShadowDoorbells>,
    pub(crate) scratch: IoVecs,
    pub(crate) bounce: Vec<u8>,
    done: Vec<(u64, Status)>,
    warned_doorbell: bool,
    pub(crate) qos: crate::qos::Qos,
    qos_control: Arc<crate::qos::QosControl>,
    /// Reset and shutdown in progress, queues retired with requests still out.
    pub(crate) quiesce: crate::quiesce::Quiesce,
    /// Iovec storage lent to commands in flight, and how many are in flight.
    pub(crate) iov_pool: crate::dptr::IoVecPool,
    pub(crate) commands_in_flight: usize,
    /// Of those, commands of the I/O queues (the queue depth the statistics show).
    io_in_flight: usize,
    /// Compares and commands with parts in flight (each holds a buffer or a list), and
    /// those waiting for room ([`crate::compound`]).
    pub(crate) compares: usize,
    pub(crate) part_lists: usize,
    pub(crate) waiting: crate::compound::Waiting,
    /// Namespaces detached while requests were in flight on them: gone for the host, their
    /// backends still polled until those requests have finished.
    detaching: Vec<Detaching>,
}

/// How long a detached namespace's requests in flight may take before that is logged as an
/// error.
pub const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A namespace detached with requests in flight.
struct Detaching {
    ns: Namespace,
    until: std::time::Instant,
    warned: bool,
}

/// SQ id in the tags of the flushes the controller sends on its own (shutdown notification,
/// daemon stop); no queue has it. Their slot field is the flush's sequence number.
const OWN_FLUSH_QID: u16 = u16::MAX;

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("serial", &self.cfg.serial)
            .field("cc", &self.regs.cc)
            .field("csts", &self.regs.csts)
            .finish()
    }
}

impl Controller {
    /// A disabled controller over `namespaces` (any order; NSIDs must differ).
    pub fn new(
        cfg: ControllerConfig,
        mem: Arc<GuestMemory>,
        doorbells: Arc<Doorbells>,
        mut namespaces: Vec<Namespace>,
    ) -> Self {
        namespaces.sort_by_key(|n| n.nsid);
        namespaces.dedup_by_key(|n| n.nsid);
        let nq = cfg.max_io_queues.clamp(1, crate::pci::MSIX_VECTORS - 1) as usize + 1;
        let qos = cfg.qos;
        let mdts_bytes = 4096usize << cfg.mdts;
        let stats = Arc::new(ControllerStats::default());
        stats.set_namespaces(namespaces.iter().map(|n| (n.nsid, Arc::clone(&n.stats))));
        Self {
            admin: AdminState::new(Features::new(cfg.max_io_queues, cfg.irq_coalescing.dword())),
            cfg,
            mem,
            doorbells,
            irqs: Interrupts::default(),
            namespaces,
            regs: Registers::default(),
            page_size: 4096,
            sqs: (0..nq).map(|_| None).collect(),
            cqs: (0..nq).map(|_| None).collect(),
            active_sqs: Vec::with_capacity(nq),
            active_cqs: Vec::with_capacity(nq),
            stats,
            tick_rate: sys_util::clock::rate(),
            shadow: None,
            scratch: IoVecs::default(),
            bounce: vec![0; mdts_bytes],
            done: Vec::with_capacity(1024),
            warned_doorbell: false,
            qos: crate::qos::Qos::default(),
            qos_control: Arc::new(crate::qos::QosControl::new(qos)),
            quiesce: crate::quiesce::Quiesce::default(),
            iov_pool: crate::dptr::IoVecPool::default(),
            commands_in_flight: 0,
            io_in_flight: 0,
            compares: 0,
            part_lists: 0,
            waiting: crate::compound::Waiting::new(),
            detaching: Vec::new(),
        }
    }

    /// Make every namespace's data durable and wait for it, up to
    /// [`crate::quiesce::SHUTDOWN_WAIT`] (daemon stop). This blocks the calling thread: call it
    /// on a controller taken off its reactor, which is going away.
    pub fn flush(&mut self) -> Result<(), Status> {
        let until = std::time::Instant::now() + crate::quiesce::SHUTDOWN_WAIT;
        self.start_own_flush(until, false);
        let mem = self.mem.snapshot();
        loop {
            self.reap(&mem);
            let Some(f) = self.quiesce.flushing.filter(|f| !f.shutdown) else {
                return Err(Status::INTERNAL_ERROR); // replaced: cannot happen off a reactor
            };
            if f.left == 0 {
                self.quiesce.flushing = None;
                return if f.status.is_success() {
                    Ok(())
                } else {
                    Err(f.status)
                };
            }
            if std::time::Instant::now() > f.until {
                self.quiesce.flushing = None;
                return Err(Status::INTERNAL_ERROR);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Send a Flush to every namespace's backend, tagged as the controller's own; their
    /// completions are counted in `quiesce.flushing` ([`Controller::reap`]).
    fn start_own_flush(&mut self, until: std::time::Instant, shutdown: bool) {
        let seq = self.quiesce.next_flush_seq();
        let tag = crate::quiesce::tag(self.quiesce.epoch(), OWN_FLUSH_QID, seq);
        let mut f = crate::quiesce::OwnFlush {
            seq,
            left: 0,
            status: Status::SUCCESS,
            until,
            shutdown,
        };
        for ns in &mut self.namespaces {
            let req = IoRequest {
                tag,
                op: IoOp::Flush,
                offset: 0,
                iov: crate::dptr::GuestBuffers::EMPTY,
            };
            match ns.backend.submit(&req) {
                Ok(()) => f.left += 1,
                Err(s) if f.status.is_success() => f.status = s,
                Err(_) => {}
            }
        }
        self.quiesce.flushing = Some(f);
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// Controller Capabilities register value.
    pub fn cap(&self) -> u64 {
        // a secondary that may stay offline says so quickly: 1 s (CAP.TO = 2)
        let to = if matches!(
            self.cfg.virt,
            Some(crate::virt_link::VirtRole::Secondary { .. })
        ) {
            2
        } else {
            30
        };
        cap::mqes(self.cfg.mqes)
            | cap::CQR
            | cap::to(to)
            | cap::CSS_NVM
            | (0 << cap::MPSMIN_SHIFT)
            | (4 << cap::MPSMAX_SHIFT)
    }

    /// True when CSTS.RDY is set.
    pub fn is_ready(&self) -> bool {
        self.regs.csts.ready()
    }

    /// True when CSTS.CFS is set (the controller stopped processing commands).
    pub fn is_fatal(&self) -> bool {
        self.regs.csts.fatal()
    }

    /// Enter Controller Fatal Status: no command is processed until a controller reset.
    pub(crate) fn set_fatal(&mut self) {
        if !self.is_fatal() {
            ControllerStats::bump(&self.stats.fatal);
        }
        self.regs.csts.set_fatal(true);
    }

    /// The handle that changes this controller's QoS limits at run time.
    pub fn qos_control(&self) -> Arc<crate::qos::QosControl> {
        Arc::clone(&self.qos_control)
    }

    /// Each namespace's ID and LBA data size as a power of two.
    pub fn lba_shifts(&self) -> Vec<(u32, u8)> {
        self.namespaces
            .iter()
            .map(|n| (n.nsid, n.lba_shift))
            .collect()
    }

    /// Event and I/O counters, shared with the control plane.
    pub fn stats(&self) -> Arc<ControllerStats> {
        Arc::clone(&self.stats)
    }

    /// True when the host configured shadow doorbells (Doorbell Buffer Config).
    pub fn shadow_doorbells_enabled(&self) -> bool {
        self.shadow.is_some()
    }

    /// Asynchronous events waiting for an Asynchronous Event Request.
    pub fn queued_events(&self) -> usize {
        self.admin.events.queued()
    }

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

    /// Backend requests of the current epoch in flight (retired ones not counted).
    fn requests_in_flight(&self) -> usize {
        let all: usize = self.namespaces.iter().map(|n| n.backend.in_flight()).sum();
        let detaching: usize = self
            .detaching
            .iter()
            .map(|d| d.ns.backend.in_flight())
            .sum();
        (all + detaching).saturating_sub(self.quiesce.retired_requests())
    }

    /// A shutdown notification (§3.6) completes once requests in flight have finished (or
    /// after [`crate::quiesce::SHUTDOWN_WAIT`]) and then every namespace's Flush has (or the
    /// same wait passed): SHST complete. Polled, never waited for.
    fn poll_shutdown(&mut self) {
        let now = std::time::Instant::now();
        if let Some(until) = self.quiesce.shutting_down {
            if self.requests_in_flight() > 0 && now < until {
                return;
            }
            self.quiesce.shutting_down = None;
            self.start_own_flush(now + crate::quiesce::SHUTDOWN_WAIT, true);
        }
        let Some(f) = self.quiesce.flushing.filter(|f| f.shutdown) else {
            return;
        };
        if f.left > 0 && now < f.until {
            return;
        }
        if f.left > 0 {
            crate::warn_limited!(
                "{}: {} namespace flushes unanswered at shutdown",
                self.cfg.serial,
                f.left
            );
        } else if !f.status.is_success() {
            crate::warn_limited!(
                "{}: flush on shutdown failed: {}",
                self.cfg.serial,
                f.status
            );
        }
        self.quiesce.flushing = None;
        self.regs.csts.set_shutdown(ShutdownStatus::Complete);
    }

    /// CC.EN 0->1: check the configuration and bring up the admin queue pair (§3.5.1).
    fn enable(&mut self) {
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
        if self.secondary_offline() {
            // an offline secondary controller does not become ready (§8.26.3)
            log::info!(
                "{}: secondary controller offline: stays not ready",
                self.cfg.serial
            );
            return;
        }
        if let Some(n) = self.secondary_io_queues() {
            self.admin.features.max_queues = n;
        }
        self.page_size = 4096 << mps;
        self.regs.csts.set_fatal(false);
        self.regs.csts.set_shutdown(ShutdownStatus::Normal);
        self.sqs[0] = Some(SubmissionQueue::new(0, asq, asqs, 0));
        let mut admin_cq = CompletionQueue::new(0, acq, acqs, 0, true);
        admin_cq.sq_count = 1;
        self.cqs[0] = Some(admin_cq);
        self.active_sqs = vec![0];
        self.active_cqs = vec![0];
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
    fn poll_reset(&mut self) -> usize {
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
    fn finish_reset_now(&mut self) {
        let Some(pending) = self.quiesce.resetting else {
            return;
        };
        let outstanding = self.requests_in_flight();
        let sqs = self.sqs.iter_mut().filter_map(Option::take).collect();
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
    }

    /// Drop every queue and the state the host sets up after a reset.
    fn clear_state(&mut self) {
        for q in &mut self.sqs {
            *q = None;
        }
        for q in &mut self.cqs {
            *q = None;
        }
        self.active_sqs.clear();
        self.active_cqs.clear();
        self.commands_in_flight = 0;
        self.io_in_flight = 0;
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

    /// One pass of the data plane: doorbells, command fetch and dispatch, backend
    /// completions, interrupts. Returns how much work was done (0 = idle).
    pub fn poll(&mut self) -> usize {
        if self.quiesce.resetting.is_some() {
            return self.poll_reset();
        }
        self.poll_shutdown();
        if !self.is_ready() || self.is_fatal() {
            if self.quiesce.retired_requests() > 0 || !self.detaching.is_empty() {
                let mem = self.mem.snapshot();
                return self.reap(&mem);
            }
            return 0;
        }
        if self.secondary_offline() {
            // taken offline by the primary: the controller is reset under its host
            log::info!(
                "{}: secondary controller taken offline: reset",
                self.cfg.serial
            );
            self.reset();
            return 1;
        }
        let mem = self.mem.snapshot();
        let mut work = 0;
        let mut bad_doorbell = false;
        for i in 0..self.active_cqs.len() {
            let id = self.active_cqs[i];
            let Some(cq) = self.cqs[id as usize].as_mut() else {
                continue;
            };
            let db = shadow_doorbell::current(
                &self.doorbells,
                self.shadow.as_ref(),
                &mem,
                2 * id as usize + 1,
                &mut cq.doorbell,
            );
            if db != cq.head && !cq.update_head(db) && !self.warned_doorbell {
                self.warned_doorbell = true;
                bad_doorbell = true;
                crate::warn_limited!(
                    "{}: invalid CQ {id} head doorbell {db} (size {}, tail {})",
                    self.cfg.serial,
                    cq.size,
                    cq.tail
                );
            }
        }
        if bad_doorbell {
            self.raise_event(Self::INVALID_DOORBELL, &mem);
        }
        let mut i = 0;
        while i < self.active_sqs.len() {
            let id = self.active_sqs[i];
            work += self.process_sq(id, &mem);
            i += 1;
        }
        work += self.reap(&mem);
        if !self.waiting.is_empty() {
            self.start_waiting(&mem);
        }
        self.stats.in_flight.store(
            self.io_in_flight as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        work + self.interrupts()
    }

    /// Raise the interrupt of every CQ that posted completions, unless coalescing holds it
    /// (§5.27.1.9). Returns the number of interrupts held, so the reactor keeps polling.
    fn interrupts(&mut self) -> usize {
        let coalescing = Coalescing::from_dword(self.admin.features.coalescing);
        let mut now = None;
        let mut held = 0;
        for &id in &self.active_cqs {
            let Some(cq) = self.cqs[id as usize].as_mut() else {
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
                    && host_outstanding(&self.sqs, &self.active_sqs, cq) <= 1)
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

    fn process_sq(&mut self, qid: u16, mem: &Arc<MemoryMap>) -> usize {
        let Some(sq) = self.sqs[qid as usize].as_mut() else {
            return 0;
        };
        let db = shadow_doorbell::current(
            &self.doorbells,
            self.shadow.as_ref(),
            mem,
            2 * qid as usize,
            &mut sq.doorbell,
        );
        if db != sq.tail && !sq.update_tail(db) && !self.warned_doorbell {
            self.warned_doorbell = true;
            crate::warn_limited!(
                "{}: invalid SQ {qid} tail doorbell {db} (size {})",
                self.cfg.serial,
                sq.size
            );
            let deleting = sq.deleting.is_some();
            self.raise_event(Self::INVALID_DOORBELL, mem);
            if deleting {
                return 0;
            }
        } else if sq.deleting.is_some() {
            return 0;
        }
        let mut n = 0;
        if qid != 0 {
            self.qos.sync(&self.qos_control);
        }
        while n < FETCH_BUDGET {
            let Some(sq) = self.sqs[qid as usize].as_mut() else {
                break;
            };
            if !sq.has_work() || sq.free.is_empty() {
                break;
            }
            if self.commands_in_flight >= MAX_COMMANDS_IN_FLIGHT {
                break; // the rest waits in the SQ until commands complete
            }
            // QoS holds I/O commands in the SQ until their tokens are there
            if qid != 0 && !self.qos.admit() {
                break;
            }
            let cqid = sq.cqid as usize;
            let Some(cq) = self.cqs[cqid].as_mut() else {
                break;
            };
            if !cq.can_reserve() {
                break;
            }
            let sqe = match sq.fetch(mem) {
                Ok(s) => s,
                Err(e) => {
                    crate::error_limited!(
                        "{}: SQ {qid} entry unreadable ({e}); controller fatal",
                        self.cfg.serial
                    );
                    self.set_fatal();
                    return n as usize;
                }
            };
            cq.reserved += 1;
            if qid != 0 {
                self.qos.charge_op();
            }
            let slot = sq.free.pop().unwrap_or_default();
            self.commands_in_flight += 1;
            if qid != 0 {
                self.io_in_flight += 1;
            }
            let ctx = &mut sq.slots[slot as usize];
            ctx.cid = sqe.cid.get();
            ctx.opcode = sqe.opcode;
            ctx.nsid = sqe.nsid.get();
            ctx.bytes = 0;
            ctx.fetched = sys_util::clock::ticks();
            self.dispatch(qid, slot, &sqe, mem);
            n += 1;
        }
        n as usize
    }

    /// Collect backend completions and post them; drop detached namespaces that are done.
    /// Run the command in `slot` of SQ `qid` (admin or I/O) and post its completion when it
    /// finished at once; a pending one completes through its backend or its event.
    pub(crate) fn dispatch(&mut self, qid: u16, slot: u16, sqe: &Submission, mem: &Arc<MemoryMap>) {
        let outcome = if qid == 0 {
            self.admin_command(slot, sqe, mem)
        } else {
            self.io_command(qid, slot, sqe, mem)
        };
        if let Outcome::Done(status, dw0) = outcome {
            self.complete(qid, slot, status, dw0, mem);
        }
    }

    fn reap(&mut self, mem: &Arc<MemoryMap>) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let namespaces = self
            .namespaces
            .iter_mut()
            .chain(self.detaching.iter_mut().map(|d| &mut d.ns));
        for ns in namespaces {
            if ns.backend.in_flight() > 0 {
                ns.backend.poll(&mut |t, s| done.push((t, s)));
            }
        }
        let n = done.len();
        for &(t, status) in &done {
            self.request_finished(t, status, mem);
        }
        done.clear();
        self.done = done;
        if !self.detaching.is_empty() {
            self.poll_detaching();
        }
        n
    }

    /// Backend request `t` finished with `status`: count it, and post its command's
    /// completion when it was the last the command waited for.
    fn request_finished(&mut self, t: u64, status: Status, mem: &MemoryMap) {
        let (epoch, qid, slot) = crate::quiesce::untag(t);
        if epoch != self.quiesce.epoch() {
            self.quiesce.stale_completion(epoch);
            return;
        }
        if qid == OWN_FLUSH_QID {
            self.quiesce.own_flush_done(slot, status);
            return;
        }
        let Some(result) = self.request_done(qid, slot, status) else {
            return; // more requests of the same command to come
        };
        self.io_finished(qid, slot, status);
        self.complete(qid, slot, result, 0, mem);
    }

    /// Take namespace `i` out of the host's view (it is being detached or replaced): new
    /// commands no longer reach it. Its requests in flight complete as usual: its backend is
    /// polled until they have, and dropped then ([`Controller::reap`]); nothing waits here.
    /// (It is never dropped sooner: its requests may point into memory their command slots
    /// keep mapped only while the requests are counted in flight, see [`crate::quiesce`].)
    pub(crate) fn detach_namespace(&mut self, i: usize) {
        let ns = self.namespaces.remove(i);
        self.namespaces_changed();
        if ns.backend.in_flight() > 0 {
            self.detaching.push(Detaching {
                ns,
                until: std::time::Instant::now() + DETACH_WAIT,
                warned: false,
            });
        }
    }

    /// List the attached namespaces' counters for readers again (attach, detach).
    pub(crate) fn namespaces_changed(&self) {
        self.stats.set_namespaces(
            self.namespaces
                .iter()
                .map(|n| (n.nsid, Arc::clone(&n.stats))),
        );
    }

    /// Drop detached namespaces with nothing in flight any more; say so once of those whose
    /// requests take longer than [`DETACH_WAIT`].
    fn poll_detaching(&mut self) {
        let now = std::time::Instant::now();
        let serial = &self.cfg.serial;
        self.detaching.retain_mut(|d| {
            let left = d.ns.backend.in_flight();
            if left > 0 && now > d.until && !d.warned {
                d.warned = true;
                crate::error_limited!(
                    "{serial}: namespace {}: {left} requests still in flight {} s after it \
                     was detached; its backend is kept until they finish",
                    d.ns.nsid,
                    DETACH_WAIT.as_secs()
                );
            }
            left > 0
        });
    }

    /// The last backend request of a command finished with `status`: account it (SMART).
    fn io_finished(&mut self, qid: u16, slot: u16, status: Status) {
        let Some(sq) = self.sqs.get(qid as usize).and_then(Option::as_ref) else {
            return;
        };
        let Some(ctx) = sq.slots.get(slot as usize) else {
            return;
        };
        if status.is_success() {
            self.admin.smart.account(ctx.opcode, ctx.bytes);
        }
    }

    /// Post the completion of the command in `slot` of SQ `qid` and free the slot.
    pub(crate) fn complete(
        &mut self,
        qid: u16,
        slot: u16,
        status: Status,
        dw0: u32,
        mem: &MemoryMap,
    ) {
        let Some(sq) = self.sqs.get_mut(qid as usize).and_then(Option::as_mut) else {
            return;
        };
        let Some(ctx) = sq.slots.get_mut(slot as usize) else {
            return;
        };
        let cid = ctx.cid;
        ctx.mem = None;
        let compound = ctx.compound.take();
        if let Some(block) = ctx.iov.take_storage() {
            self.iov_pool.put(block);
        }
        self.commands_in_flight = self.commands_in_flight.saturating_sub(1);
        if qid != 0 {
            self.io_in_flight = self.io_in_flight.saturating_sub(1);
        }
        let opcode = ctx.opcode;
        let nsid = ctx.nsid;
        let (bytes, fetched) = (ctx.bytes, ctx.fetched);
        sq.free.push(slot);
        let sq_head = sq.head as u16;
        let cqid = sq.cqid;
        let finish_delete = sq.deleting.filter(|_| sq.in_flight() == 0);
        if let Some(cq) = self.cqs[cqid as usize].as_mut() {
            cq.reserved = cq.reserved.saturating_sub(1);
        }
        if let Some(c) = compound {
            self.compound_done(&c);
        }
        if self.quiesce.resetting.is_some() {
            return; // the queues are going away: nothing is posted
        }
        if !status.is_success() {
            self.admin.errors.record(qid, cid, status, nsid, opcode);
        }
        self.count_command(qid, opcode, nsid, bytes, fetched, status);
        if let Some(cq) = self.cqs[cqid as usize].as_mut() {
            let cqe = Completion {
                dw0: dw0.into(),
                dw1: 0.into(),
                sq_head: sq_head.into(),
                sq_id: qid.into(),
                cid: cid.into(),
                status: status.cqe_bits().into(),
            };
            if let Err(e) = cq.post(mem, cqe) {
                crate::error_limited!(
                    "{}: CQ {cqid} not writable ({e}); controller fatal",
                    self.cfg.serial
                );
                self.set_fatal();
            }
        }
        if let Some(admin_slot) = finish_delete {
            self.remove_sq(qid);
            self.complete(0, admin_slot, Status::SUCCESS, 0, mem);
        }
    }

    /// Count a completed command in the statistics: admin commands by outcome, I/O commands
    /// with their latency since the SQE fetch, for the controller and their namespace.
    #[inline]
    fn count_command(
        &self,
        qid: u16,
        opcode: u8,
        nsid: u32,
        bytes: u64,
        fetched: u64,
        status: Status,
    ) {
        if qid == 0 {
            self.stats.record_admin(status);
            return;
        }
        let ns = self
            .tick_rate
            .ns(sys_util::clock::ticks().saturating_sub(fetched));
        self.stats.record_io(opcode, bytes, status, ns);
        if let Some(i) = self.namespace_index(nsid) {
            self.namespaces[i].stats.record(opcode, bytes, status, ns);
        }
    }

    /// The event for an invalid doorbell write value (§3.1.4.18 and §5.2).
    const INVALID_DOORBELL: AsyncEvent = AsyncEvent {
        event_type: event_type::ERROR,
        info: error_info::INVALID_DOORBELL_VALUE,
        log_page: nvme_spec::log_page::lid::ERROR_INFORMATION,
    };

    pub(crate) fn remove_sq(&mut self, qid: u16) {
        if let Some(sq) = self.sqs[qid as usize].take()
            && let Some(cq) = self.cqs[sq.cqid as usize].as_mut()
        {
            cq.sq_count -= 1;
        }
        self.active_sqs.retain(|&q| q != qid);
    }

    /// The context of the command in `slot` of SQ `qid`.
    pub(crate) fn slot_mut(&mut self, qid: u16, slot: u16) -> Option<&mut crate::queue::Slot> {
        self.sqs
            .get_mut(qid as usize)?
            .as_mut()?
            .slots
            .get_mut(slot as usize)
    }

    /// Backend request tag for a slot (carries the reset epoch).
    pub(crate) fn tag(&self, qid: u16, slot: u16) -> u64 {
        crate::quiesce::tag(self.quiesce.epoch(), qid, slot)
    }

    /// The attached namespace with `nsid`, if any (`namespaces` is sorted by NSID).
    pub(crate) fn namespace_index(&self, nsid: u32) -> Option<usize> {
        match self.namespaces.as_slice() {
            [only] => (only.nsid == nsid).then_some(0),
            all => all.binary_search_by_key(&nsid, |n| n.nsid).ok(),
        }
    }
}
