//! The supervisor: `vnvme serve` (by default; `--unsupervised` runs one process) runs as a
//! small, stable process that owns everything a vfio-user client (QEMU) holds the other end
//! of, and runs the data plane in a replaceable **worker** process (the same binary, or a new
//! one for an upgrade).
//!
//! # Who owns which fd
//! - **Supervisor**: each controller's listening vfio-user socket and the client's connected
//!   socket (`qemu_vfio_user::server::relay`); the BAR0 memfd the client mmaps for the
//!   doorbells (created here, so it stays the same file across workers); a duplicate of
//!   every fd the client sent (DMA_MAP guest memory, SET_IRQS eventfds), kept in the relay's
//!   replay table; each controller's **state memfd** (`device_model::journal`); the
//!   NVMe/TCP listening sockets (`tcp_listen`) and a duplicate of each NVMe/TCP connection
//!   the worker accepted (`kept_connections`, to hang up on gracefully should the worker
//!   die); the management socket (`--rpc`). It never closes a vfio-user client connection
//!   because of a worker.
//! - **Worker**: the device model, reactors, backends (files and io_uring are reopened by
//!   each worker from the configuration), its own management socket (`RPC.worker`, to which
//!   the supervisor forwards every method but `daemon_*`).
//!
//! # How fds move
//! The worker inherits one end of a socketpair across fork/execve (the control link, its
//! number in `--worker-fd`). Over it the supervisor sends, per controller, `ATTACH` with
//! SCM_RIGHTS: one end of a fresh socketpair (the *link* the relay forwards the client's
//! messages over), the BAR0 memfd and the state memfd; then `START`. The worker maps both
//! memfds (`Doorbells::from_fd`, `Journal::open`), serves each link with a vfio-user server
//! and answers `DONE {pid}`. Only then does the supervisor give the links to the relays.
//!
//! # Control messages while no worker runs
//! A relay reads one client message at a time. When the link breaks (worker gone) the
//! message stays in hand and the relay waits for the next worker's link (up to 4.5 s, inside
//! QEMU's 5 s per-message timeout); further messages wait in the client's socket. On a new
//! link it replays the DMA map, interrupts and config-space / MSI-X BAR writes (with the
//! duplicated fds), sends `RESTORE` (the worker rebuilds each controller from its state
//! memfd: registers, features, queues, commands in flight, the completion being posted),
//! and then relays the message in hand again. Register writes are idempotent; the journal
//! makes sure a command is completed exactly once.
//!
//! # Planned upgrade and crash
//! `vnvme rpc daemon_upgrade [binary=PATH]` or SIGHUP: the supervisor sends `UPGRADE`; the
//! worker holds fetching, waits for commands in flight (up to 3 s, parked AERs excepted),
//! saves each controller's state, answers and exits; the supervisor reaps it and starts the
//! new binary. A worker that dies otherwise (`kill -9`, a panic that escapes) is reaped and
//! replaced by the same binary, which recovers from the journal: commands fetched and not
//! completed are run again (reads, writes, write zeroes, deallocate, flush are idempotent;
//! an admin command's effect is saved with its completion before that is posted) unless
//! their completion is found in the CQ past its recorded tail, an admin completion being
//! posted is written unless the guest's CQ slot holds it already, and every enabled vector
//! is signalled once. If the supervisor itself dies, the clients' sockets
//! close with it: the VM loses the device, as without a supervisor.
//!
//! # Run-time changes
//! `ns_add`, `ns_delete`, `ns_attach`, `ns_detach`, `raid_create`,
//! `raid_delete`, `lvs_create` and `lvs_delete` change the worker's memory: the supervisor
//! keeps each one a worker accepted and replays them, in order, to the next worker before
//! giving it the client links (so controllers restore with their namespaces; a store loads,
//! an array assembles). `subsystem_create` of a vfio-user controller or an NVMe/TCP export:
//! the supervisor owns its socket and memfds, or its listener, from before the worker makes
//! it (`ATTACH` or `LISTEN` at run time, acknowledged) and hands them to every next worker
//! before the call is replayed (`rpc/subsystems.rs`). Calls that would not
//! replay faithfully are refused (`rpc.rs`).
//!
//! # Namespaces guests change
//! Namespace Management and Attachment (a guest's, or `ns_create`) change the subsystem,
//! which saves its namespaces in the journal of its keeper (the PF) before the change is
//! answered (`sriov::Subsystem::keep_in`). After the replay the supervisor asks the new
//! worker to settle (`SETTLE`): each subsystem goes back to what was saved, quietly, before
//! any client is relayed. Until then, replayed attachments and deletions are left to the
//! saved state (it is newer); replayed `ns_add`s carry their NSIDs.
//!
//! # NVMe/TCP exports
//! A host's NVMe/TCP connections belong to the worker and close with it (their controllers
//! are the host's to re-create); the listener stays with the supervisor, so the host's
//! reconnect waits in its backlog until the next worker accepts it, and the host sends again
//! what had no response (Linux requeues within `ctrl_loss_tmo`; vnvme's initiator waits
//! for the connection unless `fast_io_fail_tmo` says otherwise). Commands a killed worker had
//! in flight on its io_uring end before the process does, so they cannot land after the
//! host's retry. A worker leaving for a planned upgrade hangs up on its hosts gracefully once
//! drained (`TcpTarget::hang_up`: its side ended, what the host still sends taken until the
//! host closes, up to 500 ms), so no host send meets a reset; the supervisor keeps a
//! duplicate of each connection (`KEEP`, [`kept_connections`]) and does the same for a
//! worker that dies. NVMe/RDMA exports: an RDMA CM listener is no descriptor the supervisor
//! could keep, so each worker listens itself; while none runs a host's connect is rejected,
//! and the host tries again (Linux every `reconnect_delay`, within `ctrl_loss_tmo`), then
//! sends again what had no response, as over NVMe/TCP.

