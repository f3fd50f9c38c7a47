//! `vnvme serve`: run the daemon until SIGINT/SIGTERM, answering the management socket
//! (`--rpc`) in between.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use vnvme::config::{Config, PollSetting, Served};
use vnvme::daemon::Daemon;
use vnvme::metrics::MetricsServer;
use vnvme::rpc::RpcServer;
use vnvme::supervisor::worker::{Asked, WorkerLink};
use vnvme::supervisor::{Supervisor, SupervisorOptions, worker_args};

/// How long a worker leaving for an upgrade waits for its NVMe-oF hosts to close their
/// connections after it ended its side (a Linux host takes a few milliseconds); the
/// vfio-user clients wait meanwhile.
const HANG_UP_WAIT: Duration = Duration::from_millis(500);

/// Serve emulated NVMe controllers over vfio-user or NVMe/TCP.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// vfio-user socket of the controller (with --ns; use --config for several controllers)
    #[arg(long, conflicts_with = "config", required_unless_present_any = ["config", "tcp_listen", "rdma_listen"])]
    pub socket: Option<PathBuf>,
    /// export over NVMe/TCP on IP:PORT (with --socket too: a second controller of the same
    /// subsystem, sharing the namespaces)
    #[arg(long, value_name = "IP:PORT", conflicts_with = "config")]
    pub tcp_listen: Option<String>,
    /// export over NVMe/RDMA on IP:PORT (an address of an RDMA device's interface, e.g. a
    /// Soft-RoCE link's); with --tcp-listen, the same controllers over both
    #[arg(long, value_name = "IP:PORT", conflicts_with = "config")]
    pub rdma_listen: Option<String>,
    /// subsystem NQN (default nqn.2026-11.io.vnvme:SERIAL)
    #[arg(long, conflicts_with = "config")]
    pub nqn: Option<String>,
    /// host NQN allowed to connect over NVMe/TCP, repeatable (default: any host)
    #[arg(long = "allow-host", value_name = "NQN", requires = "tcp_listen")]
    pub allow_hosts: Vec<String>,
    /// namespace backend, repeatable: null:SIZE, malloc:SIZE, file:PATH[:SIZE] (SIZE creates
    /// or resizes the file), nvme:vfio-user:SOCK[@NSID[:OFFSET+LEN]],
    /// nvme:pci:DDDD:BB:DD.F[@NSID[:OFFSET+LEN]] (a namespace of another NVMe controller, or
    /// a byte range of one), nvme-tcp://HOST:PORT[,HOST:PORT]/NQN[/NSID][?OPTS] (a remote
    /// NVMe/TCP namespace), nvme-rdma://... (the same over NVMe/RDMA)
    #[arg(long = "ns", value_name = "BACKEND", conflicts_with = "config")]
    pub ns: Vec<String>,
    /// controller serial number (also seeds the namespaces' NGUID/UUID)
    #[arg(long, conflicts_with = "config")]
    pub serial: Option<String>,
    /// logical block size of the --ns namespaces: 512 or 4096
    #[arg(long, default_value_t = 512, conflicts_with = "config")]
    pub block_size: u32,
    /// reactor idle policy
    #[arg(long, value_enum, default_value_t = PollSetting::Adaptive, conflicts_with = "config")]
    pub poll: PollSetting,
    /// power-on interrupt coalescing ENTRIES/MICROSECONDS, e.g. 8/100, applied adaptively,
    /// or off (default: 16/200)
    #[arg(long, conflicts_with = "config")]
    pub irq_coalescing: Option<String>,
    /// QoS: I/O commands per second
    #[arg(long, value_name = "N", conflicts_with = "config")]
    pub iops_limit: Option<u64>,
    /// QoS: data bytes per second, e.g. 100M
    #[arg(long, value_name = "SIZE", conflicts_with = "config")]
    pub bw_limit: Option<String>,
    /// TOML configuration with one or more [[controller]] tables
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// management socket (JSON-RPC; see `vnvme rpc --help`)
    #[arg(long, value_name = "PATH")]
    pub rpc: Option<PathBuf>,
    /// serve Prometheus metrics on ADDR:PORT (GET /metrics; port 0: any free port, logged);
    /// overrides `metrics` in --config
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// run as a supervisor that owns the sockets and runs the data plane in a worker
    /// process, which can be upgraded (`vnvme rpc daemon_upgrade`, SIGHUP) or can crash
    /// under running guests without them seeing an error (the default; given explicitly, a
    /// configuration it cannot carry is refused instead of served unsupervised)
    #[arg(long, conflicts_with = "unsupervised")]
    pub supervised: bool,
    /// run the data plane in this process: no upgrade under running guests, a crash loses
    /// the devices (what a configuration the supervisor cannot carry gets, with a warning)
    #[arg(long)]
    pub unsupervised: bool,
    /// (internal) run as the worker of a supervisor, whose control link is this descriptor
    #[arg(long, hide = true, value_name = "FD", conflicts_with_all = ["supervised", "unsupervised"])]
    pub worker_fd: Option<i32>,
    /// (internal) a worker's configured subsystem its supervisor deleted at run time: its
    /// entry number (repeated for several)
    #[arg(long, hide = true, value_name = "ENTRY", requires = "worker_fd")]
    pub deleted_entry: Vec<usize>,
}

