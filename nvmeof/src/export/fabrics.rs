//! Fabrics commands (base 2.0 §6): Connect for the admin queue (a new association with an
//! exported controller, or a discovery controller) and for I/O queues (created on the
//! controller with Create I/O CQ/SQ before Connect completes), Property Get and Set.

use std::net::SocketAddr;
use std::time::Instant;

use nvme_spec::fabrics::{
    ConnectData, DISCOVERY_NQN, NQN_MAX, PROPERTY_SIZE_8, connect_status, discovery, fctype,
    get_str,
};
use nvme_spec::opcode::admin as op;
use nvme_spec::registers::{self as reg, cc, csts};
use nvme_spec::status::sct;
use nvme_spec::{Status, Submission};
use zerocopy::FromBytes;

use super::capsule::data_desc;
use super::connection::Role;
use super::discovery::{DISCOVERY_CNTLID, Listed};
use super::event_loop::Target;
use super::{Association, Owner, QUEUE_DEPTH, QueueState};

/// Connect Invalid Parameters with the offending attribute: `data` says whether `offset` is
/// in the Connect data (else in the command).
fn invalid_parameters(data: bool, offset: u16) -> (Status, u64) {
    (
        Status::dnr(sct::COMMAND_SPECIFIC, connect_status::INVALID_PARAMETERS),
        u64::from(data) | (u64::from(offset) << 16),
    )
}

/// NQN text of a Connect data field, if it is one.
fn nqn(field: &[u8]) -> Option<String> {
    get_str(field)
        .filter(|s| !s.is_empty() && s.len() <= NQN_MAX && s.is_ascii())
        .map(str::to_string)
}

impl Target {
    pub fn fabrics_command(&mut self, i: usize, sqe: Submission, data: &[u8]) {
        let cid = sqe.cid.get();
        let t = sqe.nsid.get() as u8;
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        if matches!(c.role, Role::Initializing) {
            self.fatal(
                i,
                nvme_spec::tcp::fes::PDU_SEQUENCE_ERROR,
                0,
                "command before ICReq",
            );
            return;
        }
        let (status, result) = match t {
            fctype::CONNECT => match self.connect(i, &sqe, data) {
                Some(r) => r,
                None => return, // answered when the queue exists
            },
            fctype::PROPERTY_GET => self.property_get(i, &sqe),
            fctype::PROPERTY_SET => self.property_set(i, &sqe),
            _ => (Status::INVALID_OPCODE, 0),
        };
        self.respond(i, cid, status, result);
    }

    fn property_get(&mut self, i: usize, sqe: &Submission) -> (Status, u64) {
        let offset = u64::from(sqe.cdw11.get());
        let eight = sqe.cdw10.get() & 7 == PROPERTY_SIZE_8;
        if eight != (offset == reg::CAP) {
            return (Status::INVALID_FIELD, 0);
        }
        let Some(c) = self.conns[i].as_ref() else {
            return (Status::INTERNAL_ERROR, 0);
        };
        match &c.role {
            Role::Discovery(d) => match d.property_get(offset) {
                Ok(v) => (Status::SUCCESS, v),
                Err(s) => (s, 0),
            },
            &Role::Queue { export, qid: 0 } => {
                if !matches!(offset, reg::CAP | reg::VS | reg::CC | reg::CSTS) {
                    return (Status::INVALID_FIELD, 0);
                }
                let mut v = self.exports[export]
                    .spec
                    .handle
                    .read_register(offset, if eight { 8 } else { 4 });
                if offset == reg::CAP {
                    // MQES: the queue size Connect accepts, not the controller's own
                    v = (v & !0xffff) | u64::from(QUEUE_DEPTH - 1);
                }
                (Status::SUCCESS, v)
            }
            Role::Queue { .. } => (Status::INVALID_FIELD, 0),
            _ => (Status::COMMAND_SEQUENCE_ERROR, 0),
        }
    }

