//! The target's RDMA ports: RDMA CM listeners on one event channel, a protection domain per
//! device, and each exported controller's command buffers registered once per device (so
//! host data moves by RDMA straight between the host's buffers and the buffers the
//! controller works on).

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::cm_records::{ConnectRequest, reject_record};
use super::link::RdmaLink;
use super::verbs::{self, CmEvent, CmEventKind, CmId, Device, EventChannel, ProtectionDomain};
use super::verbs::{Region, VerbsError};

/// What a CM event asks of the target.
#[derive(Debug)]
pub enum PortEvent {
    /// A new connection, accepted, arriving on listener `port`.
    Connected { link: Box<RdmaLink>, port: usize },
    /// The connection with this id ended (disconnect, error, device removal).
    Ended(verbs::RawCmId),
}

/// The RDMA listeners of a target.
pub struct RdmaPort {
    // connections hold their own ids; these drop before the channel (field order)
    listeners: Vec<(CmId, SocketAddr)>,
    pds: Vec<Arc<ProtectionDomain>>,
    /// Registered command buffers: (device, export index, region).
    regions: Vec<(Device, usize, Arc<Region>)>,
    channel: EventChannel,
}

impl std::fmt::Debug for RdmaPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<_> = self.listeners.iter().map(|l| l.1).collect();
        f.debug_struct("RdmaPort")
            .field("listening", &addrs)
            .finish_non_exhaustive()
    }
}

impl RdmaPort {
    /// Listen on `addrs` (an address of an RDMA device's interface; RoCE: its IP address).
    pub fn listen(addrs: &[SocketAddr]) -> Result<Self, VerbsError> {
        verbs::probe()?;
        let channel = EventChannel::new()?;
        let mut listeners = Vec::new();
        for &a in addrs {
            let id = CmId::new(&channel)?;
            id.bind(a)?;
            id.listen(128)?;
            listeners.push((id, a));
        }
        Ok(Self {
            listeners,
            pds: Vec::new(),
            regions: Vec::new(),
            channel,
        })
    }

    /// The addresses listened on.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.1).collect()
    }

    /// The event channel's descriptor (readable when a CM event waits).
    pub fn fd(&self) -> i32 {
        self.channel.fd()
    }

    fn pd(&mut self, device: Device) -> Result<Arc<ProtectionDomain>, VerbsError> {
        if let Some(pd) = self.pds.iter().find(|p| p.device() == device) {
            return Ok(Arc::clone(pd));
        }
        let pd = Arc::new(ProtectionDomain::new(device)?);
        self.pds.push(Arc::clone(&pd));
        Ok(pd)
    }

    /// Export `export`'s command buffers (`len` bytes of `fd`), registered on `device`.
    pub fn slot_region(
        &mut self,
        device: Device,
        export: usize,
        fd: BorrowedFd<'_>,
        len: usize,
    ) -> Result<Arc<Region>, VerbsError> {
        if let Some(r) = self.regions.iter().find(|r| r.0 == device && r.1 == export) {
            return Ok(Arc::clone(&r.2));
        }
        let pd = self.pd(device)?;
        let r = Arc::new(Region::of_fd(&pd, fd, len)?);
        self.regions.push((device, export, Arc::clone(&r)));
        Ok(r)
    }

    /// The next CM event, handled as far as the port can: connect requests are checked
    /// against `max_size` entries and `max_qid`, set up and accepted (`capsule`: the largest
    /// command capsule), or rejected.
    pub fn next_event(
        &mut self,
        max_size: u16,
        max_qid: u16,
        capsule: usize,
    ) -> Result<Option<Option<PortEvent>>, VerbsError> {
        let Some(ev) = self.channel.next()? else {
            return Ok(None);
        };
        Ok(Some(self.handle(ev, max_size, max_qid, capsule)))
    }

    fn handle(
        &mut self,
        mut ev: CmEvent,
        max_size: u16,
        max_qid: u16,
        capsule: usize,
    ) -> Option<PortEvent> {
        match ev.kind {
            CmEventKind::ConnectRequest => {
                let port = self
                    .listeners
                    .iter()
                    .position(|l| l.0.raw() == ev.listen_id)
                    .unwrap_or(0);
                let id = ev.request.take()?;
                let peer = format!(
                    "rdma:{}",
                    self.listeners
                        .get(port)
                        .map_or_else(String::new, |l| l.1.to_string())
                );
                let request = match ConnectRequest::parse(&ev.private_data, max_size, max_qid) {
                    Ok(r) => r,
                    Err(status) => {
                        device_model::warn_limited!(
                            "nvme-rdma target: connect request refused: {status:?}"
                        );
                        let _ = id.reject(&reject_record(status));
                        return None;
                    }
                };
                let accepted = id
                    .device()
                    .ok_or(VerbsError::NoDevice)
                    .and_then(|d| self.pd(d))
                    .and_then(|pd| {
                        RdmaLink::accept(
                            id,
                            &pd,
                            request,
                            capsule,
                            ev.responder_resources,
                            ev.initiator_depth,
                            peer,
                        )
                    });
                match accepted {
                    Ok(link) => Some(PortEvent::Connected {
                        link: Box::new(link),
                        port,
                    }),
                    Err(e) => {
                        // the id went with the failed set-up (dropped: destroyed), which
                        // the host sees as a rejected connection
                        device_model::warn_limited!(
                            "nvme-rdma target: accepting a connection failed: {e}"
                        );
                        None
                    }
                }
            }
            CmEventKind::Disconnected
            | CmEventKind::DeviceRemoval
            | CmEventKind::ConnectError
            | CmEventKind::Unreachable
            | CmEventKind::Rejected => Some(PortEvent::Ended(ev.id)),
            _ => None,
        }
    }
}
