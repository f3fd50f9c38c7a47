//! One `[[controller]]` entry of the configuration while it runs: its NVM subsystem, its
//! controllers (vfio-user PF or controller, VFs, NVMe/TCP controllers), their servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use device_model::GuestMemory;
use device_model::pci::SriovShape;
use nvmeof::export::ExportSpec;
use pcie_p2p::{DeviceRegistry, TransferStats};
use qemu_vfio_user::server::{NvmeDevice, Server, ServerError};
use sriov::{Subsystem, VirtGroup};

use super::build::{Built, Reach, Which, build_controller, open_namespaces};
use super::placement::Placement;
use super::topology::{controller_ids, entry_nqn, entry_serial, tcp_cntlid, tcp_controllers};
use super::{ControllerInfo, DaemonError, Export, Exports};
use crate::config::ControllerSpec;
use sriov::topology::{primary_cntlid, vf_cntlid, vf_socket};

/// A vfio-user server's thread; it hands the server back when it ends.
type ServerThread = JoinHandle<Result<Server, ServerError>>;

/// A running entry.
pub(super) struct Entry {
    pub(super) spec: ControllerSpec,
    /// Set to end its vfio-user servers.
    stop: Arc<AtomicBool>,
    /// The DMA map its namespaces were opened with (its first controller's).
    pub(super) memory: Arc<GuestMemory>,
    pub(super) subsystem: Arc<Subsystem>,
    /// Transfer counters of its `nvme:` namespaces, by NSID.
    pub(super) transfers: Vec<(u32, Arc<TransferStats>)>,
    /// Its controllers in build order.
    pub(super) controllers: Vec<ControllerInfo>,
    /// Its vfio-user servers: socket, thread.
    pub(super) servers: Vec<(PathBuf, ServerThread)>,
}

