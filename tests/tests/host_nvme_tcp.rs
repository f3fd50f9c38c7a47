//! vnvme's NVMe/TCP initiator and target against each other on loopback, and each against
//! a peer that breaks the protocol:
//! - I/O with header and data digests through a vfio-user front whose namespace is an
//!   `nvme-tcp://` backend on vnvme's own target: perf --verify passes;
//! - malformed, truncated and out-of-order PDUs sent to the target: each gets a C2HTermReq
//!   with the right FES and a closed connection (or, for command-level errors, an error
//!   response), while a perf session on another connection keeps running without errors;
//! - Connect errors: unknown NQN, bad queue size, a second association, commands before
//!   Connect; Keep Alive timeout ends an idle association;
//! - the initiator against a scripted misbehaving target: each case fails with a clear
//!   error in bounded time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use host_driver::Controller;
use host_driver::transport::vfio_user::VfioUserTransport;
use nvme_spec::fabrics::{ConnectData, fctype, put_str};
use nvme_spec::tcp::{fes, pdu_type};
use nvme_spec::{Completion, Status, Submission};
use nvmeof::initiator::queue::{ConnectParams, HostQueue, fabrics_sqe};
use nvmeof::pdu::{self, Negotiated, Pdu};
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme::perf::{Pattern, PerfOptions};
use vnvme_tests::guest::TempDir;
use zerocopy::{FromBytes, IntoBytes};

const NQN: &str = "nqn.2026-11.io.vnvme:loopback";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

fn target() -> (Daemon, SocketAddr) {
    let cfg = Config::parse(
        &format!(
            "[[controller]]\ntcp_listen = \"127.0.0.1:0\"\nnqn = \"{NQN}\"\n\
             [[controller.namespace]]\nbackend = \"malloc:64M\"\n"
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let d = Daemon::start(&cfg).expect("target");
    let a = d.tcp_addrs()[0];
    (d, a)
}

fn front(dir: &Path, addr: SocketAddr, opts: &str) -> Daemon {
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{d}/f.sock\"\n\
             [[controller.namespace]]\nbackend = \"nvme-tcp://{addr}/{NQN}/1?{opts}\"\n",
            d = dir.display()
        ),
        Path::new("f.toml"),
    )
    .unwrap();
    Daemon::start(&cfg).expect("front connects to the target")
}

fn perf(sock: &Path, secs: f64, io_size: u64) -> vnvme::perf::JobResult {
    let t = VfioUserTransport::connect(sock).expect("connect");
    let mut c = Controller::new(Box::new(t), 32 << 20, 2).expect("bring-up");
    let opts = PerfOptions {
        queue_depth: 32,
        io_size,
        pattern: Pattern::Randrw,
        read_percent: 50,
        duration: Duration::from_secs_f64(secs),
        workers: 1,
        verify: true,
    };
    vnvme::perf::run(&mut c, &opts, |_, _| {})
        .expect("perf runs")
        .total()
}

/// A hand-driven host connection.
struct Raw {
    s: TcpStream,
    neg: Negotiated,
}

impl Raw {
    fn new(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self {
            s,
            neg: Negotiated::default(),
        }
    }

    fn send(&mut self, p: &Pdu<'_>) {
        let mut out = Vec::new();
        pdu::encode(p, &self.neg, &mut out);
        self.s.write_all(&out).unwrap();
    }

    /// The next PDU's bytes, or None at end of stream.
    fn read(&mut self) -> Option<Vec<u8>> {
        let mut h = [0u8; 8];
        if self.s.read_exact(&mut h).is_err() {
            return None;
        }
        let plen = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; plen - 8];
        self.s.read_exact(&mut rest).ok()?;
        let mut all = h.to_vec();
        all.extend(rest);
        Some(all)
    }

    fn ic(&mut self, dgst: u8) {
        self.send(&Pdu::IcReq {
            pfv: 0,
            hpda: 0,
            dgst,
            maxr2t: 0,
        });
        let r = self.read().expect("ICResp");
        assert_eq!(r[0], pdu_type::IC_RESP);
        self.neg = Negotiated {
            header_digest: dgst & 1 != 0,
            data_digest: dgst & 2 != 0,
            max_data: 1 << 20,
        };
    }

    /// Expect a C2HTermReq with `want` FES, then the end of the stream.
    fn expect_term(&mut self, want: u16, case: &str) {
        let t = self.read().unwrap_or_else(|| panic!("{case}: closed without a TermReq"));
        assert_eq!(t[0], pdu_type::C2H_TERM_REQ, "{case}: {t:?}");
        let got = u16::from_le_bytes([t[8], t[9]]);
        assert_eq!(got, want, "{case}: FES");
        assert!(self.read().is_none(), "{case}: connection left open");
    }

    fn response(&mut self) -> Completion {
        let r = self.read().expect("CapsuleResp");
        assert_eq!(r[0], pdu_type::CAPSULE_RESP, "{r:?}");
        Completion::read_from_bytes(&r[8..24]).unwrap()
    }

    fn connect(&mut self, subnqn: &str, qid: u16, sqsize: u32, kato_ms: u32) -> Completion {
        let mut d = ConnectData::default();
        d.cntlid = 0xffff.into();
        put_str(&mut d.subnqn, subnqn);
        put_str(&mut d.hostnqn, HOST);
        let mut sqe = fabrics_sqe(fctype::CONNECT);
        sqe.cid = 7.into();
        sqe.flags = 0x40;
        sqe.prp2 = (1024u64 | (0x01 << 56)).into();
        sqe.cdw10 = (u32::from(qid) << 16).into();
        sqe.cdw11 = sqsize.into();
        sqe.cdw12 = kato_ms.into();
        self.send(&Pdu::CapsuleCmd {
            sqe,
            data: d.as_bytes(),
        });
        self.response()
    }
}

