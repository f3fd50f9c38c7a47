//! Namespace Management (NVMe base 2.0 §5.20), Namespace Attachment (§5.19), Identify and
//! one-block I/O through the user-space driver over vfio-user: what a host does to a
//! subsystem's namespaces, for the tests that check it.

use std::path::Path;
use std::time::{Duration, Instant};

use host_driver::transport::vfio_user::VfioUserTransport;
use host_driver::{DriverError, NvmeDriver};
use nvme_spec::opcode::admin as op;
use nvme_spec::{Status, Submission};

/// A driver on the controller at vfio-user socket `sock` (8 MiB of DMA memory).
pub fn open(sock: &Path) -> NvmeDriver {
    let t = VfioUserTransport::connect(sock).expect("connect");
    NvmeDriver::new(Box::new(t), 8 << 20, 4).expect("controller")
}

/// A command's status, the driver's other errors a panic.
pub fn status(r: Result<u32, DriverError>) -> Result<u32, Status> {
    r.map_err(|e| match e {
        DriverError::Command { status, .. } => status,
        e => panic!("{e}"),
    })
}

/// Namespace Management create: NSZE/NCAP blocks, FLBAS, NMIC.
pub fn create(
    c: &mut NvmeDriver,
    nsze: u64,
    ncap: u64,
    flbas: u8,
    nmic: u8,
) -> Result<u32, Status> {
    let mut buf = c.dma().alloc(4096).unwrap();
    let data = &mut buf.as_mut_slice()[..4096];
    data.fill(0);
    data[0..8].copy_from_slice(&nsze.to_le_bytes());
    data[8..16].copy_from_slice(&ncap.to_le_bytes());
    data[26] = flbas;
    data[30] = nmic;
    let mut sqe = Submission::default();
    sqe.opcode = op::NS_MANAGEMENT;
    status(c.admin_command("Namespace Management", sqe, Some((buf.iova(), 4096))))
}

/// Namespace Management delete.
pub fn delete(c: &mut NvmeDriver, nsid: u32) -> Result<u32, Status> {
    let mut sqe = Submission::default();
    sqe.opcode = op::NS_MANAGEMENT;
    sqe.nsid = nsid.into();
    sqe.cdw10 = 1.into();
    status(c.admin_command("Namespace Management", sqe, None))
}

/// Namespace Attachment: attach (`detach` false) or detach `nsid` for `ids`.
pub fn attach(c: &mut NvmeDriver, detach: bool, nsid: u32, ids: &[u16]) -> Result<u32, Status> {
    let mut buf = c.dma().alloc(4096).unwrap();
    let data = &mut buf.as_mut_slice()[..4096];
    data.fill(0);
    data[0..2].copy_from_slice(&(ids.len() as u16).to_le_bytes());
    for (k, id) in ids.iter().enumerate() {
        data[2 + 2 * k..4 + 2 * k].copy_from_slice(&id.to_le_bytes());
    }
    let mut sqe = Submission::default();
    sqe.opcode = op::NS_ATTACHMENT;
    sqe.nsid = nsid.into();
    sqe.cdw10 = u32::from(detach).into();
    status(c.admin_command("Namespace Attachment", sqe, Some((buf.iova(), 4096))))
}

/// Identify CNS `cns` of `nsid`: the 4 KiB data.
pub fn identify(c: &mut NvmeDriver, cns: u8, nsid: u32) -> Vec<u8> {
    let buf = c.dma().alloc(4096).unwrap();
    let mut sqe = Submission::default();
    sqe.opcode = op::IDENTIFY;
    sqe.nsid = nsid.into();
    sqe.cdw10 = u32::from(cns).into();
    c.admin_command("Identify", sqe, Some((buf.iova(), 4096)))
        .expect("identify");
    buf.as_slice()[..4096].to_vec()
}

/// A zero-terminated list of u32 (an NSID list).
pub fn u32_list(b: &[u8]) -> Vec<u32> {
    b.chunks(4)
        .map(|x| u32::from_le_bytes(x.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect()
}

/// A counted list of u16 (a controller list).
pub fn u16_list(b: &[u8]) -> Vec<u16> {
    let n = usize::from(u16::from_le_bytes([b[0], b[1]]));
    (0..n)
        .map(|k| u16::from_le_bytes([b[2 + 2 * k], b[3 + 2 * k]]))
        .collect()
}

/// One command on a fresh queue pair: `write` or read 4 KiB at LBA 0 of `nsid` (a
/// namespace of 4 KiB blocks).
pub fn io(c: &mut NvmeDriver, write: bool, nsid: u32, data: &mut [u8; 4096]) -> Status {
    let mut qp = c.create_io_queue_pair(8).unwrap();
    let mut b = c.dma().alloc(4096).unwrap();
    if write {
        b.as_mut_slice()[..4096].copy_from_slice(data);
    }
    qp.read_write(write, nsid, 0, 1, b.iova(), 4096, 1).unwrap();
    qp.ring();
    let mut got = None;
    let t = Instant::now();
    while got.is_none() && t.elapsed() < Duration::from_secs(5) {
        qp.poll(1, |r| got = Some(r.status));
    }
    if !write {
        data.copy_from_slice(&b.as_slice()[..4096]);
    }
    c.delete_io_queue_pair(qp).unwrap();
    got.expect("I/O completion")
}
