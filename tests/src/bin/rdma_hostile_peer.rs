//! A hostile NVMe/RDMA host, for the Soft-RoCE guest test (`vm_nvme_rdma.rs`): against the
//! target at `ADDR:PORT` it tries, each on a connection of its own, what a broken or hostile
//! host sends, and prints one line per case, `hostile CASE OUTCOME`:
//! - `bad-hsqsize`: a connect request asking for a 65,536-entry queue (refused by RDMA CM
//!   reject, NVMe/RDMA status 04h expected);
//! - `short-capsule`: a 10-byte message where a command capsule belongs (disconnect
//!   expected);
//! - `bad-key`: a Fabrics Connect whose data is named by a keyed SGL with a key we never
//!   registered (the target's RDMA Read fails: disconnect expected);
//! - `flood`: after a good Connect, more commands at once than the queue has entries
//!   (disconnect expected).
//!
//! Usage: `rdma_hostile_peer ADDR:PORT SUBNQN`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_spec::Submission;
use nvme_spec::fabrics::{self, ConnectData, fctype, sgl_id};
use nvmeof::rdma::cm_records::{ConnectRequest, parse_reject};
use nvmeof::rdma::verbs::{
    CmEvent, CmEventKind, CmId, CompletionQueue, EventChannel, ProtectionDomain, Region,
    WorkCompletion,
};
use zerocopy::IntoBytes;

const WAIT: Duration = Duration::from_secs(10);

/// One connection of ours.
struct Peer {
    id: CmId,
    cq: Arc<CompletionQueue>,
    buf: Region,
    channel: EventChannel,
}