fn status(c: &Completion) -> Status {
    Status::from_cqe_bits(c.status.get())
}

#[test]
fn loopback_io_with_digests_and_malformed_pdus_on_the_side() {
    let tmp = TempDir::new("tcp-loop");
    let (target, addr) = target();
    let front = front(tmp.path(), addr, "hdgst&ddgst");
    let sock = tmp.path().join("f.sock");
    let r = perf(&sock, 2.0, 16384);
    assert!(r.ios > 100 && r.errors == 0 && r.verify_failures == 0, "{r:?}");

    // a session runs while bad peers come and go
    let s2 = sock.clone();
    let session = std::thread::spawn(move || perf(&s2, 5.0, 8192));
    std::thread::sleep(Duration::from_millis(300));

    let mut c = Raw::new(addr);
    c.s.write_all(&[0xff, 0, 8, 0, 8, 0, 0, 0]).unwrap();
    c.expect_term(fes::INVALID_HEADER_FIELD, "unknown PDU type");

    let mut c = Raw::new(addr);
    c.send(&Pdu::CapsuleCmd {
        sqe: Submission::default(),
        data: &[],
    });
    c.expect_term(fes::PDU_SEQUENCE_ERROR, "command before ICReq");

    let mut c = Raw::new(addr);
    c.send(&Pdu::IcReq {
        pfv: 1,
        hpda: 0,
        dgst: 0,
        maxr2t: 0,
    });
    c.expect_term(fes::UNSUPPORTED_PARAMETER, "ICReq PFV 1");

    let mut c = Raw::new(addr);
    c.ic(0);
    c.send(&Pdu::IcReq {
        pfv: 0,
        hpda: 0,
        dgst: 0,
        maxr2t: 0,
    });
    c.expect_term(fes::PDU_SEQUENCE_ERROR, "second ICReq");

    let mut c = Raw::new(addr);
    c.ic(0);
    c.send(&Pdu::H2CData {
        cccid: 1,
        ttag: 0,
        offset: 0,
        data: &[0; 512],
        last: true,
    });
    c.expect_term(fes::PDU_SEQUENCE_ERROR, "H2CData before Connect");

    let mut c = Raw::new(addr);
    c.ic(0);
    // a capsule claiming 64 MiB
    let mut h = [0u8; 8];
    h[0] = pdu_type::CAPSULE_CMD;
    h[2] = 72;
    h[3] = 72;
    h[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
    c.s.write_all(&h).unwrap();
    let t = c.read().expect("TermReq for an oversized PDU");
    assert_eq!(t[0], pdu_type::C2H_TERM_REQ);
    assert!(c.read().is_none());

    let mut c = Raw::new(addr);
    c.ic(1); // header digest on
    let mut out = Vec::new();
    pdu::encode(
        &Pdu::CapsuleCmd {
            sqe: Submission::default(),
            data: &[],
        },
        &c.neg,
        &mut out,
    );
    let last = out.len() - 1;
    out[last] ^= 0xff;
    c.s.write_all(&out).unwrap();
    c.expect_term(fes::HEADER_DIGEST_ERROR, "bad header digest");

    let mut c = Raw::new(addr);
    c.ic(0);
    c.s.write_all(&[pdu_type::CAPSULE_CMD, 0, 72, 0, 72, 0, 0, 0, 1, 2, 3])
        .unwrap();
    drop(c); // truncated, then gone

    // command-level errors: answered, connection kept
    let mut c = Raw::new(addr);
    c.ic(0);
    let mut sqe = Submission::default();
    sqe.opcode = 0x06;
    sqe.cid = 3.into();
    sqe.flags = 0x40;
    sqe.prp2 = (0x5au64 << 56).into();
    c.send(&Pdu::CapsuleCmd { sqe, data: &[] });
    assert_eq!(status(&c.response()), Status::COMMAND_SEQUENCE_ERROR);
    let r = c.connect("nqn.2026-11.io.vnvme:nobody", 0, 31, 0);
    assert_eq!((status(&r).sct(), status(&r).sc()), (1, 0x82), "unknown NQN");
    assert_eq!(r.dw0.get(), 1 | (256 << 16), "IATTR data, IPO 256 (SUBNQN)");
    let r = c.connect(NQN, 0, 0, 0);
    assert_eq!(r.dw0.get(), 44 << 16, "SQSIZE 0 refused at its offset");
    let r = c.connect(NQN, 0, 31, 0);
    assert_eq!(
        (status(&r).sct(), status(&r).sc()),
        (1, 0x81),
        "a second association while the front holds one"
    );

    let r = session.join().unwrap();
    assert!(
        r.ios > 100 && r.errors == 0 && r.verify_failures == 0,
        "the good session suffered: {r:?}"
    );
    // the target still serves discovery after all that
    let recs = nvmeof::initiator::discover(&addr.to_string(), Duration::from_secs(5)).unwrap();
    assert!(recs.iter().any(|r| r.subnqn == NQN));

    // keep alive: an association without traffic ends after KATO
    front.stop().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Raw::new(addr);
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.ic(0);
    let r = c.connect(NQN, 0, 31, 1000);
    assert!(status(&r).is_success(), "{:?}", status(&r));
    let t = Instant::now();
    assert!(c.read().is_none(), "association outlived its keep alive");
    let waited = t.elapsed();
    assert!(
        waited > Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    target.stop().unwrap();
}

/// A target that answers the first PDU with `reply` (or not at all).
fn fake_target(reply: Option<Vec<u8>>, second: Option<Vec<u8>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 128];
        let _ = s.read_exact(&mut buf); // ICReq
        if let Some(r) = reply {
            let _ = s.write_all(&r);
        }
        if let Some(r) = second {
            let mut cmd = [0u8; 72 + 1024];
            let _ = s.read_exact(&mut cmd); // Connect capsule
            let _ = s.write_all(&r);
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    a
}

fn encoded(p: &Pdu<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    pdu::encode(p, &Negotiated::default(), &mut out);
    out
}

#[test]
fn initiator_refuses_a_misbehaving_target_in_bounded_time() {
    let ic_ok = encoded(&Pdu::IcResp {
        pfv: 0,
        cpda: 0,
        dgst: 0,
        maxh2cdata: 65536,
    });
    let mut resp = Completion::default();
    resp.cid = 999.into();
    let cases: Vec<(&str, Option<Vec<u8>>, Option<Vec<u8>>, &str)> = vec![
        (
            "terminates at once",
            Some(encoded(&Pdu::TermReq {
                fes: fes::UNSUPPORTED_PARAMETER,
                fei: 0,
                header: &[],
            })),
            None,
            "terminated",
        ),
        (
            "ICResp with PFV 1",
            Some(encoded(&Pdu::IcResp {
                pfv: 1,
                cpda: 0,
                dgst: 0,
                maxh2cdata: 65536,
            })),
            None,
            "format version",
        ),
        (
            "a digest nobody asked for",
            Some(encoded(&Pdu::IcResp {
                pfv: 0,
                cpda: 0,
                dgst: 3,
                maxh2cdata: 65536,
            })),
            None,
            "digest",
        ),
        ("silence", None, None, "timed out"),
        (
            "response to a command never sent",
            Some(ic_ok.clone()),
            Some(encoded(&Pdu::CapsuleResp { cqe: resp })),
            "not in flight",
        ),
        (
            "data for a write",
            Some(ic_ok),
            Some(encoded(&Pdu::C2HData {
                cccid: 0,
                offset: 0,
                data: &[0; 16],
                last: true,
                success: true,
            })),
            "not reading",
        ),
    ];
    for (case, first, second, want) in cases {
        let addr = fake_target(first, second);
        let p = ConnectParams {
            addr,
            subnqn: NQN.into(),
            hostnqn: HOST.into(),
            hostid: [0; 16],
            header_digest: false,
            data_digest: false,
            timeout: Duration::from_secs(1),
        };
        let t = Instant::now();
        let e = HostQueue::connect(&p, 0, 32, 0xffff, 0).expect_err(case);
        assert!(
            e.to_string().contains(want),
            "{case}: error {e} does not say {want:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{case}: {:?}", t.elapsed());
    }
}