mod configured;
pub mod control;
pub mod handover;
pub mod kept_connections;
mod kept_ram;
mod rpc;
pub mod worker;

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use device_model::journal::Journal;
use qemu_vfio_user::server::relay::Relay;
use serde_json::{Value, json};
use sys_util::SharedMemory;

use crate::config::Config;

/// How long the supervisor waits for the worker's answer to a control request at run time
/// (the worker answers between management calls).
const CONTROL_WAIT: Duration = Duration::from_secs(5);

/// Most vfio-user sockets made at run time held at once (each a relay thread, its memfds and
/// the client's fds: a caller cannot make the supervisor run out of either). Four PFs with
/// 127 VFs each.
const MAX_RUN_TIME_SOCKETS: usize = 512;
/// Most NVMe/TCP listeners held at once.
const MAX_LISTENERS: usize = crate::config::MAX_ENTRIES;

/// Errors of the supervisor and of a worker's side of it.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("supervisor: {0}")]
    Io(#[source] std::io::Error),
    #[error("supervisor protocol: {0}")]
    Protocol(String),
    #[error("--supervised does not support {0} yet")]
    Unsupported(String),
    /// A backend whose data would die with the worker.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Server(#[from] qemu_vfio_user::server::ServerError),
    #[error("the worker did not start: {0}")]
    WorkerStart(String),
}

/// How the supervisor was started.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The worker binary (this one at start; `daemon_upgrade binary=` changes it).
    pub binary: PathBuf,
    /// The worker's arguments (`serve ...` without `--supervised` or `--unsupervised`;
    /// `--worker-fd` is added).
    pub worker_args: Vec<OsString>,
    /// The management socket, and the worker's behind it.
    pub rpc: Option<PathBuf>,
    pub worker_rpc: Option<PathBuf>,
}

