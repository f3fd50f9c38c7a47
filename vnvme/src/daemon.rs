//! The running daemon: for each configured controller, its namespaces' backends, a reactor
//! thread owning the controller, and a vfio-user server thread on its socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use device_model::backend::Backend;
use device_model::pci::PciIds;
use device_model::virt::{VirtRole, VirtState};
use device_model::{
    Controller, ControllerConfig, ControllerHandle, ControllerStats, Doorbells, FabricsIdentify,
    GuestMemory, Namespace, PollMode, QosControl, QosLimits, Reactor, Subsystem,
};
use nvmeof::target::{ExportSpec, TcpTarget};
use pcie_p2p::{DeviceRegistry, TransferStats};
use qemu_vfio_user::server::{NvmeDevice, Server, ServerError};

use crate::backend_spec::{BackendSpec, OpenError};
use crate::config::{Config, ControllerSpec, PollSetting};

/// Errors starting or stopping the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("controller[{index}].namespace[{ns}]: {source}")]
    Backend {
        index: usize,
        ns: usize,
        source: OpenError,
    },
    #[error("controller[{index}]: {source}")]
    Io {
        index: usize,
        source: std::io::Error,
    },
    #[error("controller[{index}]: {source}")]
    Server { index: usize, source: ServerError },
    #[error("controller[{index}]: server thread panicked")]
    Panicked { index: usize },
    #[error("{0:?} is not an IP:PORT address")]
    Address(String),
    #[error("NVMe/TCP target on {addr}: {source}")]
    Tcp {
        addr: String,
        source: nvmeof::target::TargetError,
    },
}

/// A running daemon.
pub struct Daemon {
    stop: Arc<AtomicBool>,
    servers: Vec<(PathBuf, JoinHandle<Result<Server, ServerError>>)>,
    stats: Vec<Arc<ControllerStats>>,
    transfers: Vec<Vec<(u32, Arc<TransferStats>)>>,
    memory: Vec<Arc<GuestMemory>>,
    targets: Vec<TcpTarget>,
    /// QoS handles of each entry's controllers.
    qos: Vec<Vec<Arc<QosControl>>>,
    /// Shared reactor threads (when configured); they end after the controllers.
    reactors: Vec<Reactor>,
    /// Each entry's NVM subsystem.
    subsystems: Vec<Arc<Subsystem>>,
    /// Every controller, in build order.
    controllers: Vec<ControllerInfo>,
}

/// What the management plane knows of one controller.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    /// Configuration entry (`[[controller]]` index).
    pub entry: usize,
    pub cntlid: u16,
    /// "pf", "vf", "tcp" or "ctrl" (a vfio-user controller without VFs).
    pub kind: &'static str,
    /// VF number (1-based) of a VF.
    pub vf: Option<u16>,
    /// vfio-user socket, or the NVMe/TCP listen address.
    pub endpoint: String,
    pub stats: Arc<ControllerStats>,
    pub qos: Arc<QosControl>,
    /// The SR-IOV state a PF and its VFs share.
    pub virt: Option<Arc<Mutex<VirtState>>>,
}

impl ControllerInfo {
    /// "ready", "disabled", "offline" (a VF not online) or "online" (a VF online, not yet
    /// enabled by its host).
    pub fn state(&self) -> &'static str {
        let ready = self.stats.ready.load(Ordering::Relaxed);
        let online = match (&self.virt, self.vf) {
            (Some(v), Some(n)) => v
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .secondaries
                .get(usize::from(n) - 1)
                .is_some_and(device_model::virt::Secondary::online),
            _ => true,
        };
        match (ready, online, self.vf.is_some()) {
            (true, _, _) => "ready",
            (false, false, _) => "offline",
            (false, true, true) => "online",
            (false, true, false) => "disabled",
        }
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("sockets", &self.sockets())
            .finish()
    }
}

/// A controller running in its reactor, with its memory map, doorbells, PCI IDs, event
/// counters and the transfer counters of its `nvme:` namespaces.
struct Built {
    handle: ControllerHandle,
    mem: Arc<GuestMemory>,
    doorbells: Arc<Doorbells>,
    ids: PciIds,
    stats: Arc<ControllerStats>,
    qos: Arc<QosControl>,
    nqn: String,
    max_io_queues: u16,
    mdts: u8,
}

