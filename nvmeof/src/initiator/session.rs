//! The association with one remote controller: its admin queue, kept alive and rebuilt by
//! a supervisor thread, and the hand-over of fresh I/O queues to the backend that runs them
//! on its reactor. The data path never waits for this thread: it checks one atomic
//! generation counter per submit and poll.
//!
//! Recovery follows the Linux host's model: when the admin queue's Keep Alive fails or the
//! backend reports its I/O connection lost, the supervisor connects again (every path in
//! turn, waiting `reconnect_delay` between rounds) until `ctrl_loss_tmo` has passed since
//! the loss; then the session is failed and I/O completes with Host Pathing Error.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nvme_spec::fabrics::{CNTLID_DYNAMIC, identify_fabrics};
use nvme_spec::identify::cns;

use super::host_identity::HostIdentity;
use super::queue::{ConnectParams, HostQueue, MAX_TRANSFER, QueueError};
use super::url::TcpUrl;

/// Length of one coarse tick (I/O timeout granularity).
pub const TICK: Duration = Duration::from_millis(100);

/// What the backend needs to know of the remote namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNamespace {
    pub nsid: u32,
    pub lba_shift: u32,
    pub blocks: u64,
    /// Largest transfer of one command in bytes.
    pub max_transfer: usize,
    /// ONCS: Dataset Management supported, and deallocated blocks read as zeroes (DLFEAT
    /// bits 2:0 = 001b): a Deallocate can go as Dataset Management.
    pub dsm: bool,
    /// ONCS: Write Zeroes supported.
    pub write_zeroes: bool,
}

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{path}: {source}")]
    Queue {
        path: String,
        #[source]
        source: QueueError,
    },
    #[error("{path}: cannot resolve: {why}")]
    Resolve { path: String, why: String },
    #[error("{path}: namespace {nsid} {why}")]
    Namespace {
        path: String,
        nsid: u32,
        why: String,
    },
    #[error("could not start the session thread: {0}")]
    Thread(std::io::Error),
}

impl SessionError {
    /// The target answered Connect with Controller Busy (retryable): no controller is free,
    /// or, on a vnvme target, this host's last association still has commands running.
    pub fn controller_busy(&self) -> bool {
        matches!(self, SessionError::Queue {
            source: QueueError::Refused { status, .. },
            ..
        } if status.sct() == nvme_spec::status::sct::COMMAND_SPECIFIC
            && status.sc() == nvme_spec::fabrics::connect_status::CONTROLLER_BUSY)
    }
}

/// One successful connection: admin queue, one I/O queue, what they lead to.
pub(crate) struct Established {
    pub admin: HostQueue,
    pub io: Vec<HostQueue>,
    pub ns: RemoteNamespace,
    pub path: usize,
}

/// The first address `path` (`HOST:PORT`) resolves to.
pub(crate) fn resolve(path: &str) -> Result<SocketAddr, SessionError> {
    let why = |why: String| SessionError::Resolve {
        path: path.into(),
        why,
    };
    path.to_socket_addrs()
        .map_err(|e| why(e.to_string()))?
        .next()
        .ok_or_else(|| why("no address".into()))
}

