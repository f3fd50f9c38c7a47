//! SR-IOV through a host-side vfio-user client (issue 6): a PF with two VFs, each VF its own
//! socket. An offline VF does not become ready; the PF's Identify 14h/15h report the
//! resource pools and the secondaries; Virtualization Management assigns resources and
//! brings a VF online, after which it runs I/O with the queues it was given; errors for
//! bad requests; taking a VF offline resets it under its host. Namespaces attached per
//! controller: each VF sees only its own, and I/O to another gets Invalid Namespace.

use std::path::Path;
use std::time::{Duration, Instant};

use host_driver::transport::vfio_user::VfioUserTransport;
use host_driver::{DriverError, NvmeDriver};
use nvme_spec::opcode::admin as op;
use nvme_spec::{Status, Submission};
use vnvme::config::Config;
use vnvme::daemon::{Daemon, vf_socket};
use vnvme::perf::{Pattern, PerfOptions};
use vnvme_tests::guest::TempDir;

const VF1: u16 = 0x1001;
const VF2: u16 = 0x1002;

fn open(sock: &Path) -> Result<NvmeDriver, DriverError> {
    let t = VfioUserTransport::connect(sock)?;
    NvmeDriver::new(Box::new(t), 8 << 20, 8)
}

fn identify(c: &mut NvmeDriver, cns: u8, cntid: u16) -> Vec<u8> {
    let buf = c.dma().alloc(4096).unwrap();
    let mut sqe = Submission::default();
    sqe.opcode = op::IDENTIFY;
    sqe.cdw10 = (u32::from(cns) | (u32::from(cntid) << 16)).into();
    c.admin_command("Identify", sqe, Some((buf.iova(), 4096)))
        .expect("identify");
    buf.as_slice().to_vec()
}