/// Defaults for a controller exported over NVMe/TCP: the target gives each queue slot a
/// buffer of the whole transfer size, so queues and MDTS are kept modest (4 I/O queues,
/// 128 KiB).
const TCP_IO_QUEUES: u16 = 4;
const TCP_MDTS: u8 = 5;

/// The namespaces of one `[[controller]]`, opened once.
struct Opened {
    backends: Vec<Box<dyn Backend>>,
    transfers: Vec<(u32, Arc<TransferStats>)>,
}

fn open_namespaces(
    index: usize,
    spec: &ControllerSpec,
    mem: &Arc<GuestMemory>,
    devices: &mut DeviceRegistry,
) -> Result<Opened, DaemonError> {
    let mut out = Opened {
        backends: Vec::new(),
        transfers: Vec::new(),
    };
    for (j, n) in spec.namespaces.iter().enumerate() {
        let bspec: BackendSpec = n.backend.parse().map_err(|e| DaemonError::Backend {
            index,
            ns: j,
            source: OpenError::Spec(e),
        })?;
        let opened = bspec
            .open(mem, devices)
            .map_err(|source| DaemonError::Backend {
                index,
                ns: j,
                source,
            })?;
        if let Some(t) = opened.transfer {
            out.transfers.push((j as u32 + 1, t));
        }
        out.backends.push(opened.backend);
    }
    Ok(out)
}

/// How a built controller is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    VfioUser,
    Tcp,
}

/// Which controller of a `[[controller]]` entry is being built.
struct Which {
    reach: Reach,
    cntlid: u16,
    virt: Option<VirtRole>,
    /// The entry has more than one controller (CMIC bit 1).
    shared: bool,
    /// The entry's NVM subsystem.
    subsystem: Arc<Subsystem>,
}

fn build_controller(
    index: usize,
    spec: &ControllerSpec,
    which: Which,
    mem: Arc<GuestMemory>,
    place: &mut Placement,
) -> Result<Built, DaemonError> {
    let Which {
        reach,
        cntlid,
        virt,
        shared,
        subsystem,
    } = which;
    let mut cfg = ControllerConfig::default();
    cfg.serial = spec
        .serial
        .clone()
        .unwrap_or_else(|| format!("VNVME{index:04}"));
    if let Some(m) = &spec.model {
        cfg.model.clone_from(m);
    }
    cfg.ids = PciIds {
        vendor: spec.vendor_id.unwrap_or(cfg.ids.vendor),
        device: spec.device_id.unwrap_or(cfg.ids.device),
        ..cfg.ids
    };
    let tcp = reach == Reach::Tcp;
    cfg.max_io_queues = spec.max_io_queues.unwrap_or(if tcp {
        TCP_IO_QUEUES
    } else {
        cfg.max_io_queues
    });
    cfg.mdts = spec.mdts.unwrap_or(if tcp { TCP_MDTS } else { cfg.mdts });
    if tcp {
        cfg.fabrics = Some(FabricsIdentify {
            ioccsz: ((64 + nvmeof::target::INLINE_DATA) / 16) as u32,
            iorcsz: 1,
            maxcmd: nvmeof::target::QUEUE_DEPTH as u16,
        });
    }
    if let Some(v) = &spec.irq_coalescing {
        // validated with the configuration
        cfg.irq_coalescing = crate::config::parse_coalescing(v).unwrap_or_default();
    }
    cfg.cntlid = cntlid;
    cfg.virt = virt;
    cfg.shared_namespaces = shared;
    // the PF (or the one vfio-user controller) manages the subsystem's namespaces
    cfg.namespace_management =
        reach == Reach::VfioUser && cfg.virt.as_ref().is_none_or(VirtRole::is_primary);
    cfg.namespace_management &= subsystem.manages_namespaces();
    cfg.subsystem = Some(Arc::clone(&subsystem));
    cfg.qos = QosLimits {
        iops: spec.iops_limit,
        bytes_per_sec: spec
            .bandwidth_limit
            .as_deref()
            .and_then(crate::backend_spec::parse_size),
    };
    subsystem.nqn().clone_into(&mut cfg.subnqn);
    let namespaces: Vec<Namespace> = subsystem.namespaces_for(cntlid);
    for ns in &namespaces {
        log::info!(
            "{} (controller {cntlid:#x}{}): namespace {} = {} ({}-byte blocks)",
            cfg.serial,
            if tcp { ", NVMe/TCP" } else { "" },
            ns.nsid,
            ns.backend.describe(),
            1u32 << ns.lba_shift
        );
    }
    let doorbells = Arc::new(Doorbells::new().map_err(|source| DaemonError::Io { index, source })?);
    let ids = cfg.ids;
    let (nqn, max_io_queues, mdts) = (cfg.subnqn.clone(), cfg.max_io_queues, cfg.mdts);
    let name = format!("reactor-{index}{}", if tcp { "-tcp" } else { "" });
    let ctrl = Controller::new(cfg, Arc::clone(&mem), Arc::clone(&doorbells), namespaces);
    let stats = ctrl.stats();
    let qos = ctrl.qos_control();
    let handle = place
        .place(&name, ctrl)
        .map_err(|source| DaemonError::Io { index, source })?;
    subsystem.set_poster(cntlid, handle.poster());
    Ok(Built {
        handle,
        mem,
        doorbells,
        ids,
        stats,
        qos,
        nqn,
        max_io_queues,
        mdts,
    })
}

