//! vnvme's NVMe/TCP initiator and target against each other on loopback, and each against
//! a peer that breaks the protocol:
//! - I/O with header and data digests through a vfio-user front whose namespace is an
//!   `nvme-tcp://` backend on vnvme's own target: perf --verify passes;
//! - malformed, truncated and out-of-order PDUs sent to the target: each gets a C2HTermReq
//!   with the right FES and a closed connection (or, for command-level errors, an error
//!   response), while a perf session on another connection keeps running without errors;
//! - Connect errors: unknown NQN, bad queue size, more associations than controllers,
//!   commands before Connect; Keep Alive timeout ends an idle association;
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
        let t = self
            .read()
            .unwrap_or_else(|| panic!("{case}: closed without a TermReq"));
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
    let front = front(tmp.path(), addr, "hdgst&ddgst&nr_io_queues=3");
    let sock = tmp.path().join("f.sock");
    let r = perf(&sock, 2.0, 16384);
    assert!(
        r.ios > 100 && r.errors == 0 && r.verify_failures == 0,
        "{r:?}"
    );

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
    assert_eq!(
        (status(&r).sct(), status(&r).sc()),
        (1, 0x82),
        "unknown NQN"
    );
    assert_eq!(r.dw0.get(), 1 | (256 << 16), "IATTR data, IPO 256 (SUBNQN)");
    let r = c.connect(NQN, 0, 0, 0);
    assert_eq!(r.dw0.get(), 44 << 16, "SQSIZE 0 refused at its offset");
    // a second host gets the subsystem's second controller; a third finds none free
    let r = c.connect(NQN, 0, 31, 0);
    assert!(
        status(&r).is_success(),
        "second association: {:?}",
        status(&r)
    );
    assert_eq!(r.dw0.get() & 0xffff, 0x101, "the second controller's ID");
    let mut c3 = Raw::new(addr);
    c3.ic(0);
    let r = c3.connect(NQN, 0, 31, 0);
    assert_eq!(
        (status(&r).sct(), status(&r).sc()),
        (1, 0x81),
        "a third association with two controllers"
    );
    drop(c);

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

/// A misbehaving-target case: name, answer to ICReq, answer to Connect, expected error.
type Case = (&'static str, Option<Vec<u8>>, Option<Vec<u8>>, &'static str);

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
    let cases: Vec<Case> = vec![
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
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{case}: {:?}",
            t.elapsed()
        );
    }
}

/// A TCP proxy to `to` that can be cut: `kill` closes every connection and stops
/// listening, as a failed network path would.
struct Proxy {
    addr: SocketAddr,
    kill: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn proxy(to: SocketAddr) -> Proxy {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let kill = Arc::new(AtomicBool::new(false));
    let k = Arc::clone(&kill);
    std::thread::spawn(move || {
        let mut socks: Vec<TcpStream> = Vec::new();
        while !k.load(Ordering::Acquire) {
            match l.accept() {
                Ok((a, _)) => {
                    a.set_nonblocking(false).unwrap();
                    let b = TcpStream::connect(to).unwrap();
                    for (mut from, mut into) in [
                        (a.try_clone().unwrap(), b.try_clone().unwrap()),
                        (b.try_clone().unwrap(), a.try_clone().unwrap()),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut into);
                            let _ = into.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    socks.push(a);
                    socks.push(b);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        for s in socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // the listener is dropped here: new connections are refused
    });
    Proxy { addr, kill }
}

#[test]
fn a_failed_path_fails_over_to_the_next_without_errors() {
    let tmp = TempDir::new("tcp-failover");
    let (target, addr) = target();
    let p = proxy(addr);
    let paths = format!("{},{addr}", p.addr);
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{d}/f.sock\"\n[[controller.namespace]]\n\
             backend = \"nvme-tcp://{paths}/{NQN}/1?reconnect_delay=1&ctrl_loss_tmo=30\"\n",
            d = tmp.path().display()
        ),
        Path::new("f.toml"),
    )
    .unwrap();
    let front = Daemon::start(&cfg).expect("front connects through the proxy");
    let sock = tmp.path().join("f.sock");
    let kill = std::sync::Arc::clone(&p.kill);
    let cut = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        kill.store(true, std::sync::atomic::Ordering::Release);
    });
    let r = perf(&sock, 8.0, 8192);
    cut.join().unwrap();
    assert!(
        r.ios > 100 && r.errors == 0 && r.verify_failures == 0,
        "I/O across the path failure: {r:?}"
    );
    // the first path is really gone: the last 6 s of I/O took the second one
    std::thread::sleep(Duration::from_millis(100));
    assert!(TcpStream::connect(p.addr).is_err(), "proxy still listening");
    front.stop().unwrap();
    target.stop().unwrap();
}