/// Virtualization Management; the status on failure.
fn virt_mgmt(c: &mut NvmeDriver, act: u8, rt: u8, cntlid: u16, nr: u16) -> Result<u32, Status> {
    let mut sqe = Submission::default();
    sqe.opcode = op::VIRTUALIZATION_MANAGEMENT;
    sqe.cdw10 = (u32::from(act) | (u32::from(rt) << 8) | (u32::from(cntlid) << 16)).into();
    sqe.cdw11 = u32::from(nr).into();
    c.admin_command("Virtualization Management", sqe, None)
        .map_err(|e| match e {
            DriverError::Command { status, .. } => status,
            e => panic!("{e}"),
        })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn vfs_come_online_through_the_pf_and_run_with_what_they_were_given() {
    let tmp = TempDir::new("sriov");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nvfs = 2\n[[controller.namespace]]\nbackend = \"malloc:32M\"\n",
            pf.display()
        ),
        Path::new("sriov.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let vf1 = vf_socket(&pf, 1);
    assert!(vf1.exists() && vf_socket(&pf, 2).exists(), "VF sockets");

    // offline: the VF never becomes ready (CAP.TO 1 s), and says so quickly
    let t = Instant::now();
    assert!(open(&vf1).is_err(), "an offline VF came up");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let mut c = open(&pf).unwrap();
    let id = c.identify();
    assert_eq!(
        id.oacs.get() & (1 << 7),
        1 << 7,
        "OACS virtualization management"
    );
    assert_eq!(id.cmic & 2, 2, "CMIC: several controllers");
    let caps = identify(&mut c, 0x14, 0);
    assert_eq!(u16_at(&caps, 0), 1, "primary CNTLID");
    assert_eq!(caps[4], 0b11, "CRT: VQ and VI");
    assert_eq!(
        (u32_at(&caps, 32), u16_at(&caps, 44)),
        (18, 9),
        "VQFRT, VQFRSM"
    );
    let list = identify(&mut c, 0x15, 0);
    assert_eq!(list[0], 2, "two secondaries");
    assert_eq!(
        (
            u16_at(&list, 32),
            u16_at(&list, 34),
            list[36],
            u16_at(&list, 40)
        ),
        (VF1, 1, 0, 1),
        "SCID, PCID, offline, VFN 1"
    );

    // refusals
    let code = |s: Status| (s.sct(), s.sc());
    assert_eq!(
        virt_mgmt(&mut c, 9, 0, VF1, 0).map_err(code),
        Err((1, 0x21))
    );
    assert_eq!(
        virt_mgmt(&mut c, 8, 0, VF1, 10).map_err(code),
        Err((1, 0x21))
    );
    assert_eq!(
        virt_mgmt(&mut c, 8, 0, 0x0bad, 2).map_err(code),
        Err((1, 0x1f))
    );
    assert_eq!(
        virt_mgmt(&mut c, 8, 5, VF1, 2).map_err(code),
        Err((1, 0x22))
    );
    // assign admin + 1 I/O queue and one vector, then online
    assert_eq!(virt_mgmt(&mut c, 8, 0, VF1, 2), Ok(2));
    assert_eq!(virt_mgmt(&mut c, 8, 1, VF1, 1), Ok(1));
    assert_eq!(virt_mgmt(&mut c, 9, 0, VF1, 0), Ok(0));
    assert_eq!(
        virt_mgmt(&mut c, 8, 0, VF1, 3).map_err(code),
        Err((1, 0x20)),
        "online"
    );
    let list = identify(&mut c, 0x15, 0);
    assert_eq!((list[36], u16_at(&list, 42), u16_at(&list, 44)), (1, 2, 1));
    let caps = identify(&mut c, 0x14, 0);
    assert_eq!(u32_at(&caps, 36), 2, "VQRFA");
    // from CNTID VF2 on, only VF2 is listed
    let list = identify(&mut c, 0x15, VF2);
    assert_eq!((list[0], u16_at(&list, 32)), (1, VF2));

    // the VF runs, with one I/O queue, on the PF's namespace
    let mut v = open(&vf1).expect("the online VF comes up");
    assert_eq!(v.identify().cntlid.get(), VF1);
    assert_eq!(v.io_queue_count(), 1, "I/O queues = VQ - 1");
    assert_eq!(v.namespaces().len(), 1);
    let opts = PerfOptions {
        queue_depth: 8,
        io_size: 4096,
        pattern: Pattern::Randrw,
        read_percent: 50,
        duration: Duration::from_millis(500),
        workers: 1,
        verify: true,
        shadow_doorbells: false,
    };
    let r = vnvme::perf::run(&mut v, &opts, |_, _| {}).unwrap().total();
    assert!(
        r.ios > 100 && r.errors == 0 && r.verify_failures == 0,
        "{r:?}"
    );

    // offline again: the VF is reset under its host
    assert_eq!(virt_mgmt(&mut c, 7, 0, VF1, 0), Ok(0));
    let t = Instant::now();
    while v.check_health().is_ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "VF still ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(v);
    drop(c);
    daemon.stop().unwrap();
}

#[test]
fn each_vf_sees_only_the_namespaces_attached_to_it() {
    let tmp = TempDir::new("sriov-iso");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nvfs = 2\nvfs_online = true\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\nattach = [0, 1]\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\nattach = [0, 2]\n",
            pf.display()
        ),
        Path::new("iso.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let mut c = open(&pf).unwrap();
    let nsids = |c: &NvmeDriver| c.namespaces().iter().map(|n| n.nsid).collect::<Vec<_>>();
    assert_eq!(nsids(&c), [1, 2], "the PF sees both");
    let list = |b: &[u8]| -> Vec<u16> {
        (0..usize::from(u16_at(b, 0)))
            .map(|k| u16_at(b, 2 + 2 * k))
            .collect()
    };
    let mut sqe = Submission::default();
    sqe.nsid = 1.into();
    let buf = c.dma().alloc(4096).unwrap();
    sqe.opcode = op::IDENTIFY;
    sqe.cdw10 = 0x12.into(); // controllers attached to namespace 1
    c.admin_command("Identify", sqe, Some((buf.iova(), 4096)))
        .unwrap();
    assert_eq!(list(buf.as_slice()), [1, VF1]);
    assert_eq!(
        list(&identify(&mut c, 0x13, 0)),
        [1, VF1, VF2],
        "the subsystem's controllers"
    );

    let mut v1 = open(&vf_socket(&pf, 1)).unwrap();
    let mut v2 = open(&vf_socket(&pf, 2)).unwrap();
    assert_eq!(nsids(&v1), [1]);
    assert_eq!(nsids(&v2), [2]);
    assert_eq!(
        v2.namespaces()[0].blocks,
        32768,
        "VF 2's namespace identified"
    );
    assert_eq!(
        v1.identify().nn.get(),
        256,
        "NN is the subsystem's (namespaces can be created up to 256)"
    );
    // VF 2 cannot reach namespace 1 either (it is not the first in its list)
    let mut qp2 = v2.create_io_queue_pair(4).unwrap();
    let b2 = v2.dma().alloc(4096).unwrap();
    qp2.read_write(false, 1, 0, 8, b2.iova(), 4096, 1).unwrap();
    qp2.ring();
    let mut got = None;
    let t = Instant::now();
    while got.is_none() && t.elapsed() < Duration::from_secs(5) {
        qp2.poll(1, |r| got = Some(r));
    }
    assert_eq!(got.map(|r| r.status), Some(Status::INVALID_NAMESPACE));
    drop(qp2);
    // I/O to a namespace not attached: Invalid Namespace
    let mut qp = v1.create_io_queue_pair(4).unwrap();
    let b = v1.dma().alloc(4096).unwrap();
    qp.read_write(false, 2, 0, 8, b.iova(), 4096, 1).unwrap();
    qp.ring();
    let mut got = None;
    let t = Instant::now();
    while got.is_none() && t.elapsed() < Duration::from_secs(5) {
        qp.poll(1, |r| got = Some(r));
    }
    assert_eq!(got.map(|r| r.status), Some(Status::INVALID_NAMESPACE));
    drop((qp, v1, v2, c));
    daemon.stop().unwrap();
}

/// VF states as the daemon's management plane shows them, VF 1 first.
fn vf_states(d: &Daemon) -> Vec<&'static str> {
    d.controllers()
        .iter()
        .filter(|c| c.kind == "vf")
        .map(vnvme::daemon::ControllerInfo::state)
        .collect()
}