/// Where controllers run: a thread each, or round robin on `reactors` shared threads.
struct Placement {
    mode: PollMode,
    shared: Vec<Reactor>,
    next: usize,
}

impl Placement {
    fn new(cfg: &Config) -> std::io::Result<Self> {
        let mode = if cfg.poll == PollSetting::Busy {
            PollMode::Busy
        } else {
            PollMode::Adaptive
        };
        let shared = (0..cfg.reactors)
            .map(|i| Reactor::spawn(&format!("reactor-s{i}"), mode))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            mode,
            shared,
            next: 0,
        })
    }

    fn place(&mut self, name: &str, ctrl: Controller) -> std::io::Result<ControllerHandle> {
        if self.shared.is_empty() {
            return ControllerHandle::spawn(name, ctrl, self.mode);
        }
        let r = &self.shared[self.next % self.shared.len()];
        self.next += 1;
        Ok(r.add(ctrl))
    }
}

/// The CNTLIDs of entry `index`'s controllers in the order they are built (vfio-user PF,
/// VFs, then NVMe/TCP controllers): position `u` is controller number `u` of `attach`.
fn controller_ids(index: usize, spec: &ControllerSpec, vfs: usize, tcp_count: usize) -> Vec<u16> {
    let mut ids = Vec::new();
    if spec.socket.is_some() {
        ids.push(index as u16 + 1);
    }
    for k in 0..vfs {
        ids.push(vf_cntlid(index, k + 1));
    }
    for k in 0..tcp_count {
        ids.push(tcp_cntlid(index, spec, k));
    }
    ids
}

/// The NQN of entry `index` (configured, or made from its serial).
fn entry_nqn(index: usize, spec: &ControllerSpec) -> String {
    spec.nqn.clone().unwrap_or_else(|| {
        let serial = spec
            .serial
            .clone()
            .unwrap_or_else(|| format!("VNVME{index:04}"));
        format!("nqn.2026-11.io.vnvme:{serial}")
    })
}

/// CNTLIDs of VF (secondary) controllers: `0x1000 + index * 128 + VF number`.
const SECONDARY_CNTLID_BASE: u16 = 0x1000;

/// CNTLID of VF `vf` (1-based) of entry `index`.
fn vf_cntlid(index: usize, vf: usize) -> u16 {
    SECONDARY_CNTLID_BASE + (index as u16) * 128 + vf as u16
}

/// CNTLID of the entry's NVMe/TCP controller `k`: after the vfio-user controller when the
/// entry has one, steps of 0x100 from `index + 1`.
fn tcp_cntlid(index: usize, spec: &ControllerSpec, k: usize) -> u16 {
    let step = k + usize::from(spec.socket.is_some());
    index as u16 + 1 + (step as u16) * TCP_CNTLID_STEP
}
/// Resources of a VF brought online by `vfs_online`: admin + 4 I/O queues, 5 vectors.
const VF_DEFAULT_VQ: u16 = 5;
const VF_DEFAULT_VI: u16 = 5;

