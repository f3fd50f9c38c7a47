//! One emulated NVMe controller: its state and the files that act on it, one job each.
//!
//! The hot path reads top to bottom, one file per hop: the doorbell page
//! ([`crate::doorbell`], [`crate::shadow_doorbell`]) -> `fetch.rs` (SQE fetch and dispatch) ->
//! [`crate::io`] (an NVM command, its PRPs/SGLs in [`crate::dptr`]) -> [`crate::backend`] ->
//! `completion.rs` (reap, post the CQE) -> `interrupt.rs` (MSI-X, coalescing).
//!
//! Beside it: `lifecycle.rs` what register writes set going (enable, reset, NVMe base 2.0
//! §3.5-3.7), `shutdown.rs` shutdown notification and flush (§3.6), `detach.rs` namespaces
//! leaving with requests in flight. The register file itself is [`crate::registers`], the
//! admin commands [`crate::admin`]. One thread owns a controller; the control plane reaches
//! it by message (see [`crate::reactor`]).

use std::sync::Arc;

use nvme_spec::Status;
use nvme_spec::registers::cap;

use crate::doorbell::Doorbells;
use crate::dptr::IoVecs;
use crate::irq::Interrupts;
use crate::irq_coalescing::Coalescing;
use crate::memory::GuestMemory;
use crate::namespace::Namespace;
use crate::pci::PciIds;
use crate::queue::Queues;
use crate::registers::Registers;
use crate::shadow_doorbell::ShadowDoorbells;
use crate::state::AdminState;
use crate::state::features::Features;
use crate::stats::ControllerStats;
use crate::virt_link::VirtRole;

mod completion;
mod detach;
mod fetch;
mod interrupt;
mod lifecycle;
mod shutdown;
mod snapshot;
mod snapshot_blob;
mod snapshot_codec;
mod snapshot_stats;
#[cfg(test)]
mod snapshot_tests;

pub use detach::DETACH_WAIT;
use detach::Detaching;
pub use snapshot::Restored;

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

impl ControllerConfig {
    /// A secondary controller that is not online (it may not be enabled, §8.26.3).
    pub(crate) fn secondary_offline(&self) -> bool {
        matches!(&self.virt, Some(VirtRole::Secondary { online, .. })
            if !online.load(std::sync::atomic::Ordering::Acquire))
    }

    /// I/O queue pairs a secondary was given (its VQ resources less the admin queue).
    pub(crate) fn secondary_io_queues(&self) -> Option<u16> {
        let Some(VirtRole::Secondary { resources, .. }) = &self.virt else {
            return None;
        };
        Some(resources.queues().saturating_sub(1).max(1))
    }
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
    /// Finished at once and its completion already posted (an instant backend's read or
    /// write, [`Controller::complete_instant`]).
    Posted,
}

impl Outcome {
    pub(crate) fn status(s: Status) -> Self {
        Outcome::Done(s, 0)
    }
}

