//! Namespace Management and Attachment at run time (issue 6), through host-side vfio-user
//! clients: a PF with a namespace pool and two online VFs. The PF creates a namespace,
//! attaches it to itself and VF 1; VF 1 hears of it through a Namespace Attribute Changed
//! event and the Changed Namespace List, and reads what the PF wrote; detach with commands
//! in flight completes every one of them; delete gives the capacity back. Every refusal
//! carries its status code from the spec.

use std::path::Path;
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;
use nvme_spec::opcode::admin as op;
use nvme_spec::{Status, Submission};
use vnvme::config::Config;
use vnvme::daemon::{Daemon, vf_socket};
use vnvme_tests::guest::TempDir;
use vnvme_tests::ns_admin::{
    attach, create, delete, identify, io, open, status, u16_list, u32_list,
};

const PF: u16 = 1;
const VF1: u16 = 0x1001;
const VF2: u16 = 0x1002;
/// Namespace Attribute Changed: notice (2), information 0, log page 04h.
const NS_CHANGED_EVENT: u32 = 0x0004_0002;

fn cs(sc: u8) -> Status {
    Status::dnr(1, sc)
}

/// Unallocated NVM capacity (Identify Controller bytes 296..312), read afresh.
fn unvmcap(c: &mut NvmeDriver) -> u128 {
    u128::from_le_bytes(identify(c, 0x01, 0)[296..312].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn changed_log(c: &mut NvmeDriver) -> Vec<u32> {
    let buf = c.dma().alloc(4096).unwrap();
    let mut sqe = Submission::default();
    sqe.opcode = op::GET_LOG_PAGE;
    sqe.nsid = u32::MAX.into();
    sqe.cdw10 = (0x04 | (1023 << 16)).into();
    c.admin_command("Get Log Page", sqe, Some((buf.iova(), 4096)))
        .expect("log 04h");
    u32_list(&buf.as_slice()[..4096])
}

/// Enable Namespace Attribute Notices (Set Features 0Bh, bit 8).
fn enable_notices(c: &mut NvmeDriver) {
    let mut sqe = Submission::default();
    sqe.opcode = op::SET_FEATURES;
    sqe.cdw10 = 0x0b.into();
    sqe.cdw11 = (1 << 8).into();
    c.admin_command("Set Features", sqe, None).unwrap();
}

/// Poll `c`'s admin queue (a harmless command) until the event arrives.
fn wait_event(c: &mut NvmeDriver, ev: u32) {
    let t = Instant::now();
    loop {
        if c.take_events().contains(&ev) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no event {ev:#x}");
        let _ = identify(c, 0x01, 0);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn namespaces_are_created_attached_detached_and_deleted_at_run_time() {
    let tmp = TempDir::new("ns-mgmt");
    let pf = tmp.path().join("pf.sock");
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{}\"\nvfs = 2\nvfs_online = true\n\
             namespace_pool = \"malloc:64M\"\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\nattach = [0]\n",
            pf.display()
        ),
        Path::new("nsm.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).unwrap();
    let mut c = open(&pf);
    let mut v1 = open(&vf_socket(&pf, 1));
    let mut v2 = open(&vf_socket(&pf, 2));
    enable_notices(&mut v1);
    enable_notices(&mut c);

    let id = c.identify();
    assert_ne!(id.oacs.get() & (1 << 3), 0, "the PF offers NS Management");
    assert_ne!(id.oaes.get() & (1 << 8), 0, "Namespace Attribute Notices");
    assert_eq!(id.nn.get(), 256);
    let caps = (
        u128::from_le_bytes(id.tnvmcap),
        u128::from_le_bytes(id.unvmcap),
    );
    // one capacity: the 16 MiB configured namespace is taken from the pool's 64 MiB
    assert_eq!(caps, (64 << 20, 48 << 20));
    assert_eq!(
        v1.identify().oacs.get() & (1 << 3),
        0,
        "a VF does not manage namespaces"
    );
    assert_eq!(
        create(&mut v1, 2048, 2048, 0, 1),
        Err(Status::INVALID_OPCODE)
    );

    // refusals, each with its code
    assert_eq!(create(&mut c, 4096, 2048, 0, 1), Err(cs(0x1b)), "thin");
    assert_eq!(create(&mut c, 4096, 4096, 5, 1), Err(cs(0x0a)), "format");
    assert_eq!(
        create(&mut c, 1 << 20, 1 << 20, 1, 1),
        Err(cs(0x15)),
        "capacity"
    );
    assert_eq!(create(&mut c, 0, 0, 0, 1), Err(Status::INVALID_FIELD));
    assert_eq!(delete(&mut c, 99), Err(Status::INVALID_NAMESPACE));

    // the common format list for creating (Identify Namespace FFFFFFFFh)
    let common = identify(&mut c, 0x00, u32::MAX);
    assert_eq!((common[25], common[128 + 2], common[132 + 2]), (1, 9, 12));

    // create: 8 MiB of 4 KiB blocks, shareable; allocated, not attached anywhere
    let ns = create(&mut c, 2048, 2048, 1, 1).expect("create");
    assert_eq!(ns, 2);
    let private = create(&mut c, 1024, 1024, 0, 0).expect("create private");
    assert_eq!(private, 3);
    assert_eq!(u32_list(&identify(&mut c, 0x10, 0)), [1, 2, 3]);
    assert_eq!(
        u32_list(&identify(&mut c, 0x02, 0)),
        [1],
        "not attached yet"
    );
    let alloc = identify(&mut c, 0x11, ns);
    assert_eq!(u64_at(&alloc, 0), 2048, "NSZE of the allocated namespace");
    assert_eq!((alloc[30], alloc[128 + 2]), (1, 12), "NMIC, LBADS");
    assert!(identify(&mut c, 0x00, ns).iter().all(|&b| b == 0));
    assert_eq!(
        unvmcap(&mut c),
        (48 << 20) - (8 << 20) - (512 << 10),
        "8 MiB and 512 KiB taken"
    );

    assert_eq!(attach(&mut c, false, ns, &[PF, 0x7777]), Err(cs(0x1c)));
    assert_eq!(attach(&mut c, false, ns, &[]), Err(cs(0x1c)));
    assert_eq!(attach(&mut c, false, ns, &[PF, PF]), Err(cs(0x1c)));
    assert_eq!(
        attach(&mut c, false, 42, &[PF]),
        Err(Status::INVALID_NAMESPACE)
    );
    assert_eq!(
        attach(&mut c, true, ns, &[VF1]),
        Err(cs(0x1a)),
        "not attached"
    );
    assert_eq!(attach(&mut c, false, private, &[PF, VF1]), Err(cs(0x19)));

    // attach to the PF and VF 1: VF 1 hears of it and sees it; VF 2 does not
    assert_eq!(attach(&mut c, false, ns, &[PF, VF1]), Ok(0));
    assert_eq!(attach(&mut c, false, ns, &[VF1]), Err(cs(0x18)));
    wait_event(&mut v1, NS_CHANGED_EVENT);
    assert_eq!(changed_log(&mut v1), [ns]);
    assert_eq!(changed_log(&mut v1), [] as [u32; 0], "cleared when read");
    assert_eq!(u32_list(&identify(&mut v1, 0x02, 0)), [ns]);
    assert_eq!(u32_list(&identify(&mut v2, 0x02, 0)), [] as [u32; 0]);
    assert_eq!(u16_list(&identify(&mut c, 0x12, ns)), [PF, VF1]);
    // a VF does not learn of the subsystem's other namespaces (10h, 11h, 12h)
    for cns in [0x10u32, 0x11, 0x12] {
        let buf = v2.dma().alloc(4096).unwrap();
        let mut sqe = Submission::default();
        sqe.opcode = op::IDENTIFY;
        sqe.nsid = ns.into();
        sqe.cdw10 = cns.into();
        assert_eq!(
            status(v2.admin_command("Identify", sqe, Some((buf.iova(), 4096)))),
            Err(Status::INVALID_FIELD),
            "CNS {cns:#x} on a VF"
        );
    }
    let vid = identify(&mut v1, 0x00, ns);
    assert_eq!(u64_at(&vid, 0), 2048);
    assert_eq!(vid[30], 1, "NMIC: shared");

    // what the PF writes, VF 1 reads; VF 2 gets Invalid Namespace
    let mut data = [0u8; 4096];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    assert_eq!(io(&mut c, true, ns, &mut data.clone()), Status::SUCCESS);
    let mut back = [0u8; 4096];
    assert_eq!(io(&mut v1, false, ns, &mut back), Status::SUCCESS);
    assert_eq!(back, data);
    assert_eq!(io(&mut v2, false, ns, &mut back), Status::INVALID_NAMESPACE);

    // detach from VF 1 with 32 reads in flight: every one completes, then the namespace is
    // gone for VF 1
    let mut qp = v1.create_io_queue_pair(64).unwrap();
    let b = v1.dma().alloc(32 * 4096).unwrap();
    for k in 0..32u64 {
        qp.read_write(false, ns, k, 1, b.iova() + k * 4096, 4096, k)
            .unwrap();
    }
    qp.ring();
    assert_eq!(attach(&mut c, true, ns, &[VF1]), Ok(0));
    let mut done = 0;
    let t = Instant::now();
    while done < 32 && t.elapsed() < Duration::from_secs(5) {
        done += qp.poll(64, |r| {
            assert!(
                r.status.is_success() || r.status == Status::INVALID_NAMESPACE,
                "{:?}",
                r.status
            );
        });
    }
    assert_eq!(done, 32, "commands lost at detach");
    v1.delete_io_queue_pair(qp).unwrap();
    wait_event(&mut v1, NS_CHANGED_EVENT);
    assert_eq!(changed_log(&mut v1), [ns]);
    assert_eq!(u32_list(&identify(&mut v1, 0x02, 0)), [] as [u32; 0]);
    assert_eq!(io(&mut v1, false, ns, &mut back), Status::INVALID_NAMESPACE);
    assert_eq!(u16_list(&identify(&mut c, 0x12, ns)), [PF]);

    // the private namespace goes to VF 2 alone
    assert_eq!(attach(&mut c, false, private, &[VF2]), Ok(0));
    let t = Instant::now();
    while u32_list(&identify(&mut v2, 0x02, 0)) != [private] {
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(identify(&mut v2, 0x00, private)[30], 0, "NMIC: private");

    // delete: detached from the PF (its own event), capacity back, NSID free again
    assert_eq!(delete(&mut c, ns), Ok(0));
    wait_event(&mut c, NS_CHANGED_EVENT);
    assert_eq!(u32_list(&identify(&mut c, 0x10, 0)), [1, 3]);
    assert_eq!(u32_list(&identify(&mut c, 0x02, 0)), [1]);
    assert_eq!(unvmcap(&mut c), (48 << 20) - (512 << 10), "8 MiB back");
    assert_eq!(create(&mut c, 4096, 4096, 0, 1), Ok(2), "NSID reused");
    assert_eq!(delete(&mut c, u32::MAX), Ok(0), "delete all");
    assert_eq!(u32_list(&identify(&mut c, 0x10, 0)), [] as [u32; 0]);
    // the configured namespace's capacity came back too: one namespace of all of TNVMCAP
    assert_eq!(unvmcap(&mut c), 64 << 20, "everything back");
    let all = (64u64 << 20) / 4096;
    assert_eq!(
        create(&mut c, all, all, 1, 1),
        Ok(1),
        "a namespace of the full TNVMCAP"
    );
    assert_eq!(unvmcap(&mut c), 0);
    assert_eq!(delete(&mut c, 1), Ok(0));
    let t = Instant::now();
    while !u32_list(&identify(&mut v2, 0x02, 0)).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    drop((v1, v2, c));
    daemon.stop().unwrap();
}