#[test]
fn one_subsystem_over_vfio_user_and_nvme_tcp_shares_its_namespace() {
    use device_model::backend::{Backend, IoOp, IoRequest};
    let tmp = TempDir::new("tcp-dual");
    let nqn = "nqn.2026-11.io.vnvme:dual";
    let cfg = Config::parse(
        &format!(
            "[[controller]]\nsocket = \"{d}/dual.sock\"\ntcp_listen = \"127.0.0.1:0\"\nnqn = \"{nqn}\"\n\
             [[controller.namespace]]\nbackend = \"malloc:32M\"\n",
            d = tmp.path().display()
        ),
        Path::new("dual.toml"),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg).expect("both controllers start");
    let addr = daemon.tcp_addrs()[0];
    // write 8 KiB at 1 MiB over NVMe/TCP
    let url: nvmeof::initiator::TcpUrl = format!("nvme-tcp://{addr}/{nqn}/1?nr_io_queues=2")
        .parse()
        .unwrap();
    let mut b = nvmeof::initiator::TcpBackend::connect(&url).expect("NVMe/TCP connect");
    assert_eq!(
        b.io_queues(),
        2,
        "Number of Queues granted and both connected"
    );
    let mut pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 5) as u8).collect();
    let iov = [libc::iovec {
        iov_base: pattern.as_mut_ptr().cast(),
        iov_len: 8192,
    }];
    b.submit(&IoRequest {
        tag: 1,
        op: IoOp::Write { fua: true },
        offset: 1 << 20,
        iov: &iov,
    })
    .unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.is_empty() && t.elapsed() < Duration::from_secs(5) {
        b.poll(&mut |t, s| got.push((t, s)));
    }
    assert_eq!(got, vec![(1, Status::SUCCESS)]);
    // read it back over vfio-user, from the other controller of the subsystem
    let tr = VfioUserTransport::connect(&tmp.path().join("dual.sock")).unwrap();
    let mut c = Controller::new(Box::new(tr), 16 << 20, 2).unwrap();
    assert_eq!(c.identify().cntlid.get(), 1);
    let mut qp = c.create_io_queue_pair(8).unwrap();
    let buf = c.dma().alloc(8192).unwrap();
    qp.read_write(false, 1, 2048, 16, buf.iova(), 8192, 9)
        .unwrap();
    qp.ring();
    let mut done = None;
    let t = Instant::now();
    while done.is_none() && t.elapsed() < Duration::from_secs(5) {
        qp.poll(1, |r| done = Some(r));
    }
    assert!(done.is_some(), "no completion over vfio-user");
    assert_eq!(buf.as_slice(), &pattern[..], "the two controllers disagree");
    // and the other way: what vfio-user zeroes, NVMe/TCP reads as zeroes
    qp.write_zeroes(1, 2048, 16, 10).unwrap();
    qp.ring();
    let mut done = None;
    while done.is_none() {
        qp.poll(1, |r| done = Some(r));
    }
    let mut back = vec![1u8; 8192];
    b.read_sync(1 << 20, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0));
    drop(b);
    drop(qp);
    drop(c);
    daemon.stop().unwrap();
}