    fn property_set(&mut self, i: usize, sqe: &Submission) -> (Status, u64) {
        let offset = u64::from(sqe.cdw11.get());
        let value = u64::from(sqe.cdw12.get()) | (u64::from(sqe.cdw13.get()) << 32);
        let Some(c) = self.conns[i].as_mut() else {
            return (Status::INTERNAL_ERROR, 0);
        };
        match &mut c.role {
            Role::Discovery(d) => match d.property_set(offset, value) {
                Ok(()) => (Status::SUCCESS, 0),
                Err(s) => (s, 0),
            },
            &mut Role::Queue { export, qid: 0 } => {
                if offset != reg::CC {
                    return (Status::INVALID_FIELD, 0);
                }
                let ex = &mut self.exports[export];
                let before = ex.spec.handle.read_register(reg::CC, 4) as u32;
                let after = value as u32;
                if (before ^ after) & cc::EN != 0 {
                    // enable or reset: the admin rings start over, I/O queues are gone
                    if let Some(a) = ex.assoc.as_mut() {
                        let size = a.queues[0].as_ref().map_or(2, |q| q.slots.len() as u32 + 1);
                        ex.host.reset_queue(0, size);
                        let conn = a.queues[0].as_ref().and_then(|q| q.conn);
                        let mut fresh = QueueState::new(size);
                        fresh.conn = conn;
                        fresh.live = true;
                        a.queues[0] = Some(fresh);
                        for q in a.queues.iter_mut().skip(1).flatten() {
                            q.live = false;
                        }
                    }
                }
                ex.spec.handle.write_register(reg::CC, u64::from(after), 4);
                if let Some(a) = ex.assoc.as_mut() {
                    a.enabled = after & cc::EN != 0;
                }
                (Status::SUCCESS, 0)
            }
            Role::Queue { .. } => (Status::INVALID_FIELD, 0),
            _ => (Status::COMMAND_SEQUENCE_ERROR, 0),
        }
    }