fn next_event(ch: &EventChannel, within: Duration) -> Option<CmEvent> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if let Ok(Some(ev)) = ch.next() {
            return Some(ev);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Connect with `private` data; the event that ended the attempt and, when established, the
/// connection.
fn connect(addr: SocketAddr, private: &[u8]) -> Result<(CmEvent, Option<Peer>), String> {
    let channel = EventChannel::new().map_err(|e| e.to_string())?;
    let mut id = CmId::new(&channel).map_err(|e| e.to_string())?;
    id.resolve_addr(addr, 5000).map_err(|e| e.to_string())?;
    let ev = next_event(&channel, WAIT).ok_or("no address resolution")?;
    if ev.kind != CmEventKind::AddrResolved {
        return Err(format!("address: {:?}", ev.kind));
    }
    id.resolve_route(5000).map_err(|e| e.to_string())?;
    let ev = next_event(&channel, WAIT).ok_or("no route resolution")?;
    if ev.kind != CmEventKind::RouteResolved {
        return Err(format!("route: {:?}", ev.kind));
    }
    let device = id.device().ok_or("no device")?;
    let pd = Arc::new(ProtectionDomain::new(device).map_err(|e| e.to_string())?);
    let cq = Arc::new(CompletionQueue::new(device, 512).map_err(|e| e.to_string())?);
    id.create_qp(&pd, &cq, 128, 64, 64)
        .map_err(|e| e.to_string())?;
    let buf = Region::anonymous(&pd, 1 << 20).map_err(|e| e.to_string())?;
    {
        let qp = id.qp().ok_or("no QP")?;
        for b in 0..64 {
            qp.post_recv(b, &buf, 512 * 1024 + b as usize * 64, 64)
                .map_err(|e| e.to_string())?;
        }
    }
    id.connect(private, 16, 16).map_err(|e| e.to_string())?;
    let ev = next_event(&channel, WAIT).ok_or("no answer to the connect request")?;
    if ev.kind != CmEventKind::Established {
        return Ok((ev, None));
    }
    Ok((
        ev,
        Some(Peer {
            id,
            cq,
            buf,
            channel,
        }),
    ))
}

impl Peer {
    /// Send `len` bytes of our buffer at `off`.
    fn send(&self, off: usize, len: usize) -> Result<(), String> {
        let qp = self.id.qp().ok_or("no QP")?;
        qp.send(1 << 40, &self.buf, off, len)
            .map_err(|e| e.to_string())
    }

    /// Send command `sqe` (from our buffer at `slot`).
    fn command(&self, slot: usize, sqe: &Submission) -> Result<(), String> {
        let off = 256 * 1024 + slot * 64;
        self.buf
            .write(off, sqe.as_bytes())
            .map_err(|e| e.to_string())?;
        self.send(off, 64)
    }

    /// Wait for the connection to end (a disconnect event, or our queue pair failing).
    fn ended(&self, within: Duration) -> &'static str {
        let until = Instant::now() + within;
        let mut wcs = [WorkCompletion::default(); 16];
        while Instant::now() < until {
            if let Ok(Some(ev)) = self.channel.next()
                && ev.kind == CmEventKind::Disconnected
            {
                return "disconnected";
            }
            if let Ok(n) = self.cq.poll(&mut wcs)
                && wcs[..n].iter().any(|w| w.status != 0)
            {
                return "disconnected";
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        "still-connected"
    }

    /// Wait for one response capsule; its status field.
    fn response(&self, within: Duration) -> Option<u16> {
        let until = Instant::now() + within;
        let mut wcs = [WorkCompletion::default(); 16];
        while Instant::now() < until {
            if let Ok(n) = self.cq.poll(&mut wcs) {
                for w in &wcs[..n] {
                    if w.status == 0 && w.opcode & 0x80 != 0 {
                        let mut cqe = [0u8; 16];
                        self.buf
                            .read(512 * 1024 + w.wr_id as usize * 64, &mut cqe)
                            .ok()?;
                        return Some(u16::from_le_bytes([cqe[14], cqe[15]]) >> 1);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn request(hsqsize: u16) -> [u8; 32] {
    ConnectRequest {
        qid: 0,
        hrqsize: 32,
        hsqsize,
    }
    .encode()
}

/// A Fabrics Connect for the admin queue, its data in our buffer at 0 (keyed with `key`).
fn connect_command(peer: &Peer, subnqn: &str, key: u32) -> Result<Submission, String> {
    let mut data = ConnectData::default();
    data.cntlid = 0xffff.into();
    fabrics::put_str(&mut data.subnqn, subnqn);
    fabrics::put_str(&mut data.hostnqn, "nqn.2014-08.org.vnvme:hostile-peer");
    peer.buf
        .write(0, data.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut sqe = Submission::default();
    sqe.opcode = fabrics::OPCODE;
    sqe.nsid = u32::from(fctype::CONNECT).into();
    sqe.cid = 1.into();
    sqe.flags = fabrics::PSDT_SGL;
    sqe.cdw11 = 31.into();
    sqe.cdw12 = 5000.into();
    sqe.prp1 = peer.buf.remote_addr(0).into();
    sqe.prp2 = (1024 | (u64::from(key) << 24) | (u64::from(sgl_id::KEYED) << 56)).into();
    Ok(sqe)
}

fn run(addr: SocketAddr, subnqn: &str) -> Result<(), String> {
    // a queue far larger than the target gives
    let (ev, _) = connect(addr, &request(0xffff))?;
    println!(
        "hostile bad-hsqsize {} {}",
        if ev.kind == CmEventKind::Rejected {
            "rejected"
        } else {
            "accepted"
        },
        parse_reject(&ev.private_data).unwrap_or(0)
    );

    // 10 bytes where a 64-byte command belongs
    let (_, peer) = connect(addr, &request(31))?;
    let peer = peer.ok_or("short-capsule: not accepted")?;
    peer.buf.write(0, &[0xee; 10]).map_err(|e| e.to_string())?;
    peer.send(0, 10)?;
    println!("hostile short-capsule {}", peer.ended(WAIT));
    drop(peer);

    // Connect data behind a key we never registered
    let (_, peer) = connect(addr, &request(31))?;
    let peer = peer.ok_or("bad-key: not accepted")?;
    let sqe = connect_command(&peer, subnqn, 0x00de_adbe)?;
    peer.command(0, &sqe)?;
    println!("hostile bad-key {}", peer.ended(WAIT));
    drop(peer);

    // a good Connect, then twice the queue's depth of commands at once
    let (_, peer) = connect(addr, &request(31))?;
    let peer = peer.ok_or("flood: not accepted")?;
    let sqe = connect_command(&peer, subnqn, peer.buf.rkey())?;
    peer.command(0, &sqe)?;
    let status = peer.response(WAIT);
    println!("hostile connect-status {status:?}");
    // enable the controller (CC.EN, 64-byte SQEs, 16-byte CQEs): commands then take slots
    let mut cc = Submission::default();
    cc.opcode = fabrics::OPCODE;
    cc.nsid = u32::from(fctype::PROPERTY_SET).into();
    cc.cid = 2.into();
    cc.flags = fabrics::PSDT_SGL;
    cc.prp2 = (u64::from(sgl_id::KEYED) << 56).into();
    cc.cdw11 = 0x14.into();
    cc.cdw12 = 0x0046_0001.into();
    peer.command(1, &cc)?;
    println!("hostile enable-status {:?}", peer.response(WAIT));
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..64u16 {
        let mut ka = Submission::default();
        ka.opcode = 0x18; // Keep Alive
        ka.cid = (100 + i).into();
        ka.flags = fabrics::PSDT_SGL;
        ka.prp2 = (u64::from(sgl_id::KEYED) << 56).into();
        peer.command(2 + usize::from(i), &ka)?;
    }
    println!("hostile flood {}", peer.ended(WAIT));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(nqn)) = (args.get(1).and_then(|a| a.parse().ok()), args.get(2)) else {
        eprintln!("usage: rdma_hostile_peer ADDR:PORT SUBNQN");
        std::process::exit(2);
    };
    if let Err(e) = run(addr, nqn) {
        println!("hostile error {e}");
        std::process::exit(1);
    }
}