impl Entry {
    /// Build and serve the controllers of entry `index` (its NVMe/TCP exports are added to
    /// `exports`, started by the caller). On error, what did start is stopped again.
    pub(super) fn start(
        index: usize,
        spec: &ControllerSpec,
        place: &mut Placement,
        devices: &mut DeviceRegistry,
        (arrays, lvstores): (&mut crate::arrays::Arrays, &crate::lvstores::Lvstores),
        exports: &mut Exports,
    ) -> Result<Self, DaemonError> {
        let memory = Arc::new(GuestMemory::new());
        let opened = open_namespaces(index, spec, &memory, devices, arrays, lvstores)?;
        let tcp_count = tcp_controllers(spec);
        let vfs = usize::from(spec.vfs.unwrap_or(0));
        let ids = controller_ids(index, spec, vfs, tcp_count);
        let nqn = entry_nqn(index, spec);
        let pool = match spec.namespace_pool.as_deref() {
            // validated with the configuration
            Some(p) => Some(
                p.parse::<crate::pool_spec::PoolSpec>()
                    .map_err(str::to_owned)
                    .and_then(|p| p.open(&nqn, lvstores))
                    .map_err(|why| DaemonError::Io {
                        index,
                        source: std::io::Error::other(why),
                    })?,
            ),
            None => None,
        };
        let subsystem = Subsystem::new(&nqn, pool);
        for &c in &ids {
            subsystem.add_controller(c);
        }
        // controller number u (PF 0, VF k, then NVMe/TCP) sees namespace j when its
        // `attach` lists it (default: every controller)
        let seed = entry_serial(index, spec);
        for (j, backend) in opened.backends.into_iter().enumerate() {
            let n = &spec.namespaces[j];
            let attach: Vec<u16> = (0..ids.len())
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
        let mut entry = Self {
            spec: spec.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            memory,
            subsystem,
            transfers: opened.transfers,
            controllers: Vec::new(),
            servers: Vec::new(),
        };
        let shared = ids.len() > 1;
        let started = entry
            .start_vfio_user(index, vfs, shared, place)
            .and_then(|()| entry.start_tcp(index, tcp_count, shared, place, exports));
        match started {
            Ok(()) => Ok(entry),
            Err(e) => {
                entry.stop();
                let _ = entry.join_servers(index);
                Err(e)
            }
        }
    }

    /// The vfio-user controller, and with VFs the PF and each VF on its own socket.
    fn start_vfio_user(
        &mut self,
        index: usize,
        vfs: usize,
        shared: bool,
        place: &mut Placement,
    ) -> Result<(), DaemonError> {
        let Some(socket) = self.spec.socket.clone() else {
            return Ok(());
        };
        let cntlid = primary_cntlid(index);
        // SR-IOV: the PF is the primary controller, each VF a secondary with its socket
        let virt = (vfs > 0).then(|| {
            let v = VirtGroup::new(cntlid, vfs as u16, vf_cntlid(index, 1));
            if self.spec.vfs_online {
                v.all_online();
            }
            v
        });
        let which = Which {
            reach: Reach::VfioUser,
            cntlid,
            virt: virt.as_ref().map(VirtGroup::primary_role),
            shared,
            subsystem: Arc::clone(&self.subsystem),
            socket: Some(socket.clone()),
        };
        let b = build_controller(index, &self.spec, which, Arc::clone(&self.memory), place)?;
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
        self.serve(index, socket.clone(), b, virt.as_ref())?;
        let Some(v) = &virt else {
            return Ok(());
        };
        for k in 0..vfs {
            let sock = vf_socket(&socket, k + 1);
            let scid = vf_cntlid(index, k + 1);
            let which = Which {
                reach: Reach::VfioUser,
                cntlid: scid,
                virt: Some(v.secondary_role(k)),
                shared,
                subsystem: Arc::clone(&self.subsystem),
                socket: Some(sock.clone()),
            };
            let b = build_controller(
                index,
                &self.spec,
                which,
                Arc::new(GuestMemory::new()),
                place,
            )?;
            self.controllers.push(ControllerInfo {
                entry: index,
                cntlid: scid,
                kind: "vf",
                vf: Some(k as u16 + 1),
                endpoint: sock.display().to_string(),
                stats: Arc::clone(&b.stats),
                qos: Arc::clone(&b.qos),
                virt: Some(v.clone()),
            });
            self.serve(index, sock, b, None)?;
        }
        Ok(())
    }

    /// The NVMe/TCP controllers, added to the export list of their listen address.
    fn start_tcp(
        &mut self,
        index: usize,
        tcp_count: usize,
        shared: bool,
        place: &mut Placement,
        exports: &mut Exports,
    ) -> Result<(), DaemonError> {
        let tcp = self.spec.tcp_listen.clone();
        let rdma = self.spec.rdma_listen.clone();
        let (kind, addr) = match (&tcp, &rdma) {
            (Some(t), _) => ("tcp", t.clone()),
            (None, Some(r)) => ("rdma", r.clone()),
            (None, None) => return Ok(()),
        };
        for k in 0..tcp_count {
            let cntlid = tcp_cntlid(index, &self.spec, k);
            // the entry's first controller uses the memory map its namespaces were opened with
            let mem = if cntlid == primary_cntlid(index) {
                Arc::clone(&self.memory)
            } else {
                Arc::new(GuestMemory::new())
            };
            let which = Which {
                reach: Reach::Tcp,
                cntlid,
                virt: None,
                shared,
                subsystem: Arc::clone(&self.subsystem),
                socket: None,
            };
            let b = build_controller(index, &self.spec, which, mem, place)?;
            self.controllers.push(ControllerInfo {
                entry: index,
                cntlid,
                kind,
                vf: None,
                endpoint: addr.clone(),
                stats: Arc::clone(&b.stats),
                qos: Arc::clone(&b.qos),
                virt: None,
            });
            let export = ExportSpec {
                nqn: b.nqn,
                allowed_hosts: self.spec.allowed_hosts.clone(),
                handle: b.handle,
                mem: b.mem,
                doorbells: b.doorbells,
                cntlid,
                io_queues: b.max_io_queues,
                max_transfer: 4096 << b.mdts,
            };
            // one target per NVMe/TCP address; an RDMA-only export per RDMA address
            let same = |x: &Export| match &tcp {
                Some(_) => x.tcp == tcp,
                None => x.tcp.is_none() && x.rdma.first() == rdma.as_ref(),
            };
            match exports.iter_mut().find(|x| same(x)) {
                Some(x) => {
                    x.list.push(export);
                    if !x.entries.contains(&index) {
                        x.entries.push(index);
                    }
                    if let Some(r) = rdma.clone()
                        && !x.rdma.contains(&r)
                    {
                        x.rdma.push(r);
                    }
                }
                None => exports.push(Export {
                    tcp: tcp.clone(),
                    rdma: rdma.clone().into_iter().collect(),
                    list: vec![export],
                    entries: vec![index],
                }),
            }
        }
        Ok(())
    }

    /// Serve built controller `b` on vfio-user socket `socket` in a thread of its own.
    fn serve(
        &mut self,
        index: usize,
        socket: PathBuf,
        b: Built,
        sriov: Option<&VirtGroup>,
    ) -> Result<(), DaemonError> {
        let mut device = NvmeDevice::new(b.handle, b.mem, b.doorbells, b.ids);
        if let Some(v) = sriov {
            // the SR-IOV capability: VF Enable + NumVFs = N brings VFs 1..=N online
            let group = v.clone();
            device = device.with_sriov(
                SriovShape {
                    total_vfs: v.total_vfs(),
                    vf_device: b.ids.device,
                },
                Box::new(move |n| {
                    if let Err(e) = group.vf_enable_written(n) {
                        log::warn!("SR-IOV: enabling {n} VFs stopped: {e:?}");
                    }
                }),
            );
        }
        let mut server = match crate::supervisor::handover::take_link(&socket) {
            // a worker under a supervisor: serve the connection it relays
            Some(link) => {
                crate::supervisor::handover::track(device.handle.poster());
                let hook = crate::supervisor::handover::restore_hook(device.handle.poster());
                Server::attached(&socket, link, device, Arc::clone(&self.stop), hook)
            }
            None => Server::bind(&socket, device, Arc::clone(&self.stop))
                .map_err(|source| DaemonError::Server { index, source })?,
        };
        let join = std::thread::Builder::new()
            .name(format!("vfio-user-{index}"))
            .spawn(move || server.run().map(|()| server))
            .map_err(|source| DaemonError::Io { index, source })?;
        self.servers.push((socket, join));
        Ok(())
    }

    /// Tell its vfio-user servers to end.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Wait for its vfio-user servers (after [`stop`](Self::stop)) and flush their
    /// controllers; each server removes its socket if that is still its own.
    pub(super) fn join_servers(&mut self, index: usize) -> Result<(), DaemonError> {
        let mut first_err = None;
        for (_socket, join) in self.servers.drain(..) {
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
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The sockets it serves.
    pub(super) fn sockets(&self) -> impl Iterator<Item = &Path> {
        self.servers.iter().map(|(p, _)| p.as_path())
    }
}
