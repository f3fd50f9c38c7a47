//! The NVMe-oF target: exports emulated controllers over NVMe/TCP (transport 1.0) and
//! NVMe/RDMA (transport 1.0, cargo feature `rdma`) with a discovery controller beside them.
//! One fabrics layer serves both: a connection's transport ([`connection::Link`]) only
//! carries capsules, responses and data; Connect, properties, Keep Alive, discovery and the
//! controller are shared.
//!
//! Every exported subsystem is one emulated controller running in its own reactor; the
//! target drives it as its PCIe host would ([`local_host`]), so admin and I/O commands get
//! the controller's own handling. The target adds only what is fabric-specific: connection
//! initialization, Connect (admin and I/O queues), Property Get/Set, Keep Alive timing,
//! in-capsule data, R2T/H2CData and C2HData, digests, and the allowed-host list.
//!
//! The target runs as a poller ([`device_model::Poller`]) on the reactor of the
//! controllers it exports: in one pass of that reactor's loop a capsule is read, its command
//! placed in the controller's ring, the controller polled, and the completion sent, with no
//! wake-up or handoff between threads (an exported controller on another reactor still
//! works, through the same rings, at the cost of that handoff). Sockets are non-blocking
//! and polled, so a slow or hostile peer cannot stall the others; a protocol error from a
//! peer gets a C2HTermReq and a closed connection, and tears down only its own association.
//!
//! Files: `poller.rs` the target on its reactor; `event_loop.rs` one pass: accepting and
//! polling; `connection.rs` a connection's state and its transport; `rdma_queues.rs` RDMA
//! connections' events;
//! `capsule.rs` commands and host data; `fabrics.rs` Connect and properties;
//! `completion.rs` responses and controller-to-host data; `discovery.rs` the discovery
//! controller; `local_host.rs` the rings and buffers shared with the controller.

mod capsule;
mod completion;
mod connection;
pub mod discovery;
mod event_loop;
mod fabrics;
pub mod local_host;
mod poller;
#[cfg(feature = "rdma")]
mod rdma_queues;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use device_model::{ControllerHandle, Doorbells, GuestMemory, PollMode, Reactor};

use self::connection::Conn;
use self::local_host::{LocalHost, LocalHostError};

/// In-capsule data an I/O or admin command may carry (IOCCSZ = 64 + 8192 bytes).
pub const INLINE_DATA: usize = 8192;
/// Entries of each queue the target creates on its controller (MAXCMD + 1).
pub const QUEUE_DEPTH: u32 = 128;

/// A controller to export, running in its reactor. Several with the same NQN are the
/// controllers of one subsystem: each host association (admin Connect) takes a free one.
pub struct ExportSpec {
    /// Subsystem NQN hosts connect to.
    pub nqn: String,
    /// Host NQNs allowed to connect; empty: any host.
    pub allowed_hosts: Vec<String>,
    pub handle: ControllerHandle,
    pub mem: Arc<GuestMemory>,
    pub doorbells: Arc<Doorbells>,
    /// The controller's CNTLID (Identify and Connect agree on it).
    pub cntlid: u16,
    /// I/O queues the controller allows (its max_io_queues).
    pub io_queues: u16,
    /// Bytes one command may move (the controller's MDTS).
    pub max_transfer: usize,
}

impl std::fmt::Debug for ExportSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSpec")
            .field("nqn", &self.nqn)
            .field("cntlid", &self.cntlid)
            .finish_non_exhaustive()
    }
}

/// Why the target could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("subsystem {nqn}: {source}")]
    Memory { nqn: String, source: LocalHostError },
    #[error("subsystem NQN {0:?} is not valid (1..=223 bytes, not the discovery NQN)")]
    BadNqn(String),
    #[error("could not start the target's reactor thread: {0}")]
    Thread(std::io::Error),
    #[cfg(feature = "rdma")]
    #[error("RDMA listen on {addrs:?}: {source}")]
    Rdma {
        addrs: Vec<SocketAddr>,
        source: crate::rdma::verbs::VerbsError,
    },
    #[error("this vnvme was built without the RDMA transport (cargo feature `rdma`)")]
    NoRdma,
}