/// What `daemon_status` shows.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub worker_pid: u32,
    /// Workers started so far (the first is generation 1).
    pub generation: u64,
    pub upgrades: u64,
    pub recoveries: u64,
    /// From noticing the death of a worker to its successor being ready.
    pub last_recovery_ms: Option<u64>,
    /// When that was, in seconds since the epoch.
    pub last_recovery_at: Option<u64>,
    pub last_upgrade_ms: Option<u64>,
    pub binary: String,
}

impl Status {
    fn json(&self) -> Value {
        json!({
            "worker_pid": self.worker_pid,
            "generation": self.generation,
            "upgrades": self.upgrades,
            "recoveries": self.recoveries,
            "last_recovery_ms": self.last_recovery_ms,
            "last_recovery_at": self.last_recovery_at,
            "last_upgrade_ms": self.last_upgrade_ms,
            "binary": self.binary,
        })
    }
}

/// One controller's fds, owned by the supervisor.
struct Owned {
    socket: PathBuf,
    doorbells: SharedMemory,
    state: SharedMemory,
    links: Sender<UnixStream>,
    /// Its relay's own stop flag (it stops alone when its subsystem is deleted).
    stop: Arc<AtomicBool>,
    /// A controller made at run time (`subsystem_create`).
    run_time: bool,
}

/// The running supervisor.
pub struct Supervisor {
    opts: SupervisorOptions,
    owned: Vec<Owned>,
    relays: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    worker: Option<(Child, UnixStream)>,
    /// When to try again to start a worker after every attempt failed.
    retry_at: Option<Instant>,
    /// A relay found the worker alive but not answering.
    hung: Arc<AtomicBool>,
    /// NVMe/TCP listeners by configured address, handed to every worker.
    listeners: Vec<(String, TcpListener)>,
    /// Run-time changes to replay to each new worker.
    changes: rpc::Changes,
    /// The RAM of `malloc:` namespaces, handed to every worker.
    ram: kept_ram::KeptRam,
    /// The configured subsystems, by entry number (some deleted at run time).
    configured: Vec<configured::ConfiguredEntry>,
    /// The configuration every worker builds (`CONFIG`): TOML in a memfd, and its length.
    config: (OwnedFd, usize),
    status: Status,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("status", &self.status)
            .finish()
    }
}

/// Why `cfg` cannot be served by a supervisor, if it cannot (see [`check`]).
pub fn refusal(cfg: &Config) -> Option<String> {
    check(cfg).err().map(|e| e.to_string())
}

/// Refuse what a worker cannot carry over (`malloc:` RAM is kept: `kept_ram.rs`; a pool's
/// namespaces: [`pool_refusal`]).
fn check(cfg: &Config) -> Result<Vec<PathBuf>, SupervisorError> {
    let mut sockets = Vec::new();
    for c in &cfg.controllers {
        if let Some(why) = pool_refusal(c.namespace_pool.as_deref(), c.socket.is_some()) {
            return Err(SupervisorError::Refused(why));
        }
        if let Some(s) = &c.socket {
            sockets.push(s.clone());
            // each VF is a controller of its own on its own socket: relayed the same way
            for n in 1..=usize::from(c.vfs.unwrap_or(0)) {
                sockets.push(sriov::topology::vf_socket(s, n));
            }
        }
    }
    Ok(sockets)
}

/// Why a subsystem with namespace pool `pool` (a vfio-user controller among its own:
/// `socket`) cannot be supervised, if it cannot. The namespaces guests create are kept in
/// that controller's journal and reopened by the next worker from the pool: a `dir:` pool's
/// files, an `lvs:` pool's volumes and a `malloc:` pool's RAM (a memfd the supervisor
/// keeps, `kept_ram.rs`) outlive a worker.
pub(crate) fn pool_refusal(pool: Option<&str>, socket: bool) -> Option<String> {
    let pool = pool?;
    if !socket {
        return Some(format!(
            "namespace_pool {pool} under --supervised needs a vfio-user socket in the \
             subsystem (its controller keeps the created namespaces in its journal)"
        ));
    }
    None
}