/// Commands one controller has in flight at most, whatever its queue sizes: bounds the
/// iovec storage (4 KiB each, [`crate::dptr::IoVecBlock`]) a guest can make us hold.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 1024;

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
    /// Every SQ and CQ by id.
    pub(crate) queues: Queues,
    /// What admin commands read and change: features, events, logs, keep alive.
    pub(crate) admin: AdminState,
    pub(crate) stats: Arc<ControllerStats>,
    /// Converts [`sys_util::clock::ticks`] to nanoseconds for the latency histograms.
    tick_rate: sys_util::clock::TickRate,
    /// Shadow doorbell and EventIdx pages, when the host configured them.
    pub(crate) shadow: Option<ShadowDoorbells>,
    /// Their view in the map being polled with (found again when either changes).
    shadow_view: Option<crate::shadow_doorbell::ShadowView>,
    pub(crate) scratch: IoVecs,
    pub(crate) bounce: Vec<u8>,
    done: Vec<(u64, Status)>,
    /// The DMA map the last pass polled with and the map version it was taken at: the next
    /// pass keeps it while the version is the same (no snapshot per pass); dropped, with
    /// `shadow_view`, while the controller is not running, so a departed client's memory is
    /// not held.
    pass_map: Option<(u64, Arc<crate::memory::MemoryMap>)>,
    /// The clock read once for the commands fetched in one pass, and once (at the first) for
    /// the commands completed in one fetch pass (instant backends) or reap pass: latency
    /// statistics take one stamp per batch, not per command.
    fetch_stamp: Option<u64>,
    done_stamp: Option<u64>,
    warned_doorbell: bool,
    /// Passes since the admin queue pair was last looked at, and passes in a row that found
    /// no work (see [`ADMIN_EVERY`](Self::ADMIN_EVERY)).
    admin_skipped: u8,
    quiet_passes: u8,
    pub(crate) qos: crate::qos::Qos,
    qos_control: Arc<crate::qos::QosControl>,
    /// The QoS generation last written to the journal (a change is saved at the next poll),
    /// and whether this process has written the journal yet: a new worker must not write
    /// it before it restored from it.
    pub(crate) qos_saved: u64,
    /// The SR-IOV pools' generation as last saved (a primary's journal carries them).
    pub(crate) virt_saved: u64,
    /// A command the last worker fetched is being run again (restore).
    pub(crate) reissuing: bool,
    /// When the statistics are next looked at for a save (`snapshot_stats.rs`).
    pub(crate) stats_save: snapshot_stats::SaveClock,
    pub(crate) journal_owned: bool,
    /// Asynchronous event state changed outside an admin command (an event queued, a
    /// namespace changed size, the pool warning): saved at the next poll.
    pub(crate) events_unsaved: bool,
    /// Reset and shutdown in progress, queues retired with requests still out.
    pub(crate) quiesce: crate::quiesce::Quiesce,
    /// Iovec storage lent to commands in flight, and how many are in flight.
    pub(crate) iov_pool: crate::dptr::IoVecPool,
    /// (Those of the I/O queues, the queue depth the statistics show, are these less the
    /// admin queue's: [`Controller::io_in_flight`].)
    pub(crate) commands_in_flight: usize,
    /// Compares and commands with parts in flight (each holds a buffer or a list), and
    /// those waiting for room ([`crate::compound`]).
    pub(crate) compares: usize,
    pub(crate) part_lists: usize,
    /// The buffers of a piece of a split read or write as it is submitted (reused).
    pub(crate) piece_buffers: crate::backend::GuestBufferList,
    pub(crate) waiting: crate::compound::Waiting,
    /// Namespaces detached while requests were in flight on them: gone for the host, their
    /// backends still polled until those requests have finished.
    detaching: Vec<Detaching>,
    /// The state memfd under a supervisor ([`crate::journal`]); `None`: not journalled.
    pub(crate) journal: Option<Arc<crate::journal::Journal>>,
    /// Queues whose hot records the journal has initialised (see `snapshot.rs`).
    journaled_queues: Vec<JournaledQueue>,
    /// Fetching is held (a planned upgrade drains the controller).
    pub(crate) hold: bool,
}

/// A queue as the journal knows it: SQ (true) or CQ, id, base, size, reset epoch.
type JournaledQueue = (bool, u16, u64, u32, u32);

/// SQ id in the tags of the flushes the controller sends on its own (shutdown notification,
/// daemon stop); no queue has it. Their slot field is the flush's sequence number.
pub(super) const OWN_FLUSH_QID: u16 = u16::MAX;

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
            queues: Queues::new(nq),
            stats,
            tick_rate: sys_util::clock::rate(),
            shadow: None,
            shadow_view: None,
            scratch: IoVecs::default(),
            bounce: vec![0; mdts_bytes],
            done: Vec::with_capacity(1024),
            pass_map: None,
            fetch_stamp: None,
            done_stamp: None,
            warned_doorbell: false,
            admin_skipped: 0,
            quiet_passes: Self::ADMIN_QUIET,
            qos: crate::qos::Qos::default(),
            qos_control: Arc::new(crate::qos::QosControl::new(qos)),
            qos_saved: 0,
            virt_saved: 0,
            reissuing: false,
            stats_save: snapshot_stats::SaveClock::default(),
            journal_owned: false,
            events_unsaved: false,
            quiesce: crate::quiesce::Quiesce::default(),
            iov_pool: crate::dptr::IoVecPool::default(),
            commands_in_flight: 0,
            compares: 0,
            part_lists: 0,
            piece_buffers: crate::backend::GuestBufferList::new(),
            waiting: crate::compound::Waiting::new(),
            detaching: Vec::new(),
            journal: None,
            journaled_queues: Vec::new(),
            hold: false,
        }
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

    /// Backend request tag for a slot (carries the reset epoch).
    pub(crate) fn tag(&self, qid: u16, slot: u16) -> u64 {
        crate::quiesce::tag(self.quiesce.epoch(), qid, slot)
    }

    /// Commands of the I/O queues in flight.
    pub(crate) fn io_in_flight(&self) -> usize {
        let admin = self
            .queues
            .sq(0)
            .map_or(0, crate::queue::SubmissionQueue::in_flight);
        self.commands_in_flight.saturating_sub(admin)
    }

    /// The attached namespace with `nsid`, if any (`namespaces` is sorted by NSID).
    pub(crate) fn namespace_index(&self, nsid: u32) -> Option<usize> {
        crate::namespace::index_of(&self.namespaces, nsid)
    }
}