/// Who owns a command slot of an exported controller's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Free,
    /// A host command: its CID on the host's queue.
    Host {
        cid: u16,
    },
    /// Creating I/O queue `qid` for connection `conn`: CQ first, then SQ.
    CreateCq {
        conn: usize,
        qid: u16,
    },
    CreateSq {
        conn: usize,
        qid: u16,
    },
    /// Answered; its data is still being sent from the slot's buffer (RDMA).
    Sending,
}

/// A command slot: one SQ entry and its data buffer.
#[derive(Clone, Copy, Debug)]
struct Slot {
    owner: Owner,
    /// Bytes of data the command moves, and which way.
    len: usize,
    to_host: bool,
    /// H2C bytes received so far (writes sent by R2T).
    received: usize,
    /// Waiting for H2CData before it can be submitted.
    awaiting_data: bool,
    /// Not counted as outstanding work (an Asynchronous Event Request waits forever).
    parked: bool,
    /// A data digest failed on its H2C data: fail it instead of submitting it.
    digest_failed: bool,
    /// The command as the host sent it.
    sqe: nvme_spec::Submission,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            owner: Owner::Free,
            len: 0,
            to_host: false,
            received: 0,
            awaiting_data: false,
            parked: false,
            digest_failed: false,
            sqe: nvme_spec::Submission::default(),
        }
    }
}

/// A queue of an association: its connection and command slots.
#[derive(Debug)]
struct QueueState {
    conn: Option<usize>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Host CIDs in flight, one bit each (a reused CID is a host error).
    cid_busy: Vec<u64>,
    /// Created on the controller (Connect finished).
    live: bool,
    /// CID of the Connect command being completed.
    connect_cid: u16,
}

impl QueueState {
    fn new(size: u32) -> Self {
        let n = size.saturating_sub(1) as u16;
        Self {
            conn: None,
            slots: vec![Slot::default(); n as usize],
            free: (0..n).rev().collect(),
            cid_busy: vec![0; 1024],
            live: false,
            connect_cid: 0,
        }
    }

    fn cid_taken(&self, cid: u16) -> bool {
        self.cid_busy[cid as usize / 64] & (1 << (cid % 64)) != 0
    }

    fn set_cid(&mut self, cid: u16, busy: bool) {
        let (w, b) = (cid as usize / 64, 1u64 << (cid % 64));
        if busy {
            self.cid_busy[w] |= b;
        } else {
            self.cid_busy[w] &= !b;
        }
    }

    /// Commands the controller is working on (parked ones excluded).
    fn busy(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.owner != Owner::Free && !s.parked && !s.awaiting_data)
            .count()
    }
}

/// A host's association with an exported controller.
#[derive(Debug)]
struct Association {
    hostnqn: String,
    /// The Host Identifier of its Connect.
    hostid: [u8; 16],
    kato_ms: u32,
    last_admin: Instant,
    /// CC.EN as the host last set it: commands other than Fabrics ones before that get
    /// Command Sequence Error (a disabled controller would never answer them).
    enabled: bool,
    /// Queue 0 is the admin queue.
    queues: Vec<Option<QueueState>>,
}

/// An exported subsystem.
struct Export {
    spec: ExportSpec,
    host: LocalHost,
    assoc: Option<Association>,
    /// Namespace IDs and LBA sizes (log2), for checking a Read's length against its SGL.
    lba_shifts: Vec<(u32, u8)>,
    /// The controller is resetting after an association ended.
    draining: Option<Draining>,
}

/// A controller resetting after its association ended: no association takes it until the
/// reset has finished (the commands the association left have completed) or `until`. When
/// the association left commands running, a new association of the same host (Host NQN
/// and Host ID, `fence`) takes no controller of the subsystem meanwhile either. That is a
/// fence: a host that lost its association (its process was killed) and sends its commands
/// again on a new one finds the lost ones done first, so a write it sends again is never
/// overtaken by the lost copy landing late.
#[derive(Debug)]
struct Draining {
    until: Instant,
    fence: Option<(String, [u8; 16])>,
}

