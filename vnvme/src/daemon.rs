//! The running daemon: for each configured controller, its namespaces' backends, a reactor
//! thread owning the controller, and a vfio-user server thread on its socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use device_model::backend::Backend;
use device_model::pci::{PciIds, SriovShape};
use device_model::virt::{VirtRole, VirtState};
use device_model::{
    Controller, ControllerConfig, ControllerHandle, ControllerStats, Doorbells, FabricsIdentify,
    GuestMemory, Namespace, PollMode, QosControl, QosLimits, Reactor, Subsystem,
};
use nvmeof::export::{ExportSpec, TcpTarget};
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
        source: nvmeof::export::ExportError,
    },
}

/// A running daemon.
pub struct Daemon {
    /// Each entry's stop flag (its vfio-user servers end when it is set).
    stops: Vec<Arc<AtomicBool>>,
    /// The configuration of each entry; `None` once removed at run time.
    specs: Vec<Option<ControllerSpec>>,
    /// vfio-user servers: entry, socket, thread.
    servers: Vec<(usize, PathBuf, ServerThread)>,
    stats: Vec<Arc<ControllerStats>>,
    transfers: Vec<Vec<(u32, Arc<TransferStats>)>>,
    memory: Vec<Arc<GuestMemory>>,
    /// NVMe/TCP targets and the entries they export.
    targets: Vec<(Vec<usize>, TcpTarget)>,
    /// QoS handles of each entry's controllers.
    qos: Vec<Vec<Arc<QosControl>>>,
    /// Each entry's NVM subsystem.
    subsystems: Vec<Option<Arc<Subsystem>>>,
    /// Every controller, in build order.
    controllers: Vec<ControllerInfo>,
    /// Where new controllers run (it holds the shared reactor threads, which end after the
    /// controllers).
    place: Placement,
    /// `nvme:` devices shared by namespaces.
    devices: DeviceRegistry,
}

/// A vfio-user server's thread; it hands the server back when it ends.
type ServerThread = JoinHandle<Result<Server, ServerError>>;

