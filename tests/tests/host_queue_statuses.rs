//! Queue creation and deletion answer with the statuses of NVMe base 2.x's Create / Delete
//! I/O Submission / Completion Queue figures (issue 16, item 13), driven through a vfio-user
//! client against a running daemon.

use std::path::PathBuf;

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::nvme_client::{Cqe, NvmeClient, cmd};

fn daemon() -> (Daemon, PathBuf) {
    let dir = std::env::temp_dir().join(format!("vnvme-host-queues-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("c.sock");
    let cfg = Config::from_flags(
        vnvme::config::Served::socket(sock.clone()),
        &["malloc:16M".into()],
        Some("QUEUES".into()),
        512,
        vnvme::config::PollSetting::Adaptive,
    )
    .unwrap();
    (Daemon::start(&cfg).unwrap(), sock)
}

/// Command-specific status (SCT 1) codes.
const CQ_INVALID: u16 = 0x100;
const INVALID_QID: u16 = 0x101;
const INVALID_QSIZE: u16 = 0x102;
const INVALID_VECTOR: u16 = 0x108;
const INVALID_DELETION: u16 = 0x10c;
/// Generic Invalid Field in Command.
const INVALID_FIELD: u16 = 0x002;
const SUCCESS: u16 = 0;

/// SCT and SC of a completion.
fn code(c: Cqe) -> u16 {
    c.status & 0x7ff
}

/// Create I/O SQ `qid` of `entries` at `base` on `cqid`, physically contiguous when `pc`.
fn create_sq(qid: u16, entries: u32, base: u64, cqid: u16, pc: bool) -> [u8; 64] {
    let cdw10 = ((entries.wrapping_sub(1) & 0xffff) << 16) | u32::from(qid);
    cmd(
        0x01,
        0,
        base,
        &[cdw10, (u32::from(cqid) << 16) | u32::from(pc)],
    )
}

/// Create I/O CQ `qid` of `entries` at `base` on MSI-X vector `iv`.
fn create_cq(qid: u16, entries: u32, base: u64, iv: u16, pc: bool) -> [u8; 64] {
    let cdw10 = ((entries.wrapping_sub(1) & 0xffff) << 16) | u32::from(qid);
    cmd(
        0x05,
        0,
        base,
        &[cdw10, (u32::from(iv) << 16) | 2 | u32::from(pc)],
    )
}

#[test]
fn queue_creation_and_deletion_statuses_follow_the_spec() {
    let (d, sock) = daemon();
    let mut n = NvmeClient::connect(&sock);
    // two queue pairs allocated (Set Features 07h), CQ 1 and SQ 1 created
    n.create_io_queues();
    let mqes = n.reg_read32(0) & 0xffff; // CAP.MQES, 0-based
    // the queues allocated (Get Features Number of Queues, 0-based counts)
    let q = n.submit(0, cmd(0x0a, 0, 0, &[0x07]));
    assert_eq!(code(q), SUCCESS, "{q:?}");
    let (nsq, ncq) = ((q.dw0 & 0xffff) as u16 + 1, (q.dw0 >> 16) as u16 + 1);
    assert!(nsq >= 2 && ncq >= 2, "{q:?}");
    let (sq_out, cq_out) = (nsq + 1, ncq + 1);
    let (base, base2) = (0x40000, 0x60000);
    let cases: &[(&str, [u8; 64], u16)] = &[
        (
            "SQ on the admin CQ (CQID 0)",
            create_sq(2, 16, base, 0, true),
            INVALID_QID,
        ),
        (
            "SQ on a CQID beyond those allocated",
            create_sq(2, 16, base, cq_out, true),
            INVALID_QID,
        ),
        (
            "SQ on CQ 2, never created",
            create_sq(2, 16, base, 2, true),
            CQ_INVALID,
        ),
        ("SQ 0", create_sq(0, 16, base, 1, true), INVALID_QID),
        (
            "SQ beyond those allocated",
            create_sq(sq_out, 16, base, 1, true),
            INVALID_QID,
        ),
        ("SQ 1 again", create_sq(1, 16, base, 1, true), INVALID_QID),
        (
            "SQ of one entry",
            create_sq(2, 1, base, 1, true),
            INVALID_QSIZE,
        ),
        (
            "SQ above MQES",
            create_sq(2, mqes + 2, base, 1, true),
            INVALID_QSIZE,
        ),
        (
            "SQ not contiguous",
            create_sq(2, 16, base, 1, false),
            INVALID_FIELD,
        ),
        (
            "SQ base not page aligned",
            create_sq(2, 16, base + 64, 1, true),
            INVALID_FIELD,
        ),
        ("CQ 0", create_cq(0, 16, base, 0, true), INVALID_QID),
        (
            "CQ beyond those allocated",
            create_cq(cq_out, 16, base, 0, true),
            INVALID_QID,
        ),
        ("CQ 1 again", create_cq(1, 16, base, 0, true), INVALID_QID),
        (
            "CQ of one entry",
            create_cq(2, 1, base, 0, true),
            INVALID_QSIZE,
        ),
        (
            "CQ above MQES",
            create_cq(2, mqes + 2, base, 0, true),
            INVALID_QSIZE,
        ),
        (
            "CQ on a vector the function lacks",
            create_cq(2, 16, base, 4096, true),
            INVALID_VECTOR,
        ),
        (
            "CQ not contiguous",
            create_cq(2, 16, base, 0, false),
            INVALID_FIELD,
        ),
        ("delete SQ 0", cmd(0x00, 0, 0, &[0]), INVALID_QID),
        (
            "delete an SQ never created",
            cmd(0x00, 0, 0, &[2]),
            INVALID_QID,
        ),
        ("delete CQ 0", cmd(0x04, 0, 0, &[0]), INVALID_QID),
        (
            "delete a CQ never created",
            cmd(0x04, 0, 0, &[2]),
            INVALID_QID,
        ),
        (
            "delete CQ 1 while SQ 1 uses it",
            cmd(0x04, 0, 0, &[1]),
            INVALID_DELETION,
        ),
        // and the valid sequence still works after all of the above
        ("CQ 2", create_cq(2, 16, base, 0, true), SUCCESS),
        ("SQ 2 on CQ 2", create_sq(2, 16, base2, 2, true), SUCCESS),
        ("delete SQ 2", cmd(0x00, 0, 0, &[2]), SUCCESS),
        ("delete CQ 2", cmd(0x04, 0, 0, &[2]), SUCCESS),
    ];
    for (what, sqe, want) in cases {
        let c = n.submit(0, *sqe);
        assert_eq!(code(c), *want, "{what}: {c:?}");
    }
    drop(n);
    d.stop().unwrap();
}