impl Draining {
    /// Whether a new association of this host must wait (anonymous hosts are not told
    /// apart, so they are not fenced).
    fn fences(&self, hostnqn: &str, hostid: &[u8; 16]) -> bool {
        !hostnqn.is_empty()
            && self
                .fence
                .as_ref()
                .is_some_and(|(nqn, id)| nqn == hostnqn && id == hostid)
    }
}

impl Export {
    /// Queue `qid` of the current association.
    fn queue(&self, qid: u16) -> Option<&QueueState> {
        self.assoc.as_ref()?.queues.get(qid as usize)?.as_ref()
    }

    /// Queue `qid` of the current association, to change.
    fn queue_mut(&mut self, qid: u16) -> Option<&mut QueueState> {
        self.assoc.as_mut()?.queues.get_mut(qid as usize)?.as_mut()
    }
}

/// Called with every TCP connection the target accepts, on its reactor (so it must not
/// block): a supervisor keeps a duplicate to close the connection gracefully should this
/// process die (the target shuts every connection it ends, so a duplicate never holds one
/// open).
pub type KeepHook = Arc<dyn Fn(std::os::fd::BorrowedFd<'_>) + Send + Sync>;

/// The running target.
pub struct TcpTarget {
    stop: Arc<AtomicBool>,
    /// The reactor the target runs on (its first exported controller's).
    reactor: Reactor,
    /// The exported controllers, handed back when the target has stopped.
    done: Receiver<Vec<ExportSpec>>,
    addrs: Vec<SocketAddr>,
    /// How long a hang-up may take (ms, 0: none asked), and its end.
    hang_up_ms: Arc<AtomicU64>,
    hung_up: Receiver<bool>,
}

impl std::fmt::Debug for TcpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTarget")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl TcpTarget {
    /// Listen on `listen` and serve `exports` (and the discovery subsystem) until stopped.
    pub fn start(listen: &[SocketAddr], exports: Vec<ExportSpec>) -> Result<Self, ExportError> {
        Self::start_on(listen, &[], exports)
    }

    /// Listen on `listen` (NVMe/TCP) and `rdma_listen` (NVMe/RDMA: addresses of RDMA
    /// devices' interfaces) and serve `exports` and the discovery subsystem on all of them
    /// until stopped.
    pub fn start_on(
        listen: &[SocketAddr],
        rdma_listen: &[SocketAddr],
        exports: Vec<ExportSpec>,
    ) -> Result<Self, ExportError> {
        Self::start_with(listen, Vec::new(), rdma_listen, exports, None)
    }

    /// [`TcpTarget::start_on`], serving also on `bound`: NVMe/TCP listeners bound already
    /// (by a supervisor that keeps them across worker processes), showing each connection
    /// accepted to `keep`.
    pub fn start_with(
        listen: &[SocketAddr],
        bound: Vec<TcpListener>,
        rdma_listen: &[SocketAddr],
        exports: Vec<ExportSpec>,
        keep: Option<KeepHook>,
    ) -> Result<Self, ExportError> {
        #[cfg(feature = "rdma")]
        let rdma = if rdma_listen.is_empty() {
            None
        } else {
            Some(
                crate::rdma::port::RdmaPort::listen(rdma_listen).map_err(|source| {
                    ExportError::Rdma {
                        addrs: rdma_listen.to_vec(),
                        source,
                    }
                })?,
            )
        };
        #[cfg(not(feature = "rdma"))]
        if !rdma_listen.is_empty() {
            return Err(ExportError::NoRdma);
        }
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        let mut all = Vec::with_capacity(listen.len() + bound.len());
        for &addr in listen {
            let l =
                TcpListener::bind(addr).map_err(|source| ExportError::Listen { addr, source })?;
            all.push(l);
        }
        all.extend(bound);
        for l in all {
            let local = l.local_addr().map_err(|source| ExportError::Listen {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
            l.set_nonblocking(true)
                .map_err(|source| ExportError::Listen {
                    addr: local,
                    source,
                })?;
            addrs.push(local);
            listeners.push((l, local));
        }
        let mut built: Vec<Export> = Vec::new();
        for spec in exports {
            if built
                .iter()
                .any(|b| b.spec.nqn == spec.nqn && b.spec.cntlid == spec.cntlid)
            {
                return Err(ExportError::BadNqn(format!(
                    "{} (two controllers with ID {})",
                    spec.nqn, spec.cntlid
                )));
            }
            if spec.nqn.is_empty()
                || spec.nqn.len() > nvme_spec::fabrics::NQN_MAX
                || spec.nqn == nvme_spec::fabrics::DISCOVERY_NQN
            {
                return Err(ExportError::BadNqn(spec.nqn));
            }
            let slot_bytes = spec.max_transfer.max(INLINE_DATA).next_multiple_of(4096);
            let host = LocalHost::new(
                Arc::clone(&spec.mem),
                Arc::clone(&spec.doorbells),
                usize::from(spec.io_queues) + 1,
                QUEUE_DEPTH,
                slot_bytes,
            )
            .map_err(|source| ExportError::Memory {
                nqn: spec.nqn.clone(),
                source,
            })?;
            let lba_shifts = spec.handle.with(|c| c.lba_shifts()).unwrap_or_default();
            built.push(Export {
                spec,
                host,
                assoc: None,
                lba_shifts,
                draining: None,
            });
        }
        let reactor = match built.first().and_then(|e| e.spec.handle.reactor()) {
            Some(r) => r,
            None => Reactor::spawn("nvme-tcp-target", PollMode::Adaptive)
                .map_err(ExportError::Thread)?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let target = event_loop::Target {
            listeners,
            conns: Vec::<Option<Conn>>::new(),
            exports: built,
            genctr: 1,
            scratch: Vec::new(),
            last_kato: Instant::now(),
            ready: Vec::new(),
            ready_slots: Vec::new(),
            #[cfg(feature = "rdma")]
            rdma,
            #[cfg(feature = "rdma")]
            rdma_events: Vec::new(),
            keep,
        };
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        let (hung_up_tx, hung_up) = std::sync::mpsc::sync_channel(1);
        let hang_up_ms = Arc::new(AtomicU64::new(0));
        let poller = Box::new(poller::TargetPoller {
            target: Some(target),
            stop: Arc::clone(&stop),
            done: done_tx,
            hang_up_ms: Arc::clone(&hang_up_ms),
            hanging_until: None,
            hung_up: hung_up_tx,
        });
        // on the reactor of the (first) exported controller: a command and its completion
        // in one pass of its loop; with nothing exported (discovery only), a reactor of its own
        reactor.add_poller(poller);
        for a in &addrs {
            log::info!("nvme-tcp target: listening on {a}");
        }
        for a in rdma_listen {
            log::info!("nvme-rdma target: listening on {a}");
        }
        Ok(Self {
            stop,
            reactor,
            done,
            addrs,
            hang_up_ms,
            hung_up,
        })
    }

    /// The addresses listened on (with the ports chosen when 0 was asked).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Before this process is replaced (a planned upgrade, its controllers drained): start
    /// hanging up on every host, each connection closed gracefully so that no host send
    /// meets a reset, for up to `within` (see [`TcpTarget::hung_up`]). Nothing is accepted
    /// from then on; the listeners are left to the next process.
    pub fn hang_up(&self, within: Duration) {
        let ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX).max(1);
        self.hang_up_ms.store(ms, Ordering::Release);
        self.reactor.wake();
    }

    /// Wait until `deadline` for the hang-up to end: `Some(true)` when every host closed
    /// its end in time, `Some(false)` when its time was up first, `None` without an answer.
    pub fn hung_up(&self, deadline: Instant) -> Option<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.hung_up.recv_timeout(left).ok()
    }

    /// Close every connection and stop; returns the exported controllers.
    pub fn stop(self) -> Vec<ExportSpec> {
        self.finish().unwrap_or_default()
    }

    /// Ask the target's poller to close its connections and stop, and take the exported
    /// controllers back (`None` when its reactor is gone or does not answer in time).
    fn finish(&self) -> Option<Vec<ExportSpec>> {
        if self.stop.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.reactor.wake();
        self.done.recv_timeout(STOP_WAIT).ok()
    }
}

/// How long stopping waits for the target's reactor to close its connections.
const STOP_WAIT: Duration = Duration::from_secs(30);

impl Drop for TcpTarget {
    fn drop(&mut self) {
        drop(self.finish());
    }
}