/// Socket of VF `n` of the PF served on `pf`: `DIR/NAME.vfN.sock` for `DIR/NAME.sock`.
pub fn vf_socket(pf: &Path, n: usize) -> PathBuf {
    let stem = pf
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    pf.with_file_name(format!("{stem}.vf{n}.sock"))
}

/// CNTLIDs of a `[[controller]]`'s further controllers: `index + 1 + k * 0x100`.
const TCP_CNTLID_STEP: u16 = 0x100;

/// NVMe/TCP controllers per exported subsystem unless configured: two hosts (or a host
/// reconnecting before its old association timed out) can be connected at once.
const DEFAULT_TCP_CONTROLLERS: usize = 2;

fn has_nvme_backend(spec: &ControllerSpec) -> bool {
    spec.namespaces
        .iter()
        .any(|n| n.backend.starts_with("nvme:"))
}

impl Daemon {
    /// Serve built controller `b` on vfio-user socket `socket` in a thread of its own.
    fn serve(
        &mut self,
        index: usize,
        socket: PathBuf,
        b: Built,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), DaemonError> {
        let device = NvmeDevice::new(b.handle, b.mem, b.doorbells, b.ids);
        let mut server = Server::bind(&socket, device, Arc::clone(stop))
            .map_err(|source| DaemonError::Server { index, source })?;
        let join = std::thread::Builder::new()
            .name(format!("vfio-user-{index}"))
            .spawn(move || server.run().map(|()| server))
            .map_err(|source| DaemonError::Io { index, source })?;
        self.servers.push((socket, join));
        Ok(())
    }