/// The body of a starting worker's answer to `what`; a worker that answered with an error,
/// or not at all, is killed and reaped, and its error is the start's.
fn answer_of(
    child: &mut Child,
    answer: std::io::Result<Option<control::Control>>,
    what: &str,
) -> Result<Value, SupervisorError> {
    let why = match answer {
        Ok(Some(m)) if m.command == control::DONE => match m.body.get("error") {
            None => return Ok(m.body),
            Some(e) => e.as_str().unwrap_or("no reason given").to_owned(),
        },
        other => format!("no answer to {what}: {other:?}"),
    };
    // it exits by itself; a worker hanging on its way out is not waited for
    let _ = child.kill();
    let _ = child.wait();
    Err(SupervisorError::WorkerStart(why))
}

/// `cfg` as TOML in a memfd, with its length: what every worker builds, whatever happens to
/// the file since (entry numbers and RAM keys stay those the supervisor holds sockets and
/// RAM for).
fn config_memfd(cfg: &Config) -> Result<(OwnedFd, usize), SupervisorError> {
    use std::os::unix::fs::FileExt;
    let text = cfg
        .to_toml()
        .map_err(|e| SupervisorError::Protocol(e.to_string()))?;
    let fd = sys_util::kept_ram::create(c"vnvme-config", text.len() as u64)
        .map_err(SupervisorError::Io)?;
    let file = std::fs::File::from(fd);
    file.write_all_at(text.as_bytes(), 0)
        .map_err(SupervisorError::Io)?;
    Ok((file.into(), text.len()))
}

/// Bind every configured NVMe/TCP address once: the supervisor keeps the listeners and
/// hands them to each worker, so a host reconnecting while no worker runs waits in the
/// backlog instead of being refused.
fn bind_listeners(cfg: &Config) -> Result<Vec<(String, TcpListener)>, SupervisorError> {
    let mut out: Vec<(String, TcpListener)> = Vec::new();
    for a in cfg.controllers.iter().filter_map(|c| c.tcp_listen.as_ref()) {
        if out.iter().any(|(b, _)| b == a) {
            continue;
        }
        let sa: std::net::SocketAddr = a
            .parse()
            .map_err(|_| SupervisorError::Refused(format!("tcp_listen {a}: want IP:PORT")))?;
        let l = TcpListener::bind(sa).map_err(|e| {
            SupervisorError::Refused(format!("tcp_listen {a}: cannot listen there: {e}"))
        })?;
        out.push((a.clone(), l));
    }
    Ok(out)
}

impl Supervisor {
    /// Take the sockets, start the first worker.
    pub fn start(cfg: &Config, opts: SupervisorOptions) -> Result<Self, SupervisorError> {
        let mut cfg = cfg.clone();
        let ram = kept_ram::KeptRam::configured(&mut cfg).map_err(SupervisorError::Io)?;
        let sockets = check(&cfg)?;
        let listeners = bind_listeners(&cfg)?;
        let config = config_memfd(&cfg)?;
        crate::limits::apply();
        let mut s = Self {
            status: Status {
                binary: opts.binary.display().to_string(),
                ..Status::default()
            },
            opts,
            owned: Vec::new(),
            relays: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            worker: None,
            retry_at: None,
            hung: Arc::new(AtomicBool::new(false)),
            listeners,
            changes: rpc::Changes::default(),
            ram,
            configured: configured::entries(&cfg),
            config,
        };
        for socket in sockets {
            if let Err(e) = s.own_configured(socket) {
                // the sockets bound so far go again
                s.shutdown();
                return Err(e);
            }
        }
        if let Err(e) = s.spawn_worker() {
            // nothing is served: the relays remove their sockets
            s.shutdown();
            return Err(e);
        }
        Ok(s)
    }

