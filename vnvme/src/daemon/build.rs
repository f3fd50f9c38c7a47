//! Building one controller of an entry from the configuration: its namespaces' backends,
//! its `ControllerConfig`, and its place on a reactor.

use std::sync::Arc;

use device_model::backend::Backend;
use device_model::pci::PciIds;
use device_model::virt_link::VirtRole;
use device_model::{
    Controller, ControllerConfig, ControllerHandle, ControllerStats, Doorbells, FabricsIdentify,
    GuestMemory, Namespace, NvmSubsystem, QosControl, QosLimits,
};
use pcie_p2p::{DeviceRegistry, TransferStats};
use sriov::Subsystem;

use super::DaemonError;
use super::placement::Placement;
use super::topology::entry_serial;
use crate::backend_spec::{BackendSpec, OpenError};
use crate::config::ControllerSpec;

/// A controller running in its reactor, with its memory map, doorbells, PCI IDs, event
/// counters and the transfer counters of its `nvme:` namespaces.
pub(super) struct Built {
    pub(super) handle: ControllerHandle,
    pub(super) mem: Arc<GuestMemory>,
    pub(super) doorbells: Arc<Doorbells>,
    pub(super) ids: PciIds,
    pub(super) stats: Arc<ControllerStats>,
    pub(super) qos: Arc<QosControl>,
    pub(super) nqn: String,
    pub(super) max_io_queues: u16,
    pub(super) mdts: u8,
}

/// Defaults for a controller exported over NVMe/TCP: the target gives each queue slot a
/// buffer of the whole transfer size, so queues and MDTS are kept modest (4 I/O queues,
/// 128 KiB).
const TCP_IO_QUEUES: u16 = 4;
const TCP_MDTS: u8 = 5;

/// The namespaces of one `[[controller]]`, opened once.
pub(super) struct Opened {
    pub(super) backends: Vec<Box<dyn Backend>>,
    pub(super) transfers: Vec<(u32, Arc<TransferStats>)>,
}