#[test]
fn numvfs_in_the_sriov_capability_brings_vfs_online() {
    const CONFIG: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
    let tmp = TempDir::new("sriov-cap");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nvfs = 3\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\n",
            pf.display()
        ),
        Path::new("cap.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let mut c = vnvme_tests::nvme_client::NvmeClient::connect(&pf);
    let rd = |c: &mut vnvme_tests::nvme_client::NvmeClient, off: u64| {
        let mut b = [0u8; 4];
        c.client.region_read(CONFIG, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    // the SR-IOV extended capability at 0x100: TotalVFs 3, offset/stride 1, the PF's device ID
    let cap = rd(&mut c, 0x100);
    assert_eq!(cap & 0xffff, 0x0010, "SR-IOV capability ID");
    assert_eq!(rd(&mut c, 0x10c) >> 16, 3, "TotalVFs");
    assert_eq!(rd(&mut c, 0x114), 0x0001_0001, "First VF Offset, VF Stride");
    assert_eq!(rd(&mut c, 0x118) >> 16, rd(&mut c, 0) >> 16, "VF Device ID");
    assert_eq!(vf_states(&daemon), ["offline"; 3]);

    // NumVFs = 2, VF Enable: VFs 1 and 2 online with default resources, VF 3 stays offline
    c.client
        .region_write(CONFIG, 0x110, &2u16.to_le_bytes())
        .unwrap();
    assert_eq!(vf_states(&daemon), ["offline"; 3], "NumVFs alone");
    c.client
        .region_write(CONFIG, 0x108, &1u16.to_le_bytes())
        .unwrap();
    assert_eq!(vf_states(&daemon), ["online", "online", "offline"]);
    let mut v1 = open(&vf_socket(&pf, 1)).expect("VF 1 comes up");
    assert_eq!(vf_states(&daemon)[0], "ready");
    assert!(v1.check_health().is_ok());

    // VF Enable cleared: every VF offline, VF 1 reset under its host
    c.client
        .region_write(CONFIG, 0x108, &0u16.to_le_bytes())
        .unwrap();
    let t = Instant::now();
    while v1.check_health().is_ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "VF 1 still ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(v1);
    assert_eq!(vf_states(&daemon), ["offline"; 3]);

    // enabled again, then the PF's host goes away (PF reset): the VFs go with it
    c.client
        .region_write(CONFIG, 0x108, &1u16.to_le_bytes())
        .unwrap();
    assert_eq!(vf_states(&daemon), ["online", "online", "offline"]);
    drop(c);
    let t = Instant::now();
    while vf_states(&daemon) != ["offline"; 3] {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?}",
            vf_states(&daemon)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.stop().unwrap();
}