    /// Connect; `None` when the answer comes later (I/O queue being created).
    fn connect(&mut self, i: usize, sqe: &Submission, data: &[u8]) -> Option<(Status, u64)> {
        let c = self.conns[i].as_ref()?;
        if !matches!(c.role, Role::AwaitingConnect) {
            return Some((Status::COMMAND_SEQUENCE_ERROR, 0));
        }
        let keyed = c.keyed();
        match data_desc(sqe, data, keyed) {
            Ok(d) if d.in_capsule && d.len >= 1024 => {}
            Ok(_) => return Some((Status::DATA_SGL_LENGTH_INVALID, 0)),
            Err(s) => return Some((s, 0)),
        }
        let recfmt = sqe.cdw10.get() & 0xffff;
        if recfmt != 0 {
            return Some((
                Status::dnr(sct::COMMAND_SPECIFIC, connect_status::INCOMPATIBLE_FORMAT),
                0,
            ));
        }
        let qid = (sqe.cdw10.get() >> 16) as u16;
        let sqsize = sqe.cdw11.get() & 0xffff;
        // over RDMA the queue was named and sized when it was set up (RDMA CM private data,
        // RDMA transport 1.0 §3.2): Connect must agree
        #[cfg(feature = "rdma")]
        if let super::connection::Link::Rdma(l) = &c.link {
            if l.request.qid != qid {
                return Some(invalid_parameters(false, 42));
            }
            if u32::from(l.request.hsqsize) != sqsize {
                return Some(invalid_parameters(false, 44));
            }
        }
        let kato_ms = sqe.cdw12.get();
        let cd = ConnectData::read_from_bytes(&data[..1024]).ok()?;
        // An empty Host NQN is accepted as an anonymous host, as SPDK's and Linux's targets
        // do: spdk_nvme_perf sends one unless its -r string has `hostnqn:` (it copies its
        // own, empty, field over the driver's default). Such a host is refused wherever an
        // allowed-host list applies.
        let Some(hostnqn) = nqn(&cd.hostnqn).or_else(|| {
            get_str(&cd.hostnqn)
                .filter(|s| s.is_empty())
                .map(str::to_string)
        }) else {
            return Some(invalid_parameters(true, 512));
        };
        let Some(subnqn) = nqn(&cd.subnqn) else {
            return Some(invalid_parameters(true, 256));
        };
        if subnqn == DISCOVERY_NQN {
            if qid != 0 {
                return Some(invalid_parameters(false, 42));
            }
            let c = self.conns[i].as_mut()?;
            c.role = Role::Discovery(super::discovery::DiscoveryController::default());
            c.hostnqn = hostnqn;
            return Some((Status::SUCCESS, u64::from(DISCOVERY_CNTLID)));
        }
        // the subsystem's controllers (dynamic model: an admin Connect takes a free one)
        let ctrls: Vec<usize> = (0..self.exports.len())
            .filter(|&x| self.exports[x].spec.nqn == subnqn)
            .collect();
        let Some(&first) = ctrls.first() else {
            log::info!("nvme-tcp target: {hostnqn} asked for unknown subsystem {subnqn}");
            return Some(invalid_parameters(true, 256));
        };
        if qid == 0
            && ctrls.iter().any(|&x| {
                self.exports[x]
                    .draining
                    .as_ref()
                    .is_some_and(|d| d.fences(&hostnqn, &cd.hostid))
            })
        {
            // the fence (see `Draining`): the host's last association still has commands
            device_model::warn_limited!(
                "nvme-tcp target: {subnqn}: host {hostnqn} waits for the commands of its last \
                 association to finish (Controller Busy)"
            );
            return Some((
                Status::new(sct::COMMAND_SPECIFIC, connect_status::CONTROLLER_BUSY),
                0,
            ));
        }
        let pick = if qid == 0 {
            ctrls
                .iter()
                .copied()
                .find(|&x| self.exports[x].assoc.is_none() && self.exports[x].draining.is_none())
        } else {
            ctrls
                .iter()
                .copied()
                .find(|&x| self.exports[x].spec.cntlid == cd.cntlid.get())
        };
        let e = pick.unwrap_or(first);
        let ex = &self.exports[e];
        if !ex.spec.allowed_hosts.is_empty() && !ex.spec.allowed_hosts.contains(&hostnqn) {
            device_model::warn_limited!(
                "nvme-tcp target: host {hostnqn} is not allowed on {subnqn}"
            );
            return Some((
                Status::dnr(sct::COMMAND_SPECIFIC, connect_status::INVALID_HOST),
                0,
            ));
        }
        if !(1..QUEUE_DEPTH).contains(&sqsize) {
            return Some(invalid_parameters(false, 44));
        }
        let size = sqsize + 1;
        let cntlid = ex.spec.cntlid;
        if qid == 0 {
            if pick.is_none() {
                return Some((
                    Status::new(sct::COMMAND_SPECIFIC, connect_status::CONTROLLER_BUSY),
                    0,
                ));
            }
            let ex = &mut self.exports[e];
            ex.host.reset_queue(0, size);
            let (sq, cq) = ex.host.ring_iovas(0);
            let h = &ex.spec.handle;
            h.write_register(reg::AQA, u64::from(sqsize | (sqsize << 16)), 4);
            h.write_register(reg::ASQ, sq, 8);
            h.write_register(reg::ACQ, cq, 8);
            let mut queues: Vec<Option<QueueState>> = (0..ex.host.queues()).map(|_| None).collect();
            let mut admin = QueueState::new(size);
            admin.conn = Some(i);
            admin.live = true;
            queues[0] = Some(admin);
            ex.assoc = Some(Association {
                hostnqn: hostnqn.clone(),
                hostid: cd.hostid,
                kato_ms,
                last_admin: Instant::now(),
                enabled: false,
                queues,
            });
            log::info!(
                "nvme-tcp target: {subnqn}: host {hostnqn} connected (controller {cntlid}, keep alive {kato_ms} ms)"
            );
            let c = self.conns[i].as_mut()?;
            c.role = Role::Queue { export: e, qid: 0 };
            c.hostnqn = hostnqn;
            return Some((Status::SUCCESS, u64::from(cntlid)));
        }
        // an I/O queue of the existing association
        let Some(assoc) = ex.assoc.as_ref().filter(|_| pick.is_some()) else {
            return Some(invalid_parameters(true, 16));
        };
        if assoc.hostnqn != hostnqn {
            return Some(invalid_parameters(true, 512));
        }
        if usize::from(qid) >= assoc.queues.len() || assoc.queues[qid as usize].is_some() {
            return Some(invalid_parameters(false, 42));
        }
        if ex.spec.handle.read_register(reg::CSTS, 4) as u32 & csts::RDY == 0 {
            return Some((Status::COMMAND_SEQUENCE_ERROR, 0));
        }
        let ex = &mut self.exports[e];
        let assoc = ex.assoc.as_mut()?;
        let Some(admin_slot) = assoc.queues[0].as_mut().and_then(|q| q.free.pop()) else {
            return Some((
                Status::new(sct::COMMAND_SPECIFIC, connect_status::CONTROLLER_BUSY),
                0,
            ));
        };
        let mut q = QueueState::new(size);
        q.conn = Some(i);
        q.connect_cid = sqe.cid.get();
        assoc.queues[qid as usize] = Some(q);
        ex.host.reset_queue(qid, size);
        let (_, cq) = ex.host.ring_iovas(qid);
        let mut create = Submission::default();
        create.opcode = op::CREATE_IO_CQ;
        create.prp1 = cq.into();
        create.cdw10 = (u32::from(qid) | (sqsize << 16)).into();
        create.cdw11 = 1.into(); // physically contiguous, no interrupts: the target polls
        let admin = assoc.queues[0].as_mut()?;
        admin.slots[admin_slot as usize] = super::Slot {
            owner: Owner::CreateCq { conn: i, qid },
            sqe: create,
            ..super::Slot::default()
        };
        let c = self.conns[i].as_mut()?;
        c.role = Role::Connecting { export: e };
        c.hostnqn = hostnqn;
        self.submit(e, 0, admin_slot);
        None
    }