    /// Create every controller and start serving. Sockets are listening when this returns.
    pub fn start(cfg: &Config) -> Result<Self, DaemonError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut daemon = Daemon {
            stop: Arc::clone(&stop),
            servers: Vec::new(),
            stats: Vec::new(),
            transfers: Vec::new(),
            memory: Vec::new(),
            targets: Vec::new(),
            qos: Vec::new(),
            reactors: Vec::new(),
            subsystems: Vec::new(),
            controllers: Vec::new(),
        };
        let mut place =
            Placement::new(cfg).map_err(|source| DaemonError::Io { index: 0, source })?;
        daemon.reactors.clone_from(&place.shared);
        // `nvme:` namespaces on the same device share it (each on its own queue pair)
        let mut devices = DeviceRegistry::default();
        // NVMe/TCP exports grouped by listen address: one target per address
        let mut exports: Vec<(String, Vec<ExportSpec>)> = Vec::new();
        for (index, spec) in cfg.controllers.iter().enumerate() {
            let mem = Arc::new(GuestMemory::new());
            let opened = open_namespaces(index, spec, &mem, &mut devices)?;
            daemon.transfers.push(opened.transfers);
            daemon.memory.push(Arc::clone(&mem));
            let cntlid = index as u16 + 1;
            // controllers of this subsystem: the vfio-user one, and the NVMe/TCP ones (each
            // host association takes one); with more than one, every namespace is shared
            let tcp_count = if spec.tcp_listen.is_some() {
                spec.tcp_controllers.unwrap_or(if has_nvme_backend(spec) {
                    1
                } else {
                    DEFAULT_TCP_CONTROLLERS
                })
            } else {
                0
            };
            let vfs = usize::from(spec.vfs.unwrap_or(0));
            let ids = controller_ids(index, spec, vfs, tcp_count);
            let users = ids.len();
            let nqn = entry_nqn(index, spec);
            let pool = spec.namespace_pool.as_deref().map(|p| {
                // validated with the configuration
                p.parse::<crate::namespace_pool::PoolSpec>()
                    .map(|p| p.open(&nqn))
            });
            let pool = match pool {
                Some(Ok(p)) => Some(p),
                Some(Err(why)) => {
                    return Err(DaemonError::Io {
                        index,
                        source: std::io::Error::other(why),
                    });
                }
                None => None,
            };
            let subsystem = Subsystem::new(&nqn, pool);
            for &c in &ids {
                subsystem.add_controller(c);
            }
            // controller number u (PF 0, VF k, then NVMe/TCP) sees namespace j when its
            // `attach` lists it (default: every controller)
            let seed = spec
                .serial
                .clone()
                .unwrap_or_else(|| format!("VNVME{index:04}"));
            for (j, backend) in opened.backends.into_iter().enumerate() {
                let n = &spec.namespaces[j];
                let attach: Vec<u16> = (0..users)
                    .filter(|&u| n.attach.as_ref().is_none_or(|a| a.contains(&(u as u16))))
                    .map(|u| ids[u])
                    .collect();
                subsystem.add_namespace(
                    j as u32 + 1,
                    backend,
                    n.block_size.trailing_zeros() as u8,
                    &seed,
                    &attach,
                );
            }
            daemon.subsystems.push(Arc::clone(&subsystem));
            let mut stats = None;
            let mut qos = Vec::new();
            // SR-IOV: the PF is the primary controller, each VF a secondary with its socket
            let virt = (vfs > 0).then(|| {
                let first = vf_cntlid(index, 1);
                let mut v = VirtState::new(cntlid, 65, 65, vfs as u16, first, 9, 9);
                if spec.vfs_online {
                    v.all_online(VF_DEFAULT_VQ, VF_DEFAULT_VI);
                }
                Arc::new(Mutex::new(v))
            });
            if let Some(socket) = spec.socket.clone() {
                let b = build_controller(
                    index,
                    spec,
                    Which {
                        reach: Reach::VfioUser,
                        cntlid,
                        virt: virt.as_ref().map(|v| VirtRole::Primary(Arc::clone(v))),
                        shared: users > 1,
                        subsystem: Arc::clone(&subsystem),
                    },
                    Arc::clone(&mem),
                    &mut place,
                )?;
                stats = Some(Arc::clone(&b.stats));
                qos.push(Arc::clone(&b.qos));
                daemon.controllers.push(ControllerInfo {
                    entry: index,
                    cntlid,
                    kind: if virt.is_some() { "pf" } else { "ctrl" },
                    vf: None,
                    endpoint: socket.display().to_string(),
                    stats: Arc::clone(&b.stats),
                    qos: Arc::clone(&b.qos),
                    virt: virt.clone(),
                });
                daemon.serve(index, socket, b, &stop)?;
                if let Some(v) = &virt {
                    for k in 0..vfs {
                        let sock =
                            vf_socket(spec.socket.as_deref().unwrap_or(Path::new("")), k + 1);
                        let scid = vf_cntlid(index, k + 1);
                        let b = build_controller(
                            index,
                            spec,
                            Which {
                                reach: Reach::VfioUser,
                                cntlid: scid,
                                virt: Some(VirtRole::secondary(v, k)),
                                shared: users > 1,
                                subsystem: Arc::clone(&subsystem),
                            },
                            Arc::new(GuestMemory::new()),
                            &mut place,
                        )?;
                        qos.push(Arc::clone(&b.qos));
                        daemon.controllers.push(ControllerInfo {
                            entry: index,
                            cntlid: scid,
                            kind: "vf",
                            vf: Some(k as u16 + 1),
                            endpoint: sock.display().to_string(),
                            stats: Arc::clone(&b.stats),
                            qos: Arc::clone(&b.qos),
                            virt: Some(Arc::clone(v)),
                        });
                        daemon.serve(index, sock, b, &stop)?;
                    }
                }
            }
            if let Some(addr) = &spec.tcp_listen {
                for k in 0..tcp_count {
                    let tcp_cntlid = tcp_cntlid(index, spec, k);
                    // the entry's first controller uses the memory map its namespaces
                    // were opened with
                    let tcp_mem = if tcp_cntlid == cntlid {
                        Arc::clone(&mem)
                    } else {
                        Arc::new(GuestMemory::new())
                    };
                    let b = build_controller(
                        index,
                        spec,
                        Which {
                            reach: Reach::Tcp,
                            cntlid: tcp_cntlid,
                            virt: None,
                            shared: users > 1,
                            subsystem: Arc::clone(&subsystem),
                        },
                        tcp_mem,
                        &mut place,
                    )?;
                    daemon.controllers.push(ControllerInfo {
                        entry: index,
                        cntlid: tcp_cntlid,
                        kind: "tcp",
                        vf: None,
                        endpoint: addr.clone(),
                        stats: Arc::clone(&b.stats),
                        qos: Arc::clone(&b.qos),
                        virt: None,
                    });
                    stats.get_or_insert(b.stats);
                    qos.push(b.qos);
                    let export = ExportSpec {
                        nqn: b.nqn,
                        allowed_hosts: spec.allowed_hosts.clone(),
                        handle: b.handle,
                        mem: b.mem,
                        doorbells: b.doorbells,
                        cntlid: tcp_cntlid,
                        io_queues: b.max_io_queues,
                        max_transfer: 4096 << b.mdts,
                    };
                    match exports.iter_mut().find(|(a, _)| a == addr) {
                        Some((_, v)) => v.push(export),
                        None => exports.push((addr.clone(), vec![export])),
                    }
                }
            }
            daemon.stats.extend(stats);
            daemon.qos.push(qos);
        }
        for (addr, list) in exports {
            let sa: SocketAddr = addr
                .parse()
                .map_err(|_| DaemonError::Address(addr.clone()))?;
            let t = TcpTarget::start(&[sa], list).map_err(|source| DaemonError::Tcp {
                addr: addr.clone(),
                source,
            })?;
            daemon.targets.push(t);
        }
        Ok(daemon)
    }

    /// The sockets being served.
    /// Event counters of controller `index` (configuration order).
    pub fn stats(&self, index: usize) -> Option<Arc<ControllerStats>> {
        self.stats.get(index).cloned()
    }

    /// Transfer counters (zero-copy vs bounced bytes) of namespace `nsid` of controller
    /// `index`, when it is an `nvme:` namespace.
    pub fn transfer_stats(&self, index: usize, nsid: u32) -> Option<Arc<TransferStats>> {
        self.transfers
            .get(index)?
            .iter()
            .find(|(n, _)| *n == nsid)
            .map(|(_, t)| Arc::clone(t))
    }

    /// DMA regions the client of controller `index` has mapped right now.
    pub fn dma_regions(&self, index: usize) -> Option<usize> {
        Some(self.memory.get(index)?.snapshot().regions().len())
    }

    /// Change the QoS limits of entry `index`'s controllers at run time (false: no such
    /// entry).
    pub fn set_qos(&self, index: usize, limits: QosLimits) -> bool {
        let Some(cs) = self.qos.get(index) else {
            return false;
        };
        for c in cs {
            c.set(limits);
        }
        true
    }

    /// The QoS limits of entry `index`.
    pub fn qos(&self, index: usize) -> Option<QosLimits> {
        self.qos.get(index)?.first().map(|c| c.get())
    }

    /// Addresses the NVMe/TCP targets listen on (ports chosen when 0 was configured).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.targets
            .iter()
            .flat_map(|t| t.local_addrs().iter().copied())
            .collect()
    }

    pub fn sockets(&self) -> Vec<PathBuf> {
        self.servers.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Stop serving, drain and flush every namespace, remove the sockets.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DaemonError> {
        self.stop.store(true, Ordering::Relaxed);
        for (index, transfers) in self.transfers.iter().enumerate() {
            for (nsid, t) in transfers {
                log::info!(
                    "controller[{index}] namespace {nsid}: {} bytes zero-copy, {} bytes bounced",
                    t.zero_copy_bytes.load(Ordering::Relaxed),
                    t.bounced_bytes.load(Ordering::Relaxed)
                );
            }
        }
        let mut first_err = None;
        for t in self.targets.drain(..) {
            for export in t.stop() {
                if let Some(mut ctrl) = export.handle.stop()
                    && let Err(s) = ctrl.flush()
                {
                    log::error!("{}: flush failed: {s}", export.nqn);
                }
            }
        }
        for (index, (path, join)) in self.servers.drain(..).enumerate() {
            let r = match join.join() {
                Ok(Ok(server)) => {
                    let device = server.into_device();
                    if let Some(mut ctrl) = device.handle.stop()
                        && let Err(s) = ctrl.flush()
                    {
                        log::error!("controller[{index}]: flush failed: {s}");
                    }
                    Ok(())
                }
                Ok(Err(source)) => Err(DaemonError::Server { index, source }),
                Err(_) => Err(DaemonError::Panicked { index }),
            };
            let _ = std::fs::remove_file(&path);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.servers.is_empty() || !self.targets.is_empty() {
            let _ = self.shutdown();
        }
    }
}