impl ServeArgs {
    /// The configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<Config> {
        Ok(match (&self.config, &self.socket) {
            (Some(path), _) => Config::load(path)?,
            (None, _) if self.ns.is_empty() => anyhow::bail!(
                "give at least one --ns BACKEND (e.g. --ns malloc:256M; see `vnvme serve --help`): \
                 a controller without namespaces has nothing to serve, and namespaces can only \
                 be created at run time with a namespace_pool (--config)"
            ),
            (None, sock)
                if sock.is_some() || self.tcp_listen.is_some() || self.rdma_listen.is_some() =>
            {
                let served = Served {
                    socket: sock.clone(),
                    tcp_listen: self.tcp_listen.clone(),
                    rdma_listen: self.rdma_listen.clone(),
                    nqn: self.nqn.clone(),
                    allowed_hosts: self.allow_hosts.clone(),
                };
                let mut cfg = Config::from_flags(
                    served,
                    &self.ns,
                    self.serial.clone(),
                    self.block_size,
                    self.poll,
                )?;
                let c = &mut cfg.controllers[0];
                c.irq_coalescing.clone_from(&self.irq_coalescing);
                c.iops_limit = self.iops_limit;
                c.bandwidth_limit.clone_from(&self.bw_limit);
                cfg.validate()?;
                cfg
            }
            (None, _) => anyhow::bail!("give --socket or --tcp-listen (with --ns), or --config"),
        })
    }
}