    /// The target's ports: transport type and address, TCP first, then RDMA.
    fn ports(&self) -> Vec<(u8, SocketAddr)> {
        #[cfg_attr(not(feature = "rdma"), allow(unused_mut))]
        let mut ports: Vec<(u8, SocketAddr)> = self
            .listeners
            .iter()
            .map(|(_, a)| (discovery::TRTYPE_TCP, *a))
            .collect();
        #[cfg(feature = "rdma")]
        if let Some(r) = &self.rdma {
            ports.extend(r.addrs().into_iter().map(|a| (discovery::TRTYPE_RDMA, a)));
        }
        ports
    }

    /// The discovery log entries connection `i`'s host may see.
    pub fn discovery_records(&self, i: usize) -> Vec<Listed> {
        let Some(c) = self.conns[i].as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (port, (trtype, addr)) in self.ports().into_iter().enumerate() {
            let (traddr, adrfam) = match addr {
                SocketAddr::V4(a) => (a.ip().to_string(), discovery::ADRFAM_IPV4),
                SocketAddr::V6(a) => (a.ip().to_string(), discovery::ADRFAM_IPV6),
            };
            // a wildcard listener: report the address the host reached us on
            let traddr = if addr.ip().is_unspecified() {
                c.local.ip().to_string()
            } else {
                traddr
            };
            let base = Listed {
                trtype,
                portid: port as u16 + 1,
                traddr,
                trsvcid: addr.port().to_string(),
                adrfam,
                subnqn: DISCOVERY_NQN.into(),
                subtype: discovery::SUBTYPE_CURRENT_DISCOVERY,
            };
            for (x, ex) in self.exports.iter().enumerate() {
                // one record per subsystem, however many controllers it has
                let seen = self.exports[..x].iter().any(|o| o.spec.nqn == ex.spec.nqn);
                if !seen
                    && (ex.spec.allowed_hosts.is_empty()
                        || ex.spec.allowed_hosts.contains(&c.hostnqn))
                {
                    out.push(Listed {
                        subnqn: ex.spec.nqn.clone(),
                        subtype: discovery::SUBTYPE_NVME,
                        ..base.clone()
                    });
                }
            }
            out.push(base);
        }
        out
    }
}