impl Raw {
    fn property(&mut self, set: bool, offset: u32, value: u32) -> Completion {
        let mut sqe = fabrics_sqe(if set {
            fctype::PROPERTY_SET
        } else {
            fctype::PROPERTY_GET
        });
        sqe.cid = 8.into();
        sqe.flags = 0x40;
        sqe.prp2 = (0x5au64 << 56).into();
        sqe.cdw11 = offset.into();
        sqe.cdw12 = value.into();
        self.send(&Pdu::CapsuleCmd { sqe, data: &[] });
        self.response()
    }

    fn connect_io(&mut self, cntlid: u16, qid: u16) -> Completion {
        let mut d = ConnectData::default();
        d.cntlid = cntlid.into();
        put_str(&mut d.subnqn, NQN);
        put_str(&mut d.hostnqn, HOST);
        let mut sqe = fabrics_sqe(fctype::CONNECT);
        sqe.cid = 7.into();
        sqe.flags = 0x40;
        sqe.prp2 = (1024u64 | (0x01 << 56)).into();
        sqe.cdw10 = (u32::from(qid) << 16).into();
        sqe.cdw11 = 31.into();
        self.send(&Pdu::CapsuleCmd {
            sqe,
            data: d.as_bytes(),
        });
        self.response()
    }

    /// A Write of `blocks` 512-byte blocks at LBA 0 with command ID `cid`: in-capsule data
    /// when `data` is given, else announced for R2T.
    fn write(&mut self, cid: u16, len: usize, data: Option<&[u8]>) {
        let mut sqe = Submission::default();
        sqe.opcode = 0x01;
        sqe.nsid = 1.into();
        sqe.cid = cid.into();
        sqe.flags = 0x40;
        sqe.cdw12 = ((len / 512 - 1) as u32).into();
        let id: u64 = if data.is_some() { 0x01 } else { 0x5a };
        sqe.prp2 = (len as u64 | (id << 56)).into();
        self.send(&Pdu::CapsuleCmd {
            sqe,
            data: data.unwrap_or(&[]),
        });
    }
}