/// Connect to path `path` of `url`: admin queue, enable, Identify, one I/O queue.
pub(crate) fn establish(
    url: &TcpUrl,
    me: &HostIdentity,
    path: usize,
    timeout: Duration,
) -> Result<Established, SessionError> {
    let p = &url.paths[path];
    let q = |source| SessionError::Queue {
        path: p.clone(),
        source,
    };
    let addr = resolve(p)?;
    let params = ConnectParams {
        addr,
        subnqn: url.subnqn.clone(),
        hostnqn: url.hostnqn.clone().unwrap_or_else(|| me.nqn.clone()),
        hostid: me.id,
        header_digest: url.header_digest,
        data_digest: url.data_digest,
        transport: url.transport,
        timeout,
        remote_invalidate: url.remote_invalidate,
    };
    let kato_ms = url.kato.as_millis() as u32;
    let mut admin = HostQueue::connect(&params, 0, 32, CNTLID_DYNAMIC, kato_ms).map_err(q)?;
    let cap = admin.enable(timeout).map_err(q)?;
    let ctrl = admin.identify_controller(timeout).map_err(q)?;
    let mdts = ctrl[77];
    let oncs = u16::from_le_bytes([ctrl[520], ctrl[521]]);
    let mps_min = 4096usize << ((cap >> 48) & 0xf);
    // MDTS comes from the target: a shift past our own limit is our limit
    let ours = match url.transport {
        super::Transport::Tcp => MAX_TRANSFER,
        // each command slot of an RDMA queue has a registered buffer of this size
        #[cfg(feature = "rdma")]
        super::Transport::Rdma => crate::rdma::host_link::SLOT_BYTES,
        #[cfg(not(feature = "rdma"))]
        super::Transport::Rdma => MAX_TRANSFER,
    };
    let max_transfer = match u32::from(mdts) {
        0 => ours,
        m => mps_min
            .checked_shl(m)
            .filter(|&b| b != 0 && b <= ours)
            .unwrap_or(ours),
    };
    let maxcmd = u16::from_le_bytes([ctrl[514], ctrl[515]]);
    let ioccsz = u32::from_le_bytes(
        ctrl[identify_fabrics::IOCCSZ..identify_fabrics::IOCCSZ + 4]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let ns = admin
        .identify(cns::NAMESPACE, url.nsid, timeout)
        .map_err(q)?;
    let nsze = u64::from_le_bytes(ns[0..8].try_into().expect("8 bytes"));
    let flbas = ns[26];
    let fmt = usize::from((flbas & 0xf) | ((flbas >> 1) & 0x30));
    let lbaf = 128 + 4 * fmt;
    let ms = u16::from_le_bytes([ns[lbaf], ns[lbaf + 1]]);
    let lba_shift = u32::from(ns[lbaf + 2]);
    let nsbad = |why: &str| SessionError::Namespace {
        path: p.clone(),
        nsid: url.nsid,
        why: why.into(),
    };
    if nsze == 0 {
        return Err(nsbad("does not exist (or is not attached): NSZE is 0"));
    }
    if !(9..=16).contains(&lba_shift) || ms != 0 {
        return Err(nsbad(
            "has an LBA format vnvme cannot forward (metadata or size)",
        ));
    }
    let mqes = (cap & 0xffff) as u16;
    let mut entries = url.queue_size.min(mqes.saturating_add(1));
    if maxcmd > 0 {
        // MAXCMD bounds the commands outstanding; an SQ of n entries holds n - 1
        entries = entries.min(maxcmd.saturating_add(1));
    }
    let entries = entries.max(2);
    // Number of Queues (feature 07h): ask for what the URL wants, take what is granted
    let want = u32::from(url.nr_io_queues.max(1)) - 1;
    let granted = admin
        .set_features(0x07, want | (want << 16), timeout)
        .map_err(q)?;
    let count = ((granted & 0xffff).min(granted >> 16) + 1).min(u64::from(want) + 1) as u16;
    let mut io = Vec::new();
    for qid in 1..=count {
        let mut c = HostQueue::connect(&params, qid, entries, admin.cntlid(), 0).map_err(q)?;
        c.set_inline_max((ioccsz * 16).saturating_sub(64));
        io.push(c);
    }
    log::info!(
        "{} {p}: controller {} of {}, namespace {} {} blocks of {} bytes, {} I/O queue(s) of {} slots, {} in-capsule bytes{}{}",
        url.transport.name(),
        admin.cntlid(),
        url.subnqn,
        url.nsid,
        nsze,
        1u32 << lba_shift,
        io.len(),
        entries,
        (ioccsz * 16).saturating_sub(64),
        if url.header_digest {
            ", header digest"
        } else {
            ""
        },
        if url.data_digest { ", data digest" } else { "" },
    );
    Ok(Established {
        admin,
        io,
        ns: RemoteNamespace {
            nsid: url.nsid,
            lba_shift,
            blocks: nsze,
            max_transfer,
            dsm: oncs & (1 << 2) != 0 && ns[33] & 7 == 1,
            write_zeroes: oncs & (1 << 3) != 0,
        },
        path,
    })
}

/// Try every path once, starting at `first`.
pub(crate) fn establish_any(
    url: &TcpUrl,
    me: &HostIdentity,
    first: usize,
    timeout: Duration,
) -> Result<Established, Vec<SessionError>> {
    let mut errors = Vec::new();
    for i in 0..url.paths.len() {
        let path = (first + i) % url.paths.len();
        match establish(url, me, path, timeout) {
            Ok(e) => return Ok(e),
            Err(e) => errors.push(e),
        }
    }
    Err(errors)
}

#[derive(Default)]
struct Handover {
    /// Fresh I/O queues for the backend, after a reconnect.
    io: Option<Vec<HostQueue>>,
    /// The backend saw the I/O connections of the current generation fail.
    lost: bool,
    /// Past `ctrl_loss_tmo`: give up.
    failed: bool,
}

/// State shared between the backend and its supervisor thread.
pub struct Session {
    handover: Mutex<Handover>,
    wake: Condvar,
    generation: AtomicU64,
    tick: AtomicU64,
    stop: AtomicBool,
    /// Reconnects so far (for logs and tests).
    reconnects: AtomicU64,
}

impl Session {
    /// Start the supervisor for an established association. The backend runs `est.io`.
    pub(crate) fn start(
        url: TcpUrl,
        me: HostIdentity,
        admin: HostQueue,
        path: usize,
        ns: RemoteNamespace,
    ) -> Result<Arc<Self>, SessionError> {
        let s = Arc::new(Self {
            handover: Mutex::new(Handover::default()),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            tick: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        });
        let thread = format!("{}-session", url.transport.name());
        let sup = Supervisor {
            session: Arc::clone(&s),
            url,
            me,
            ns,
            path,
        };
        std::thread::Builder::new()
            .name(thread)
            .spawn(move || sup.run(admin))
            .map_err(SessionError::Thread)?;
        Ok(s)
    }

    /// Bumped whenever the backend has something to pick up (a fresh queue, failure).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Coarse clock in [`TICK`]s.
    pub fn tick(&self) -> u64 {
        self.tick.load(Ordering::Relaxed)
    }

    /// Reconnects done so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The backend's I/O connections of generation `seen` failed: reconnect. A report
    /// about connections already replaced is ignored.
    pub(crate) fn report_lost(&self, seen: u64) {
        let mut h = self.handover.lock().expect("session lock");
        if seen == self.generation() && h.io.is_none() {
            h.lost = true;
            self.wake.notify_all();
        }
    }

    /// Take what the supervisor handed over: a fresh queue, and whether the session failed.
    pub(crate) fn take(&self) -> (Option<Vec<HostQueue>>, bool) {
        let mut h = self.handover.lock().expect("session lock");
        (h.io.take(), h.failed)
    }

    /// Stop the supervisor (the backend is dropped).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    /// Sleep up to `d` unless stopped or the backend reports a loss; true if a loss is
    /// pending.
    fn nap(&self, d: Duration) -> bool {
        let h = self.handover.lock().expect("session lock");
        let (h, _) = self
            .wake
            .wait_timeout_while(h, d, |h| !h.lost && !self.stop.load(Ordering::Acquire))
            .expect("session lock");
        h.lost
    }
}

struct Supervisor {
    session: Arc<Session>,
    url: TcpUrl,
    me: HostIdentity,
    ns: RemoteNamespace,
    path: usize,
}

impl Supervisor {
    fn stopped(&self) -> bool {
        self.session.stop.load(Ordering::Acquire)
    }

    fn run(mut self, mut admin: HostQueue) {
        let s = Arc::clone(&self.session);
        let step_timeout = self
            .url
            .kato
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        'connected: loop {
            // connected: keep alive at half KATO, count ticks, watch for a reported loss
            let mut last_ka = Instant::now();
            let why = loop {
                if self.stopped() {
                    admin.shutdown();
                    return;
                }
                let lost = s.nap(TICK);
                s.tick.fetch_add(1, Ordering::Relaxed);
                if lost {
                    break "the I/O connection failed".to_string();
                }
                if !self.url.kato.is_zero() && last_ka.elapsed() >= self.url.kato / 2 {
                    last_ka = Instant::now();
                    if let Err(e) = admin.keep_alive(step_timeout) {
                        break format!("keep alive failed: {e}");
                    }
                }
            };
            admin.shutdown();
            log::warn!(
                "{} {}: {why}; reconnecting (controller loss timeout {:?})",
                self.url.transport.name(),
                self.url.paths[self.path],
                self.url.ctrl_loss_tmo
            );
            let since = Instant::now();
            loop {
                if self.stopped() {
                    return;
                }
                // a loss reported meanwhile belongs to the connection being replaced
                s.handover.lock().expect("session lock").lost = false;
                match establish_any(&self.url, &self.me, self.path, step_timeout) {
                    Ok(e)
                        if e.ns.blocks != self.ns.blocks || e.ns.lba_shift != self.ns.lba_shift =>
                    {
                        log::error!(
                            "{} {}: namespace {} changed size or format across the reconnect; not using it",
                            self.url.transport.name(),
                            self.url.paths[e.path],
                            self.ns.nsid
                        );
                    }
                    Ok(e) => {
                        admin = e.admin;
                        if e.path != self.path {
                            log::warn!(
                                "{}: failed over from {} to {}",
                                self.url.transport.name(),
                                self.url.paths[self.path],
                                self.url.paths[e.path]
                            );
                        }
                        self.path = e.path;
                        {
                            // hand over and start a new generation under one lock, so a
                            // late report about the old connections cannot count
                            let mut h = s.handover.lock().expect("session lock");
                            h.io = Some(e.io);
                            h.lost = false;
                            s.generation.fetch_add(1, Ordering::AcqRel);
                        }
                        s.reconnects.fetch_add(1, Ordering::Relaxed);
                        log::info!(
                            "{} {}: reconnected after {:?}",
                            self.url.transport.name(),
                            self.url.paths[self.path],
                            since.elapsed()
                        );
                        continue 'connected;
                    }
                    Err(errors) => {
                        for e in errors {
                            log::info!("{} reconnect: {e}", self.url.transport.name());
                        }
                    }
                }
                if since.elapsed() >= self.url.ctrl_loss_tmo {
                    log::error!(
                        "{} {}: no connection within the controller loss timeout ({:?}); failing I/O",
                        self.url.transport.name(),
                        self.url.paths[self.path],
                        self.url.ctrl_loss_tmo
                    );
                    s.handover.lock().expect("session lock").failed = true;
                    s.generation.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                let wait_until = Instant::now() + self.url.reconnect_delay;
                // a plain sleep: a loss reported meanwhile is already being handled
                while Instant::now() < wait_until && !self.stopped() {
                    std::thread::sleep(TICK);
                    s.tick.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("generation", &self.generation())
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}