/// Open the backends of entry `index`'s namespaces.
pub(super) fn open_namespaces(
    index: usize,
    spec: &ControllerSpec,
    mem: &Arc<GuestMemory>,
    devices: &mut DeviceRegistry,
    arrays: &mut crate::arrays::Arrays,
    lvstores: &crate::lvstores::Lvstores,
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
        if let BackendSpec::Array { name } = &bspec {
            let mut backend = arrays
                .take(name, &format!("controller[{index}].namespace[{j}]"))
                .map_err(|why| DaemonError::Backend {
                    index,
                    ns: j,
                    source: OpenError::Array(name.clone(), why),
                })?;
            // the array is this controller's alone: its `nvme:` members move its data
            // zero-copy
            backend.use_guest_memory(mem);
            out.backends.push(backend);
            continue;
        }
        if let BackendSpec::Lvol { store, volume } = &bspec {
            let backend = lvstores
                .open(store, volume)
                .map_err(|why| DaemonError::Backend {
                    index,
                    ns: j,
                    source: OpenError::Lvol(format!("{store}/{volume}"), why),
                })?;
            out.backends.push(backend);
            continue;
        }
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
pub(super) enum Reach {
    VfioUser,
    Tcp,
}

/// Which controller of a `[[controller]]` entry is being built.
pub(super) struct Which {
    pub(super) reach: Reach,
    pub(super) cntlid: u16,
    pub(super) virt: Option<VirtRole>,
    /// The entry has more than one controller (CMIC bit 1).
    pub(super) shared: bool,
    /// The entry's NVM subsystem.
    pub(super) subsystem: Arc<Subsystem>,
    /// Its vfio-user socket (a worker under a supervisor takes the BAR0 and state memfds
    /// handed over for it).
    pub(super) socket: Option<std::path::PathBuf>,
}

/// Lower the controller's MDTS to what every namespace's backend takes in one request (a
/// remote target's or a device's own limit), so a host never sends a transfer a backend
/// would refuse. (A namespace attached later with a lower limit keeps the controller's MDTS:
/// the controller sends its larger reads and writes in pieces.)
fn cap_mdts(cfg: &mut ControllerConfig, namespaces: &[Namespace]) {
    let Some(cap) = namespaces
        .iter()
        .filter_map(|n| n.backend.max_transfer())
        .min()
    else {
        return;
    };
    // MDTS is a power of two of 4 KiB units; 0 would mean no limit, so 1 (8 KiB) at least
    let fits = (1..=cfg.mdts)
        .rev()
        .find(|&m| 4096u64 << m <= cap)
        .unwrap_or(1);
    if fits < cfg.mdts {
        log::info!(
            "{}: MDTS {} KiB -> {} KiB (a namespace's backend takes at most {} KiB per request)",
            cfg.serial,
            4u64 << cfg.mdts,
            4u64 << fits,
            cap >> 10
        );
        cfg.mdts = fits;
    }
}

/// Build the controller `which` of entry `index` and start it on a reactor of `place`.
pub(super) fn build_controller(
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
        socket,
    } = which;
    let handed = socket
        .as_deref()
        .and_then(crate::supervisor::handover::take_memory);
    let mut cfg = ControllerConfig::default();
    cfg.serial = entry_serial(index, spec);
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
    // validated with the configuration
    let coalescing = spec
        .irq_coalescing
        .as_deref()
        .unwrap_or(crate::config::DEFAULT_IRQ_COALESCING);
    cfg.irq_coalescing = crate::config::parse_coalescing(coalescing).unwrap_or_default();
    cfg.cntlid = cntlid;
    cfg.virt = virt;
    cfg.shared_namespaces = shared;
    // the PF (or the one vfio-user controller) manages the subsystem's namespaces
    cfg.namespace_management =
        reach == Reach::VfioUser && cfg.virt.as_ref().is_none_or(VirtRole::is_primary);
    cfg.namespace_management &= subsystem.manages_namespaces();
    cfg.subsystem = Some(Arc::clone(&subsystem) as Arc<dyn NvmSubsystem>);
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
    cap_mdts(&mut cfg, &namespaces);
    // the keeper of a subsystem whose namespaces change at run time keeps them in its
    // journal (a second mapping of the same memfd), for the next worker to settle
    if let Some(h) = handed
        .as_ref()
        .filter(|_| cfg.namespace_management && crate::supervisor::handover::settles())
    {
        let kept = h
            .state
            .try_clone()
            .map_err(|source| DaemonError::Io { index, source })
            .and_then(|fd| {
                device_model::journal::Journal::open(fd).map_err(|e| DaemonError::Io {
                    index,
                    source: std::io::Error::other(e),
                })
            })?;
        subsystem.keep_in(kept);
    }
    let (doorbells, journal) = match handed {
        Some(h) => (
            Doorbells::from_fd(h.doorbells).map_err(|source| DaemonError::Io { index, source })?,
            Some(
                device_model::journal::Journal::open(h.state).map_err(|e| DaemonError::Io {
                    index,
                    source: std::io::Error::other(e),
                })?,
            ),
        ),
        None => (
            Doorbells::new().map_err(|source| DaemonError::Io { index, source })?,
            None,
        ),
    };
    let doorbells = Arc::new(doorbells);
    let ids = cfg.ids;
    let (nqn, max_io_queues, mdts) = (cfg.subnqn.clone(), cfg.max_io_queues, cfg.mdts);
    let name = format!("reactor-{index}{}", if tcp { "-tcp" } else { "" });
    let mut ctrl = Controller::new(cfg, Arc::clone(&mem), Arc::clone(&doorbells), namespaces);
    if let Some(j) = journal {
        ctrl.attach_journal(j);
        // a PF's VFs online as the host left them, before any VF is built
        ctrl.restore_sriov();
    }
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