#[test]
fn io_queue_pdus_out_of_order_or_corrupt_are_refused() {
    let (target, addr) = target();
    // an association by hand: admin queue, enable, one I/O queue with data digests
    let mut admin = Raw::new(addr);
    admin.ic(0);
    let r = admin.connect(NQN, 0, 31, 0);
    assert!(status(&r).is_success());
    let cntlid = r.dw0.get() as u16;
    assert!(status(&admin.property(true, 0x14, 0x0046_0001)).is_success());
    let t = Instant::now();
    while admin.property(false, 0x1c, 0).dw0.get() & 1 == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "CSTS.RDY never set");
    }
    let mut io = Raw::new(addr);
    io.ic(2); // data digest
    assert!(status(&io.connect_io(cntlid, 1)).is_success());

    // in-capsule data with a bad digest: that command fails, the connection stays
    let data = vec![0x5au8; 4096];
    let mut out = Vec::new();
    let mut sqe = Submission::default();
    sqe.opcode = 0x01;
    sqe.nsid = 1.into();
    sqe.cid = 1.into();
    sqe.flags = 0x40;
    sqe.cdw12 = 7.into();
    sqe.prp2 = (4096u64 | (0x01 << 56)).into();
    pdu::encode(&Pdu::CapsuleCmd { sqe, data: &data }, &io.neg, &mut out);
    let last = out.len() - 1;
    out[last] ^= 1;
    io.s.write_all(&out).unwrap();
    let r = io.response();
    assert_eq!(r.cid.get(), 1);
    assert_eq!(status(&r), Status::TRANSIENT_TRANSPORT_ERROR);
    // a good in-capsule write still works
    io.write(2, 4096, Some(&data));
    assert!(status(&io.response()).is_success());
    // H2C data with a bad digest: the write fails once its data is in, nothing hangs
    io.write(5, 4096, None);
    let r2t = io.read().expect("R2T");
    let tt = u16::from_le_bytes([r2t[10], r2t[11]]);
    let mut out = Vec::new();
    pdu::encode(
        &Pdu::H2CData {
            cccid: 5,
            ttag: tt,
            offset: 0,
            data: &data,
            last: true,
        },
        &io.neg,
        &mut out,
    );
    let last = out.len() - 1;
    out[last] ^= 1;
    io.s.write_all(&out).unwrap();
    let r = io.response();
    assert_eq!(
        (r.cid.get(), status(&r)),
        (5, Status::TRANSIENT_TRANSPORT_ERROR)
    );
    // a read whose SGL is shorter than its blocks: refused, no data beyond the 4 KiB
    let mut rd = Submission::default();
    rd.opcode = 0x02;
    rd.nsid = 1.into();
    rd.cid = 6.into();
    rd.flags = 0x40;
    rd.cdw12 = 31.into(); // 32 blocks = 16 KiB
    rd.prp2 = (4096u64 | (0x5a << 56)).into();
    io.send(&Pdu::CapsuleCmd { sqe: rd, data: &[] });
    let r = io.response();
    assert_eq!(
        (r.cid.get(), status(&r)),
        (6, Status::DATA_SGL_LENGTH_INVALID)
    );
    // queue management is Connect's job over a fabric
    let mut mk = Submission::default();
    mk.opcode = 0x01; // Create I/O SQ
    mk.cid = 9.into();
    mk.flags = 0x40;
    mk.prp2 = (0x5au64 << 56).into();
    admin.send(&Pdu::CapsuleCmd { sqe: mk, data: &[] });
    assert_eq!(status(&admin.response()), Status::INVALID_OPCODE);
    // a write by R2T: the target asks for the data, in order
    io.write(3, 8192, None);
    let r2t = io.read().expect("R2T");
    assert_eq!(r2t[0], pdu_type::R2T);
    let ttag = u16::from_le_bytes([r2t[10], r2t[11]]);
    assert_eq!(u32::from_le_bytes(r2t[16..20].try_into().unwrap()), 8192);
    // the same CID again while it is in flight: refused
    io.write(3, 4096, Some(&data));
    assert_eq!(status(&io.response()), Status::CID_CONFLICT);
    // data at the wrong offset: fatal for the connection (and the association)
    io.send(&Pdu::H2CData {
        cccid: 3,
        ttag,
        offset: 4096,
        data: &data,
        last: true,
    });
    io.expect_term(fes::DATA_OUT_OF_RANGE, "H2CData out of order");
    assert!(
        admin.read().is_none(),
        "the association survived a fatal I/O queue error"
    );

    // a fresh association: H2CData beyond the R2T, then one for a tag never given
    let mut admin = Raw::new(addr);
    admin.ic(0);
    let r = admin.connect(NQN, 0, 31, 0);
    assert!(status(&r).is_success(), "{:?}", status(&r));
    assert!(status(&admin.property(true, 0x14, 0x0046_0001)).is_success());
    while admin.property(false, 0x1c, 0).dw0.get() & 1 == 0 {}
    let mut io = Raw::new(addr);
    io.ic(0);
    assert!(status(&io.connect_io(r.dw0.get() as u16, 1)).is_success());
    io.write(4, 4096, None);
    let r2t = io.read().expect("R2T");
    let ttag = u16::from_le_bytes([r2t[10], r2t[11]]);
    io.send(&Pdu::H2CData {
        cccid: 4,
        ttag,
        offset: 0,
        data: &[0; 8192],
        last: true,
    });
    io.expect_term(fes::DATA_OUT_OF_RANGE, "H2CData beyond the R2T");
    target.stop().unwrap();
}