/// NVMe/TCP exports grouped by listen address (one target per address), with the entries
/// they come from.
type Exports = Vec<(String, Vec<ExportSpec>, Vec<usize>)>;

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
            (Some(v), Some(n)) => device_model::virt::lock(v)
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
            ioccsz: ((64 + nvmeof::export::INLINE_DATA) / 16) as u32,
            iorcsz: 1,
            maxcmd: nvmeof::export::QUEUE_DEPTH as u16,
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
        sriov: Option<&Arc<Mutex<VirtState>>>,
    ) -> Result<(), DaemonError> {
        let mut device = NvmeDevice::new(b.handle, b.mem, b.doorbells, b.ids);
        if let Some(v) = sriov {
            // the SR-IOV capability: VF Enable + NumVFs = N brings VFs 1..=N online
            let total = device_model::virt::lock(v).secondaries.len() as u16;
            let state = Arc::clone(v);
            device = device.with_sriov(
                SriovShape {
                    total_vfs: total,
                    vf_device: b.ids.device,
                },
                Box::new(move |n| {
                    let r = device_model::virt::lock(&state).set_enabled(
                        usize::from(n),
                        VF_DEFAULT_VQ,
                        VF_DEFAULT_VI,
                    );
                    if let Err(e) = r {
                        log::warn!("SR-IOV: enabling {n} VFs stopped: {e:?}");
                    }
                }),
            );
        }
        let mut server = Server::bind(&socket, device, Arc::clone(&self.stops[index]))
            .map_err(|source| DaemonError::Server { index, source })?;
        let join = std::thread::Builder::new()
            .name(format!("vfio-user-{index}"))
            .spawn(move || server.run().map(|()| server))
            .map_err(|source| DaemonError::Io { index, source })?;
        self.servers.push((index, socket, join));
        Ok(())
    }

    /// Create every controller and start serving. Sockets are listening when this returns.
    pub fn start(cfg: &Config) -> Result<Self, DaemonError> {
        crate::limits::apply();
        let place = Placement::new(cfg).map_err(|source| DaemonError::Io { index: 0, source })?;
        let mut daemon = Daemon {
            stops: Vec::new(),
            specs: Vec::new(),
            servers: Vec::new(),
            stats: Vec::new(),
            transfers: Vec::new(),
            memory: Vec::new(),
            targets: Vec::new(),
            qos: Vec::new(),
            subsystems: Vec::new(),
            controllers: Vec::new(),
            place,
            devices: DeviceRegistry::default(),
        };
        let mut exports = Exports::new();
        for (index, spec) in cfg.controllers.iter().enumerate() {
            daemon.start_entry(index, spec, &mut exports)?;
        }
        daemon.start_targets(exports)?;
        Ok(daemon)
    }

    /// Start NVMe/TCP targets for `exports`.
    fn start_targets(&mut self, exports: Exports) -> Result<(), DaemonError> {
        for (addr, list, entries) in exports {
            let sa: SocketAddr = addr
                .parse()
                .map_err(|_| DaemonError::Address(addr.clone()))?;
            let t = TcpTarget::start(&[sa], list).map_err(|source| DaemonError::Tcp {
                addr: addr.clone(),
                source,
            })?;
            self.targets.push((entries, t));
        }
        Ok(())
    }

    /// Build and serve the controllers of entry `index` (its NVMe/TCP exports are added to
    /// `exports`, started by the caller).
    fn start_entry(
        &mut self,
        index: usize,
        spec: &ControllerSpec,
        exports: &mut Exports,
    ) -> Result<(), DaemonError> {
        self.stops.push(Arc::new(AtomicBool::new(false)));
        self.specs.push(Some(spec.clone()));
        let mem = Arc::new(GuestMemory::new());
        let opened = open_namespaces(index, spec, &mem, &mut self.devices)?;
        self.transfers.push(opened.transfers);
        self.memory.push(Arc::clone(&mem));
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
        self.subsystems.push(Some(Arc::clone(&subsystem)));
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
                &mut self.place,
            )?;
            stats = Some(Arc::clone(&b.stats));
            qos.push(Arc::clone(&b.qos));
            self.controllers.push(ControllerInfo {
                entry: index,
                cntlid,
                kind: if virt.is_some() { "pf" } else { "ctrl" },
                vf: None,
                endpoint: socket.display().to_string(),
                stats: Arc::clone(&b.stats),
                qos: Arc::clone(&b.qos),
                virt: virt.clone(),
            });
            self.serve(index, socket, b, virt.as_ref())?;
            if let Some(v) = &virt {
                for k in 0..vfs {
                    let sock = vf_socket(spec.socket.as_deref().unwrap_or(Path::new("")), k + 1);
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
                        &mut self.place,
                    )?;
                    qos.push(Arc::clone(&b.qos));
                    self.controllers.push(ControllerInfo {
                        entry: index,
                        cntlid: scid,
                        kind: "vf",
                        vf: Some(k as u16 + 1),
                        endpoint: sock.display().to_string(),
                        stats: Arc::clone(&b.stats),
                        qos: Arc::clone(&b.qos),
                        virt: Some(Arc::clone(v)),
                    });
                    self.serve(index, sock, b, None)?;
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
                    &mut self.place,
                )?;
                self.controllers.push(ControllerInfo {
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
                match exports.iter_mut().find(|(a, _, _)| a == addr) {
                    Some((_, v, entries)) => {
                        v.push(export);
                        if !entries.contains(&index) {
                            entries.push(index);
                        }
                    }
                    None => exports.push((addr.clone(), vec![export], vec![index])),
                }
            }
        }
        self.stats.extend(stats);
        self.qos.push(qos);
        Ok(())
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
            .flat_map(|(_, t)| t.local_addrs().iter().copied())
            .collect()
    }

    /// The sockets being served.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.servers.iter().map(|(_, p, _)| p.clone()).collect()
    }

    /// Every controller with what the management plane shows of it.
    pub fn controllers(&self) -> &[ControllerInfo] {
        &self.controllers
    }

    /// The running subsystems with their entry index.
    pub fn subsystems(&self) -> Vec<(usize, Arc<Subsystem>)> {
        self.subsystems
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, Arc::clone(s.as_ref()?))))
            .collect()
    }

    /// The running subsystem named `nqn`.
    pub fn subsystem(&self, nqn: &str) -> Result<Arc<Subsystem>, MgmtError> {
        self.subsystems()
            .into_iter()
            .find(|(_, s)| s.nqn() == nqn)
            .map(|(_, s)| s)
            .ok_or_else(|| MgmtError::NoSubsystem(nqn.into()))
    }

    /// Create a namespace of `size` bytes in subsystem `nqn` (not attached).
    pub fn ns_create(
        &self,
        nqn: &str,
        size: u64,
        block_size: u32,
        shared: bool,
    ) -> Result<u32, MgmtError> {
        if block_size != 512 && block_size != 4096 {
            return Err(MgmtError::Invalid("block_size: 512 or 4096".into()));
        }
        let sub = self.subsystem(nqn)?;
        Ok(sub.create(size, block_size.trailing_zeros() as u8, shared)?)
    }

    /// Delete namespace `nsid` of subsystem `nqn`, detaching it everywhere first.
    pub fn ns_delete(&self, nqn: &str, nsid: u32) -> Result<(), MgmtError> {
        self.subsystem(nqn)?.delete(nsid, None, true)?;
        Ok(())
    }

    /// Attach (`attach`) or detach namespace `nsid` of `nqn` for controllers `ctrls`;
    /// returns when every controller has applied it.
    pub fn ns_attach(
        &self,
        nqn: &str,
        nsid: u32,
        ctrls: &[u16],
        attach: bool,
    ) -> Result<(), MgmtError> {
        let sub = self.subsystem(nqn)?;
        if attach {
            sub.attach(nsid, ctrls, None, true)?;
        } else {
            sub.detach(nsid, ctrls, None, true)?;
        }
        Ok(())
    }

    /// Set the QoS limits of controller `cntlid`.
    pub fn set_controller_qos(&self, cntlid: u16, limits: QosLimits) -> Result<(), MgmtError> {
        let c = self
            .controllers
            .iter()
            .find(|c| c.cntlid == cntlid)
            .ok_or(MgmtError::NoController(cntlid))?;
        c.qos.set(limits);
        Ok(())
    }

    /// SR-IOV: the first `n` VFs of subsystem `nqn` online (with default resources when they
    /// had none), the others offline; like writing NumVFs.
    pub fn enable_vfs(&self, nqn: &str, n: u16) -> Result<(), MgmtError> {
        let sub = self.subsystem(nqn)?;
        let virt = self
            .controllers
            .iter()
            .find(|c| {
                c.kind == "pf"
                    && c.virt.is_some()
                    && self
                        .subsystems
                        .get(c.entry)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.nqn() == sub.nqn())
            })
            .and_then(|c| c.virt.clone())
            .ok_or_else(|| MgmtError::Invalid(format!("{nqn} has no VFs")))?;
        let mut v = device_model::virt::lock(&virt);
        if usize::from(n) > v.secondaries.len() {
            return Err(MgmtError::Invalid(format!(
                "{nqn} has {} VFs",
                v.secondaries.len()
            )));
        }
        v.set_enabled(usize::from(n), VF_DEFAULT_VQ, VF_DEFAULT_VI)
            .map_err(|e| MgmtError::Invalid(format!("{e:?}")))?;
        Ok(())
    }

    /// Start a new subsystem (a `[[controller]]` entry) at run time; returns its NQN.
    pub fn add_entry(&mut self, spec: &ControllerSpec) -> Result<String, MgmtError> {
        let mut all: Vec<ControllerSpec> = self.specs.iter().flatten().cloned().collect();
        all.push(spec.clone());
        let cfg = Config {
            poll: PollSetting::Adaptive,
            reactors: 0,
            controllers: all,
        };
        cfg.validate()
            .map_err(|e| MgmtError::Invalid(e.to_string()))?;
        let index = self.specs.len();
        if index >= crate::config::MAX_ENTRIES {
            // entry numbers are not reused (CNTLIDs derive from them)
            return Err(MgmtError::Invalid(format!(
                "this daemon has made {index} subsystems, the most it numbers; restart it \
                 to make more"
            )));
        }
        let nqn = entry_nqn(index, spec);
        if self.subsystem(&nqn).is_ok() {
            return Err(MgmtError::Invalid(format!("{nqn} exists")));
        }
        let mut exports = Exports::new();
        let started = self
            .start_entry(index, spec, &mut exports)
            .and_then(|()| self.start_targets(exports));
        if let Err(e) = started {
            // undo what did start, and every per-entry slot it took: the index is free again
            let _ = self.stop_entries(&|i| i == index);
            self.stops.truncate(index);
            self.specs.truncate(index);
            self.transfers.truncate(index);
            self.memory.truncate(index);
            self.subsystems.truncate(index);
            self.qos.truncate(index);
            self.stats.truncate(index);
            self.controllers.retain(|c| c.entry != index);
            return Err(MgmtError::Daemon(e));
        }
        Ok(nqn)
    }

    /// Stop subsystem `nqn` at run time: its controllers are reset, namespaces flushed,
    /// sockets removed.
    pub fn remove_entry(&mut self, nqn: &str) -> Result<(), MgmtError> {
        let index = self
            .subsystems()
            .into_iter()
            .find(|(_, s)| s.nqn() == nqn)
            .map(|(i, _)| i)
            .ok_or_else(|| MgmtError::NoSubsystem(nqn.into()))?;
        if self
            .targets
            .iter()
            .any(|(entries, _)| entries.contains(&index) && entries.len() > 1)
        {
            return Err(MgmtError::Invalid(format!(
                "{nqn} shares its NVMe/TCP listener with other subsystems"
            )));
        }
        let r = self.stop_entries(&|i| i == index);
        // let go of its namespaces (backends, pool memory), DMA map and counters
        self.specs[index] = None;
        self.subsystems[index] = None;
        self.controllers.retain(|c| c.entry != index);
        if let Some(t) = self.transfers.get_mut(index) {
            t.clear();
        }
        if let Some(q) = self.qos.get_mut(index) {
            q.clear();
        }
        if let Some(m) = self.memory.get_mut(index) {
            *m = Arc::new(GuestMemory::new());
        }
        r.map_err(MgmtError::Daemon)
    }

    /// Stop serving, drain and flush every namespace, remove the sockets.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DaemonError> {
        for (index, transfers) in self.transfers.iter().enumerate() {
            for (nsid, t) in transfers {
                log::info!(
                    "controller[{index}] namespace {nsid}: {} bytes zero-copy, {} bytes bounced",
                    t.zero_copy_bytes.load(Ordering::Relaxed),
                    t.bounced_bytes.load(Ordering::Relaxed)
                );
            }
        }
        self.stop_entries(&|_| true)
    }

    /// Stop the servers and targets of the entries `which` selects; flush their controllers.
    fn stop_entries(&mut self, which: &dyn Fn(usize) -> bool) -> Result<(), DaemonError> {
        for (i, stop) in self.stops.iter().enumerate() {
            if which(i) {
                stop.store(true, Ordering::Relaxed);
            }
        }
        let mut first_err = None;
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.targets)
            .into_iter()
            .partition(|(entries, _)| entries.iter().any(|&e| which(e)));
        self.targets = others;
        for (_, t) in mine {
            for export in t.stop() {
                if let Some(mut ctrl) = export.handle.stop()
                    && let Err(s) = ctrl.flush()
                {
                    log::error!("{}: flush failed: {s}", export.nqn);
                }
            }
        }
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.servers)
            .into_iter()
            .partition(|(e, _, _)| which(*e));
        self.servers = others;
        for (index, _path, join) in mine {
            let r = match join.join() {
                Ok(Ok(server)) => {
                    // removes its socket if that is still its own
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
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Why a management request was refused.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error("no subsystem {0}")]
    NoSubsystem(String),
    #[error("no controller with CNTLID {0:#x}")]
    NoController(u16),
    #[error("{0}")]
    Namespace(#[from] device_model::NsError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Daemon(DaemonError),
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.servers.is_empty() || !self.targets.is_empty() {
            let _ = self.shutdown();
        }
    }
}
