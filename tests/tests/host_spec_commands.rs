//! NVMe base / NVM command set 2.x behaviour a stock OS and nvme-cli expect (issue 16, items
//! 12 and 14), driven through a vfio-user client against a running daemon: Interrupt
//! Coalescing and Interrupt Vector Configuration read back what was set, unsupported
//! features (APST 0Ch, vendor specific) and vendor log pages fail as the spec says, and Write
//! Uncorrectable, Verify and Get LBA Status with their data effects.

use std::path::PathBuf;

use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme_tests::nvme_client::{Cqe, NvmeClient, cmd};

fn daemon(tag: &str) -> (Daemon, PathBuf) {
    let dir = std::env::temp_dir().join(format!("vnvme-host-spec-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("c.sock");
    let cfg = Config::from_flags(
        vnvme::config::Served::socket(sock.clone()),
        &["malloc:16M".into()],
        Some("SPECCMDS".into()),
        512,
        vnvme::config::PollSetting::Adaptive,
    )
    .unwrap();
    (Daemon::start(&cfg).unwrap(), sock)
}

const SUCCESS: u16 = 0;
const INVALID_FIELD: u16 = 0x002;
const INVALID_NAMESPACE: u16 = 0x00b;
const LBA_OUT_OF_RANGE: u16 = 0x080;
const INVALID_LOG_PAGE: u16 = 0x109;
/// Media and data integrity error (SCT 2h), Unrecovered Read Error (SC 81h).
const UNRECOVERED_READ: u16 = 0x281;
const DNR: u16 = 1 << 14;

/// SCT and SC of a completion.
fn code(c: Cqe) -> u16 {
    c.status & 0x7ff
}

const SET_FEATURES: u8 = 0x09;
const GET_FEATURES: u8 = 0x0a;
const WRITE: u8 = 0x01;
const READ: u8 = 0x02;
const WRITE_UNCOR: u8 = 0x04;
const COMPARE: u8 = 0x05;
const WRITE_ZEROES: u8 = 0x08;
const DSM: u8 = 0x09;
const VERIFY: u8 = 0x0c;
const GET_LBA_STATUS: u8 = 0x86;
/// Data buffers in the client's memory.
const BUF: u64 = 0x100000;
const OUT: u64 = 0x200000;

/// An LBA range command on namespace 1: `nlb` blocks at `lba`.
fn at(op: u8, lba: u32, nlb: u32) -> [u8; 64] {
    cmd(op, 1, BUF, &[lba, 0, nlb - 1])
}

#[test]
fn interrupt_features_read_back_and_unsupported_identifiers_fail_per_spec() {
    let (d, sock) = daemon("features");
    let mut n = NvmeClient::connect(&sock);
    n.create_io_queues();
    let get = |n: &mut NvmeClient, cdw10: u32, cdw11: u32| {
        n.submit(0, cmd(GET_FEATURES, 0, 0, &[cdw10, cdw11]))
    };
    let set = |n: &mut NvmeClient, fid: u32, cdw11: u32| {
        n.submit(0, cmd(SET_FEATURES, 0, 0, &[fid, cdw11]))
    };
    // Interrupt Vector Configuration (09h): vector 1, the one the I/O queue uses
    let c = set(&mut n, 0x09, 1 | (1 << 16));
    assert_eq!(code(c), SUCCESS, "Set 09h IV 1 CD: {c:?}");
    let c = get(&mut n, 0x09, 1);
    assert_eq!((code(c), c.dw0), (SUCCESS, 0x1_0001), "current: {c:?}");
    for sel in [1, 2] {
        let c = get(&mut n, 0x09 | (sel << 8), 1);
        assert_eq!(
            (code(c), c.dw0),
            (SUCCESS, 0x1),
            "select {sel} (default, saved)"
        );
    }
    let c = get(&mut n, 0x09 | (3 << 8), 1);
    assert_eq!(
        (code(c), c.dw0 & 0b111),
        (SUCCESS, 0b100),
        "changeable, not saveable"
    );
    let c = get(&mut n, 0x09, 0);
    assert_eq!(
        (code(c), c.dw0),
        (SUCCESS, 0x1_0000),
        "the admin vector is never coalesced"
    );
    assert_eq!(code(set(&mut n, 0x09, 1)), SUCCESS, "CD cleared again");
    assert_eq!(get(&mut n, 0x09, 1).dw0, 0x1);
    assert_eq!(
        code(set(&mut n, 0x09, 128 | (1 << 16))),
        SUCCESS,
        "last MSI-X vector"
    );
    for (what, c) in [
        ("Set IV 0 (admin)", set(&mut n, 0x09, 1 << 16)),
        ("Set IV past the MSI-X table", set(&mut n, 0x09, 129)),
        ("Get IV past the MSI-X table", get(&mut n, 0x09, 129)),
        ("Set with SV", set(&mut n, 0x09 | (1 << 31), 1)),
    ] {
        let want = if what == "Set with SV" {
            0x10d
        } else {
            INVALID_FIELD
        };
        assert_eq!(code(c), want, "{what}: {c:?}");
        assert!(c.status & DNR != 0, "{what}: DNR");
    }
    // Interrupt Coalescing (08h): what was set is current; default and saved stay the
    // daemon's power-on value (16 entries / 200 us)
    let c = set(&mut n, 0x08, 0x0a03);
    assert_eq!(code(c), SUCCESS);
    assert_eq!(get(&mut n, 0x08, 0).dw0, 0x0a03, "current");
    assert_eq!(get(&mut n, 0x08 | (1 << 8), 0).dw0, 0x020f, "default");
    assert_eq!(
        get(&mut n, 0x08 | (2 << 8), 0).dw0,
        0x020f,
        "saved = default"
    );
    // APST (0Ch; APSTA 0), Timestamp (0Eh; ONCS bit 6 clear), vendor specific: Invalid Field
    let mut id = vec![0u8; 4096];
    assert!(n.submit(0, cmd(0x06, 0, OUT, &[1])).ok());
    n.mem_read(OUT, &mut id);
    assert_eq!(id[265], 0, "APSTA");
    for fid in [0x0c, 0x0e, 0xc0, 0xc1, 0xfe, 0xff] {
        for (what, c) in [
            ("Get", get(&mut n, fid, 0)),
            ("Get supported capabilities", get(&mut n, fid | (3 << 8), 0)),
            ("Set", set(&mut n, fid, 1)),
        ] {
            assert_eq!(code(c), INVALID_FIELD, "{what} {fid:#x}: {c:?}");
            assert!(c.status & DNR != 0);
        }
    }
    // vendor specific log pages: Invalid Log Page
    for lid in [0xc0_u32, 0xc2, 0xca, 0xff] {
        let c = n.submit(0, cmd(0x02, 0xffff_ffff, OUT, &[lid | (127 << 16)]));
        assert_eq!(code(c), INVALID_LOG_PAGE, "log {lid:#x}: {c:?}");
    }
    // and I/O still completes on vector 1's queue
    assert!(n.submit(1, at(READ, 0, 8)).ok());
    drop(n);
    d.stop().unwrap();
}

/// Get LBA Status (Action Type 11h) of namespace 1 from `slba` on: (CMPC, (DSLBA, NLB)...).
fn lba_status(n: &mut NvmeClient, slba: u32) -> (u8, Vec<(u64, u32)>) {
    n.mem_fill(OUT, 4096, 0xee);
    let c = n.submit(0, cmd(GET_LBA_STATUS, 1, OUT, &[slba, 0, 1023, 0x11 << 24]));
    assert_eq!(code(c), SUCCESS, "Get LBA Status: {c:?}");
    let mut page = vec![0u8; 4096];
    n.mem_read(OUT, &mut page);
    let nlsd = u32::from_le_bytes(page[0..4].try_into().unwrap()) as usize;
    let descs = (0..nlsd)
        .map(|k| {
            let d = &page[8 + 16 * k..24 + 16 * k];
            let lba = u64::from_le_bytes(d[0..8].try_into().unwrap());
            (lba, u32::from_le_bytes(d[8..12].try_into().unwrap()))
        })
        .collect();
    (page[4], descs)
}

#[test]
fn write_uncorrectable_verify_and_get_lba_status() {
    let (d, sock) = daemon("uncor");
    let mut n = NvmeClient::connect(&sock);
    n.create_io_queues();
    // Identify: ONCS bits 1 (Write Uncorrectable) and 7 (Verify), OACS bit 9 (Get LBA
    // Status); the NVM command set's Identify Controller reports VSL = MDTS
    let mut id = vec![0u8; 4096];
    assert!(n.submit(0, cmd(0x06, 0, OUT, &[1])).ok());
    n.mem_read(OUT, &mut id);
    let oacs = u16::from_le_bytes([id[256], id[257]]);
    let oncs = u16::from_le_bytes([id[520], id[521]]);
    assert!(oacs & (1 << 9) != 0, "OACS {oacs:#x}");
    assert!(
        oncs & (1 << 1) != 0 && oncs & (1 << 7) != 0,
        "ONCS {oncs:#x}"
    );
    let mdts = id[77];
    assert!(n.submit(0, cmd(0x06, 0, OUT, &[6])).ok());
    n.mem_read(OUT, &mut id);
    assert_eq!(id[0], mdts, "VSL");
    // the Commands Supported and Effects log lists them
    assert!(n.submit(0, cmd(0x02, 0, OUT, &[0x05 | (1023 << 16)])).ok());
    n.mem_read(OUT, &mut id);
    let effect =
        |base: usize, op: usize| u32::from_le_bytes(id[base + 4 * op..][..4].try_into().unwrap());
    assert_eq!(effect(0, 0x86) & 1, 1, "Get LBA Status supported");
    assert_eq!(effect(1024, 0x04), 0b11, "Write Uncorrectable: CSUPP, LBCC");
    assert_eq!(effect(1024, 0x0c), 1, "Verify: CSUPP");

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 253) as u8 | 1).collect();
    n.mem_write(BUF, &pattern);
    assert!(n.submit(1, at(WRITE, 0, 16)).ok());
    let c = n.submit(1, at(WRITE_UNCOR, 8, 8));
    assert_eq!(code(c), SUCCESS, "{c:?}");
    let blocks = 16 << 11; // 16 MiB of 512-byte blocks
    assert_eq!(
        code(n.submit(1, at(WRITE_UNCOR, blocks - 1, 2))),
        LBA_OUT_OF_RANGE
    );
    for (what, sqe, want) in [
        ("read", at(READ, 8, 8), UNRECOVERED_READ),
        ("read across the start", at(READ, 0, 9), UNRECOVERED_READ),
        ("read before", at(READ, 0, 8), SUCCESS),
        ("compare", at(COMPARE, 8, 8), UNRECOVERED_READ),
        ("verify", at(VERIFY, 15, 1), UNRECOVERED_READ),
        ("verify before", at(VERIFY, 0, 8), SUCCESS),
        ("verify after", at(VERIFY, 16, 100), SUCCESS),
        (
            "verify past the end",
            at(VERIFY, blocks - 1, 2),
            LBA_OUT_OF_RANGE,
        ),
        (
            "verify beyond VSL (1 MiB)",
            at(VERIFY, 0, 2048),
            INVALID_FIELD,
        ),
        (
            "verify of an absent namespace",
            cmd(VERIFY, 5, 0, &[0, 0, 0]),
            INVALID_NAMESPACE,
        ),
    ] {
        let c = n.submit(1, sqe);
        assert_eq!(code(c), want, "{what}: {c:?}");
    }
    assert_eq!(lba_status(&mut n, 0), (2, vec![(8, 8)]));
    assert_eq!(lba_status(&mut n, 12), (2, vec![(12, 4)]));
    for (what, cdws, want) in [
        ("action type 02h", [0, 0, 1023, 0x02 << 24], INVALID_FIELD),
        (
            "SLBA past the end",
            [blocks, 0, 1023, 0x11 << 24],
            LBA_OUT_OF_RANGE,
        ),
        ("scan untracked", [0, 0, 1023, 0x10 << 24], SUCCESS),
    ] {
        let c = n.submit(0, cmd(GET_LBA_STATUS, 1, OUT, &cdws));
        assert_eq!(code(c), want, "Get LBA Status, {what}: {c:?}");
    }
    // LBA Status Information log page
    assert!(n.submit(0, cmd(0x02, 0, OUT, &[0x0e | (15 << 16)])).ok());
    let mut log = vec![0u8; 64];
    n.mem_read(OUT, &mut log);
    let dw = |o: usize| u32::from_le_bytes(log[o..o + 4].try_into().unwrap());
    assert_eq!(
        [dw(0), dw(4), dw(8), dw(16), dw(20), dw(32), dw(40)],
        [48, 1, 8, 1, 1, 8, 8]
    );

    // a Write clears what it writes, and the data is what it wrote
    assert!(n.submit(1, cmd(WRITE, 1, BUF + 4096, &[8, 0, 3])).ok());
    n.mem_fill(OUT, 2048, 0);
    assert!(n.submit(1, cmd(READ, 1, OUT, &[8, 0, 3])).ok());
    let mut back = vec![0u8; 2048];
    n.mem_read(OUT, &mut back);
    assert_eq!(back, pattern[4096..6144]);
    assert_eq!(code(n.submit(1, at(READ, 12, 1))), UNRECOVERED_READ);
    // Write Zeroes, then a deallocation, clear the rest
    assert!(n.submit(1, at(WRITE_ZEROES, 12, 2)).ok());
    assert!(n.submit(1, at(READ, 12, 2)).ok());
    assert_eq!(lba_status(&mut n, 0), (2, vec![(14, 2)]));
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&2u32.to_le_bytes());
    range[8..16].copy_from_slice(&14u64.to_le_bytes());
    n.mem_write(OUT, &range);
    assert!(n.submit(1, cmd(DSM, 1, OUT, &[0, 1 << 2])).ok());
    assert!(n.submit(1, at(READ, 0, 16)).ok());
    assert!(n.submit(1, at(VERIFY, 0, 16)).ok());
    assert_eq!(lba_status(&mut n, 0), (2, vec![]));
    drop(n);
    d.stop().unwrap();
}