    /// Own configured vfio-user socket `socket`: bind it, make its memfds, run its relay.
    fn own_configured(&mut self, socket: PathBuf) -> Result<(), SupervisorError> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut relay = Relay::bind(&socket, rx, Arc::clone(&stop), Arc::clone(&self.hung))?;
        let made = SharedMemory::new(c"vnvme-bar0", device_model::pci::BAR0_SIZE)
            .and_then(|d| Ok((d, Journal::create()?)));
        let (doorbells, state) = match made {
            Ok(m) => m,
            Err(e) => {
                // the relay never ran: stopped at once, it removes its socket
                stop.store(true, Ordering::Relaxed);
                relay.run();
                return Err(SupervisorError::Io(e));
            }
        };
        let owned = Owned {
            socket,
            doorbells,
            state,
            links: tx,
            stop,
            run_time: false,
        };
        self.run_relay(relay, owned).map_err(SupervisorError::Io)
    }

    /// Run `relay` on a thread of its own and keep what is owned for its socket.
    fn run_relay(&mut self, mut relay: Relay, owned: Owned) -> std::io::Result<()> {
        let handle = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || relay.run())?;
        self.relays.push(handle);
        self.owned.push(owned);
        Ok(())
    }

    /// The sockets served.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.owned.iter().map(|o| o.socket.clone()).collect()
    }

    /// Start a worker of `self.opts.binary`, hand it the fds and wait until it is ready.
    fn spawn_worker(&mut self) -> Result<(), SupervisorError> {
        // no management call reaches the new worker before it has every run-time change
        let changes = Arc::clone(&self.changes);
        let changes = rpc::write(&changes);
        let (ours, theirs) = UnixStream::pair().map_err(SupervisorError::Io)?;
        sys_util::fd::set_inheritable(theirs.as_fd(), true).map_err(SupervisorError::Io)?;
        let mut cmd = Command::new(&self.opts.binary);
        cmd.args(&self.opts.worker_args);
        for i in &changes.deleted {
            cmd.arg("--deleted-entry").arg(i.to_string());
        }
        cmd.arg("--worker-fd")
            .arg(theirs.as_raw_fd().to_string())
            // a terminal's Ctrl-C reaches the supervisor alone, which stops the worker
            .process_group(0);
        let mut child = cmd.spawn().map_err(SupervisorError::Io)?;
        drop(theirs);
        let handed = self.hand_over(&ours);
        let (links, ready) = match handed {
            Ok(links) => (
                links,
                control::request(
                    &ours,
                    control::START,
                    &json!({"settle": true, "keep": true}),
                    &[],
                    Duration::from_secs(30),
                ),
            ),
            Err(e) => {
                // a worker that never got what it serves is not left behind
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Io(e));
            }
        };
        let pid = child.id();
        let settles = answer_of(&mut child, ready, "START")?["settle"] == true;
        kept_connections::keep_for(&ours);
        // the run-time changes first: the controllers restore with their namespaces
        if let Some(p) = &self.opts.worker_rpc {
            rpc::replay(&changes, p);
        }
        // then the namespaces as guests left them, before any client is relayed again
        if settles {
            let wait = Duration::from_secs(30);
            let settled = control::request(&ours, control::SETTLE, &Value::Null, &[], wait);
            let body = answer_of(&mut child, settled, "SETTLE")?;
            log::info!("supervisor: subsystems settled: {body}");
        }
        for (o, l) in self.owned.iter().zip(links) {
            let _ = o.links.send(l);
        }
        self.status.worker_pid = pid;
        self.status.generation += 1;
        log::info!(
            "supervisor: worker {pid} (generation {}) ready",
            self.status.generation
        );
        self.worker = Some((child, ours));
        Ok(())
    }

    /// Hand a starting worker on `ctl` what it serves: the configuration, each socket's
    /// link and memfds, the listeners, the kept RAM. The relay ends of the links.
    fn hand_over(&self, ctl: &UnixStream) -> std::io::Result<Vec<UnixStream>> {
        let (config, len) = &self.config;
        control::send(
            ctl,
            control::CONFIG,
            &json!({"len": len}),
            &[config.as_fd()],
        )?;
        let mut links = Vec::new();
        for o in &self.owned {
            let (relay_end, worker_end) = UnixStream::pair()?;
            let body = json!({"socket": o.socket, "run_time": o.run_time});
            let fds = [worker_end.as_fd(), o.doorbells.fd(), o.state.fd()];
            control::send(ctl, control::ATTACH, &body, &fds)?;
            links.push(relay_end);
        }
        for (addr, l) in &self.listeners {
            control::send(ctl, control::LISTEN, &json!({"addr": addr}), &[l.as_fd()])?;
        }
        self.ram.send_all(ctl)?;
        Ok(links)
    }

    /// A planned upgrade to `binary` (default: the current one). A new binary whose worker
    /// does not come up is given up: the current binary is started again (the clients see
    /// a longer stall) and the upgrade is refused.
    pub fn upgrade(&mut self, binary: Option<PathBuf>) -> Result<Value, SupervisorError> {
        let t = Instant::now();
        let previous = self.opts.binary.clone();
        if let Some(b) = binary {
            self.opts.binary = b;
        }
        if let Some((mut child, ctl)) = self.worker.take() {
            let answer = control::request(
                &ctl,
                control::UPGRADE,
                &Value::Null,
                &[],
                Duration::from_secs(10),
            );
            if !matches!(answer, Ok(Some(ref m)) if m.command == control::DONE) {
                log::warn!(
                    "supervisor: the worker did not answer the upgrade ({answer:?}); killing it"
                );
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if let Err(e) = self.spawn_worker() {
            log::error!(
                "supervisor: the worker of {} did not start ({e}); back to {}",
                self.opts.binary.display(),
                previous.display()
            );
            self.opts.binary = previous;
            self.spawn_with_retries()?;
            return Err(e);
        }
        self.status.binary = self.opts.binary.display().to_string();
        self.status.upgrades += 1;
        let ms = t.elapsed().as_millis() as u64;
        self.status.last_upgrade_ms = Some(ms);
        log::info!("supervisor: upgrade done in {ms} ms");
        Ok(
            json!({"generation": self.status.generation, "worker_pid": self.status.worker_pid, "ms": ms}),
        )
    }

    /// Own vfio-user socket `socket` from now on, for a `subsystem_create` the worker is
    /// about to run: bind it, make its memfds and relay, and hand them to the worker, which
    /// acknowledges. Every next worker gets them too, before that call is replayed to it.
    fn attach_at_run_time(&mut self, socket: PathBuf) -> Result<(), String> {
        if self.owned.iter().any(|o| o.socket == socket) {
            return Err(format!("socket {} is served already", socket.display()));
        }
        if self.owned.iter().filter(|o| o.run_time).count() >= MAX_RUN_TIME_SOCKETS {
            return Err(format!(
                "{MAX_RUN_TIME_SOCKETS} vfio-user sockets made at run time are served already"
            ));
        }
        let Some((_, ctl)) = self.worker.as_ref() else {
            return Err("no worker is running (the next one is starting): try again".into());
        };
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut relay = Relay::bind(&socket, rx, Arc::clone(&stop), Arc::clone(&self.hung))
            .map_err(|e| e.to_string())?;
        let made = (|| {
            let doorbells = SharedMemory::new(c"vnvme-bar0", device_model::pci::BAR0_SIZE)?;
            let state = Journal::create()?;
            let (relay_end, worker_end) = UnixStream::pair()?;
            let body = json!({"socket": socket, "run_time": true});
            let fds = [worker_end.as_fd(), doorbells.fd(), state.fd()];
            match control::request(ctl, control::ATTACH, &body, &fds, CONTROL_WAIT)? {
                Some(m) if m.command == control::DONE && m.body["ok"] == true => {
                    Ok((doorbells, state, relay_end))
                }
                other => Err(std::io::Error::other(format!(
                    "the worker did not take the socket ({other:?})"
                ))),
            }
        })();
        let (doorbells, state, relay_end) = match made {
            Ok(m) => m,
            Err(e) => {
                // the relay never ran: stopped at once, it removes its socket
                stop.store(true, Ordering::Relaxed);
                relay.run();
                return Err(e.to_string());
            }
        };
        let _ = tx.send(relay_end);
        let owned = Owned {
            socket,
            doorbells,
            state,
            links: tx,
            stop,
            run_time: true,
        };
        self.run_relay(relay, owned).map_err(|e| e.to_string())
    }

    /// Hold an NVMe/TCP listener on `addr` from now on, for a `subsystem_create` the worker
    /// is about to run: bind it and hand it to the worker, which acknowledges. Every next
    /// worker gets it too, before that call is replayed to it.
    fn listen_at_run_time(&mut self, addr: &str) -> Result<(), String> {
        if self.listeners.iter().any(|(a, _)| a == addr) {
            return Err("that address is served already".into());
        }
        if self.listeners.len() >= MAX_LISTENERS {
            return Err(format!(
                "{MAX_LISTENERS} NVMe/TCP addresses are served already"
            ));
        }
        let sa: std::net::SocketAddr = addr.parse().map_err(|_| "want IP:PORT".to_owned())?;
        let l = TcpListener::bind(sa).map_err(|e| format!("cannot listen there: {e}"))?;
        if let Some((_, ctl)) = self.worker.as_ref() {
            let body = json!({"addr": addr});
            match control::request(ctl, control::LISTEN, &body, &[l.as_fd()], CONTROL_WAIT) {
                Ok(Some(m)) if m.command == control::DONE && m.body["ok"] == true => {}
                other => return Err(format!("the worker did not take the listener ({other:?})")),
            }
        }
        log::info!("supervisor: listening on {addr} for a subsystem made at run time");
        self.listeners.push((addr.to_owned(), l));
        Ok(())
    }

    /// Close the listener held on `addr` (its subsystem was deleted, or refused).
    fn unlisten(&mut self, addr: &str) {
        if let Some(i) = self.listeners.iter().position(|(a, _)| a == addr) {
            self.listeners.remove(i);
            log::info!("supervisor: no longer listening on {addr}");
        }
    }

    /// Keep RAM of `size` bytes for a `malloc:` spec a run-time call names; its key.
    fn ram_at_run_time(&mut self, size: u64) -> Result<String, String> {
        let ctl = self.worker.as_ref().map(|(_, c)| c);
        self.ram.make(size, ctl).map_err(|e| e.to_string())
    }

    /// Let go of kept RAM `key`, in the running worker too (which holds it until a
    /// namespace takes it).
    fn forget_ram(&mut self, key: &str) {
        let ctl = self.worker.as_ref().map(|(_, c)| c);
        self.ram.forget(key, ctl);
    }

    /// Let go of socket `socket` (its subsystem was deleted, or its creation refused): its
    /// relay closes the client's connection and removes the socket.
    fn detach(&mut self, socket: &std::path::Path) {
        if let Some(i) = self.owned.iter().position(|o| o.socket == socket) {
            let o = self.owned.remove(i);
            o.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Start a worker, trying a few times within QEMU's message timeout.
    fn spawn_with_retries(&mut self) -> Result<(), SupervisorError> {
        let mut last = None;
        for attempt in 0..3 {
            match self.spawn_worker() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    log::error!(
                        "supervisor: starting a worker (attempt {}): {e}",
                        attempt + 1
                    );
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        Err(last.unwrap_or_else(|| SupervisorError::WorkerStart("gave up".into())))
    }

    /// Reap a worker that died and start another; true when that happened.
    fn check_worker(&mut self) -> bool {
        let Some((child, _)) = self.worker.as_mut() else {
            // every attempt failed: go on trying, once a second
            if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                if self.spawn_worker().is_ok() {
                    self.status.recoveries += 1;
                    self.retry_at = None;
                }
            }
            return false;
        };
        let status = match child.try_wait() {
            Ok(None) => return false,
            Ok(Some(s)) => Some(s),
            Err(_) => None,
        };
        let t = Instant::now();
        log::error!(
            "supervisor: worker {} died ({}); starting another",
            self.status.worker_pid,
            status_text(status)
        );
        self.worker = None;
        if let Err(e) = self.spawn_with_retries() {
            log::error!("supervisor: {e}");
            return true;
        }
        self.status.recoveries += 1;
        self.status.last_recovery_ms = Some(t.elapsed().as_millis() as u64);
        self.status.last_recovery_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        true
    }

    /// Run until SIGINT/SIGTERM: SIGHUP and `daemon_upgrade` upgrade the worker, a dead
    /// worker is replaced.
    pub fn run(&mut self) -> Result<(), SupervisorError> {
        sys_util::process::catch_hangup();
        let rpc = match &self.opts.rpc {
            Some(p) => Some(rpc::SupervisorRpc::bind(
                p,
                self.opts.worker_rpc.clone(),
                std::sync::Arc::clone(&self.changes),
                self.configured.iter().map(|e| e.nqn.clone()).collect(),
            )?),
            None => None,
        };
        while !sys_util::process::terminate_requested() {
            if sys_util::process::take_hangup() {
                log::info!("supervisor: SIGHUP: upgrading the worker");
                if let Err(e) = self.upgrade(None) {
                    log::error!("supervisor: upgrade failed: {e}");
                }
            }
            if self.hung.swap(false, Ordering::Relaxed)
                && let Some((child, _)) = self.worker.as_mut()
            {
                log::error!(
                    "supervisor: worker {} stopped answering; killing it",
                    self.status.worker_pid
                );
                let _ = child.kill();
            }
            self.check_worker();
            match &rpc {
                Some(r) => r.poll(self, Duration::from_millis(20)),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        drop(rpc);
        self.shutdown();
        Ok(())
    }

    /// Stop the worker (it flushes) and the relays (they remove their sockets).
    pub fn shutdown(&mut self) {
        if let Some((mut child, ctl)) = self.worker.take() {
            // SIGTERM: the worker's normal shutdown flushes its namespaces
            let _ = sys_util::process::terminate(child.id());
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(15) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            drop(ctl);
        }
        self.stop.store(true, Ordering::Relaxed);
        for o in &self.owned {
            o.stop.store(true, Ordering::Relaxed);
        }
        for r in self.relays.drain(..) {
            let _ = r.join();
        }
    }

    fn status(&self) -> &Status {
        &self.status
    }
}

fn status_text(s: Option<std::process::ExitStatus>) -> String {
    s.map_or_else(|| "status unknown".into(), |s| s.to_string())
}

/// The worker's arguments: this process's `serve` arguments without `--supervised` or
/// `--unsupervised`, with the management socket moved to `RPC.worker`. Returns them and that
/// path.
pub fn worker_args(args: &[OsString]) -> (Vec<OsString>, Option<PathBuf>) {
    let mut out = Vec::new();
    let mut worker_rpc = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--supervised" || s == "--unsupervised" {
            continue;
        }
        if s == "--rpc" {
            if let Some(v) = it.next() {
                let p = PathBuf::from(format!("{}.worker", v.to_string_lossy()));
                out.push(a.clone());
                out.push(p.clone().into_os_string());
                worker_rpc = Some(p);
            }
            continue;
        }
        if let Some(v) = s.strip_prefix("--rpc=") {
            let p = PathBuf::from(format!("{v}.worker"));
            out.push(OsString::from(format!("--rpc={}", p.display())));
            worker_rpc = Some(p);
            continue;
        }
        out.push(a.clone());
    }
    (out, worker_rpc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_arguments() {
        let a: Vec<OsString> = ["serve", "--supervised", "--rpc", "/r", "--socket", "/s"]
            .iter()
            .map(OsString::from)
            .collect();
        let (w, rpc) = worker_args(&a);
        assert_eq!(rpc, Some(PathBuf::from("/r.worker")));
        assert_eq!(
            w,
            ["serve", "--rpc", "/r.worker", "--socket", "/s"].map(OsString::from)
        );
    }
}