/// Run until a signal arrives; flush and remove sockets on the way out.
pub fn run(args: &ServeArgs) -> anyhow::Result<i32> {
    let worker = match args.worker_fd {
        Some(fd) => Some(WorkerLink::take(fd).context("taking over from the supervisor")?),
        None => None,
    };
    let cfg = match (configuration(args, worker.as_ref()), &worker) {
        (Ok(cfg), _) => cfg,
        (Err(e), w) => return failed(e, w.as_ref()),
    };
    sys_util::process::catch_termination_signals();
    if worker.is_none() && supervised(&cfg, args) {
        return supervise(&cfg, args);
    }
    let started = match &worker {
        Some(_) => Daemon::start_worker(&cfg, &args.deleted_entry),
        None => Daemon::start(&cfg),
    };
    let up = started.context("starting the daemon").and_then(|d| {
        let rpc = bind_rpc(args)?;
        let metrics = start_metrics(&cfg, args, &d)?;
        Ok((d, rpc, metrics))
    });
    let (mut daemon, rpc, metrics) = match up {
        Ok(up) => up,
        Err(e) => return failed(e, worker.as_ref()),
    };
    // a worker is ready once its management socket is up: the supervisor replays run-time
    // changes there before the clients come back
    if let Some(w) = &worker {
        w.ready().context("telling the supervisor")?;
    }
    for s in daemon.sockets() {
        log::info!("serving {}", s.display());
        eprintln!("vnvme: serving NVMe controller on {}", s.display());
    }
    for a in daemon.tcp_addrs() {
        eprintln!("vnvme: serving NVMe/TCP on {a}");
    }
    while !sys_util::process::terminate_requested() {
        match worker.as_ref().map(|w| (w, w.poll(Duration::ZERO))) {
            Some((w, Asked::Upgrade)) => {
                w.upgrade();
                // the NVMe-oF hosts reconnect to the next worker: end their connections
                // gracefully, not with the resets an exit leaves
                let t = std::time::Instant::now();
                let (closed, targets) = daemon.hang_up_hosts(HANG_UP_WAIT);
                log::info!(
                    "worker: hung up on NVMe-oF hosts: those of {closed} of {targets} targets closed in {} ms",
                    t.elapsed().as_millis()
                );
                // no flush, no socket removal: the next worker carries on with all of it
                std::process::exit(0);
            }
            Some((w, Asked::Settle)) => match daemon.settle_subsystems() {
                Ok(done) => {
                    w.settled(&done);
                    for a in daemon.tcp_addrs() {
                        eprintln!("vnvme: serving NVMe/TCP on {a}");
                    }
                }
                Err(e) => {
                    // the supervisor says why, once, as its own error
                    let e = anyhow::Error::new(e).context("starting the daemon");
                    w.settled(&serde_json::json!({ "error": crate::cause_once(&e) }));
                    return Ok(1);
                }
            },
            Some((_, Asked::SupervisorGone)) => {
                eprintln!("vnvme: the supervisor is gone; stopping");
                break;
            }
            _ => {}
        }
        match &rpc {
            Some(r) => {
                // a request may have added or removed controllers
                // a worker answers its supervisor's control link within 20 ms
                let wait = if worker.is_some() { 20 } else { 100 };
                if r.poll(&mut daemon, Duration::from_millis(wait))
                    && let Some(m) = &metrics
                {
                    m.registry().set(daemon.metric_sources());
                }
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    drop(rpc);
    drop(metrics);
    eprintln!("vnvme: signal received, flushing and shutting down");
    daemon.stop().context("stopping the daemon")?;
    Ok(0)
}

/// `--supervised`: own the sockets, run the data plane in a worker process.
/// The configuration to build: a worker's supervisor's, else the flags' or file's.
fn configuration(args: &ServeArgs, worker: Option<&WorkerLink>) -> anyhow::Result<Config> {
    if let Some(text) = worker.and_then(WorkerLink::config) {
        // the supervisor's, as it read it at its start (its RAM keys named)
        let origin = std::path::Path::new("(the supervisor's configuration)");
        return Ok(Config::parse(text, origin)?);
    }
    let mut cfg = args.to_config()?;
    if worker.is_some() {
        // a supervisor of an earlier build: the RAM of `malloc:` namespaces is its own, named
        // as this names it
        cfg.keep_configured_ram();
    }
    Ok(cfg)
}

/// A start that failed: a worker tells its supervisor why (which says it, once, as its own
/// error) and exits with 1; otherwise the error is this command's.
fn failed(e: anyhow::Error, worker: Option<&WorkerLink>) -> anyhow::Result<i32> {
    match worker {
        Some(w) => {
            w.failed(&crate::cause_once(&e));
            Ok(1)
        }
        None => Err(e),
    }
}

/// The Prometheus endpoint `--metrics` (or the configuration's `metrics`) names, serving
/// `daemon`'s statistics.
fn start_metrics(
    cfg: &Config,
    args: &ServeArgs,
    daemon: &Daemon,
) -> anyhow::Result<Option<MetricsServer>> {
    let addr = match (args.metrics, &cfg.metrics) {
        (Some(a), _) => a,
        // validated with the configuration
        (None, Some(a)) => a.parse().context("metrics")?,
        (None, None) => return Ok(None),
    };
    let m = MetricsServer::start(addr).with_context(|| format!("metrics on {addr}"))?;
    m.registry().set(daemon.metric_sources());
    eprintln!("vnvme: metrics on http://{}/metrics", m.local_addr());
    Ok(Some(m))
}

/// The management socket `--rpc` names, bound.
fn bind_rpc(args: &ServeArgs) -> anyhow::Result<Option<RpcServer>> {
    let Some(path) = &args.rpc else {
        return Ok(None);
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let r = RpcServer::bind(path).with_context(|| format!("{}", path.display()))?;
    eprintln!("vnvme: management socket {}", path.display());
    Ok(Some(r))
}

/// Whether to run as a supervisor: unless `--unsupervised`, or (without an explicit
/// `--supervised`, which refuses it at start) a configuration it cannot carry.
fn supervised(cfg: &vnvme::config::Config, args: &ServeArgs) -> bool {
    if args.unsupervised {
        return false;
    }
    if args.supervised {
        return true;
    }
    match vnvme::supervisor::refusal(cfg) {
        None => true,
        Some(why) => {
            log::warn!("{why}");
            eprintln!(
                "vnvme: {why}\nvnvme: serving without a supervisor: no upgrade under running \
                 guests, and a crash loses the devices (--unsupervised says so without this \
                 warning)"
            );
            false
        }
    }
}

fn supervise(cfg: &vnvme::config::Config, args: &ServeArgs) -> anyhow::Result<i32> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (worker_args, worker_rpc) = worker_args(&argv);
    let opts = SupervisorOptions {
        binary: std::env::current_exe().context("finding this binary")?,
        worker_args,
        rpc: args.rpc.clone(),
        worker_rpc,
    };
    let mut sup = Supervisor::start(cfg, opts).context("starting the supervisor")?;
    for s in sup.sockets() {
        eprintln!(
            "vnvme: serving NVMe controller on {} (supervised)",
            s.display()
        );
    }
    if let Some(r) = &args.rpc {
        eprintln!("vnvme: management socket {}", r.display());
    }
    sup.run().context("supervisor")?;
    eprintln!("vnvme: supervisor stopped");
    Ok(0)
}
