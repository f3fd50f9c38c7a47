//! Discovery (base 2.0 §3.1.3.3): connect to a discovery controller, read the Discovery
//! log page (70h) and list what it points to.

use std::time::Duration;

use nvme_spec::fabrics::{
    CNTLID_DYNAMIC, DISCOVERY_NQN, DiscoveryLogEntry, DiscoveryLogHeader, discovery, get_str,
};
use zerocopy::FromBytes;

use super::host_identity::HostIdentity;
use super::queue::{ConnectParams, HostQueue};
use super::session::SessionError;

/// One discovery log page entry, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryRecord {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub portid: u16,
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
}

impl DiscoveryRecord {
    /// "tcp", "rdma", ... as nvme-cli prints it.
    pub fn transport(&self) -> &'static str {
        match self.trtype {
            1 => "rdma",
            2 => "fc",
            discovery::TRTYPE_TCP => "tcp",
            254 => "loop",
            _ => "unrecognized",
        }
    }

    /// "nvme subsystem", "current discovery subsystem", ...
    pub fn kind(&self) -> &'static str {
        match self.subtype {
            1 => "discovery subsystem referral",
            discovery::SUBTYPE_NVME => "nvme subsystem",
            discovery::SUBTYPE_CURRENT_DISCOVERY => "current discovery subsystem",
            _ => "unrecognized",
        }
    }
}

/// Read the discovery log of the NVMe/TCP discovery controller at `host:port`.
pub fn discover(path: &str, timeout: Duration) -> Result<Vec<DiscoveryRecord>, SessionError> {
    discover_over(path, super::Transport::Tcp, timeout)
}

/// Read the discovery log of the discovery controller at `host:port` over `transport`.
pub fn discover_over(
    path: &str,
    transport: super::Transport,
    timeout: Duration,
) -> Result<Vec<DiscoveryRecord>, SessionError> {
    let me = HostIdentity::local();
    let q = |source| SessionError::Queue {
        path: path.into(),
        source,
    };
    let addr = super::session::resolve(path)?;
    let params = ConnectParams {
        addr,
        subnqn: DISCOVERY_NQN.into(),
        hostnqn: me.nqn.clone(),
        hostid: me.id,
        header_digest: false,
        data_digest: false,
        transport,
        timeout,
        remote_invalidate: true,
    };
    let mut admin = HostQueue::connect(&params, 0, 32, CNTLID_DYNAMIC, 0).map_err(q)?;
    admin.enable(timeout).map_err(q)?;
    // the log may change between reads: read until the generation counter holds still
    for _ in 0..4 {
        let head = admin
            .get_log_page(discovery::LOG_ID, 0, 1024, timeout)
            .map_err(q)?;
        let h = DiscoveryLogHeader::read_from_bytes(&head).expect("1024 bytes");
        let n = h.numrec.get().min(1024) as usize;
        let all = admin
            .get_log_page(discovery::LOG_ID, 0, 1024 * (n + 1), timeout)
            .map_err(q)?;
        let h2 = DiscoveryLogHeader::read_from_bytes(&all[..1024]).expect("1024 bytes");
        if h2.genctr != h.genctr {
            continue;
        }
        let text = |f: &[u8]| get_str(f).unwrap_or("?").to_string();
        let records = all[1024..]
            .chunks_exact(1024)
            .take(h2.numrec.get().min(n as u64) as usize)
            .map(|c| {
                let e = DiscoveryLogEntry::read_from_bytes(c).expect("1024 bytes");
                DiscoveryRecord {
                    trtype: e.trtype,
                    adrfam: e.adrfam,
                    subtype: e.subtype,
                    portid: e.portid.get(),
                    traddr: text(&e.traddr),
                    trsvcid: text(&e.trsvcid),
                    subnqn: text(&e.subnqn),
                }
            })
            .collect();
        admin.shutdown();
        return Ok(records);
    }
    admin.shutdown();
    Err(SessionError::Namespace {
        path: path.into(),
        nsid: 0,
        why: "discovery log kept changing while read".into(),
    })
}
