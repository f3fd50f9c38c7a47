//! The management plane as a user drives it (issue 6): `vnvme serve --rpc` in a process of
//! its own, `vnvme rpc` calls against it, and vfio-user clients that see the effects. Lists
//! controllers with their state, brings VFs up (`vf_enable`), creates, attaches, detaches and
//! deletes namespaces, sets per-controller QoS, creates and deletes a whole subsystem; bad
//! requests get JSON-RPC errors and the daemon keeps answering.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;
use host_driver::transport::vfio_user::VfioUserTransport;
use serde_json::{Value, json};
use vnvme::daemon::vf_socket;
use vnvme::perf::{JobResult, Pattern, PerfOptions};
use vnvme_tests::guest::{TempDir, vnvme_binary};

const NQN: &str = "nqn.2026-11.io.vnvme:rpc-test";

struct Served {
    child: Child,
    bin: PathBuf,
    rpc: PathBuf,
}

impl Served {
    /// `vnvme rpc METHOD ARGS...`: exit status and stdout parsed as JSON (Null on failure)
    /// and stderr.
    fn rpc(&self, method: &str, args: &[&str]) -> (bool, Value, String) {
        let out = Command::new(&self.bin)
            .arg("rpc")
            .arg("-s")
            .arg(&self.rpc)
            .arg(method)
            .args(args)
            .output()
            .expect("vnvme rpc");
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.success(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, method: &str, args: &[&str]) -> Value {
        let (ok, v, err) = self.rpc(method, args);
        assert!(ok, "vnvme rpc {method} {args:?}: {err}");
        v
    }

    /// One raw line to the socket; the parsed answer.
    fn raw(&self, line: &[u8]) -> Value {
        vnvme_tests::rpc::raw(&self.rpc, line, Duration::from_secs(10))
    }

    fn state(&self, cntlid: u16) -> String {
        let list = self.ok("controller_list", &[]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["cntlid"] == cntlid)
            .map(|c| c["state"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vnvme serve` (supervised, or `--unsupervised`) of one controller with a 64 MiB RAM
/// namespace at `c.sock` in `tmp`, its management socket `vnvme.rpc` there: once both are
/// up, and the controller's socket.
fn serve_one(tmp: &TempDir, supervised: bool) -> (Served, PathBuf) {
    let sock = tmp.path().join("c.sock");
    let bin = vnvme_binary();
    let rpc = tmp.path().join("vnvme.rpc");
    let mut cmd = Command::new(&bin);
    cmd.arg("serve");
    if !supervised {
        cmd.arg("--unsupervised");
    }
    let child = cmd
        .arg("--socket")
        .arg(&sock)
        .args(["--ns", "malloc:64M", "--rpc"])
        .arg(&rpc)
        .spawn()
        .expect("vnvme serve");
    let d = Served { child, bin, rpc };
    wait_for(&d.rpc);
    wait_for(&sock);
    (d, sock)
}

/// A client's verified random reads and writes on the controller at `sock` for `secs`, on a
/// thread of its own: the neighbour whose I/O a hostile caller must not disturb.
fn verified_io(sock: &Path, secs: Duration) -> std::thread::JoinHandle<JobResult> {
    let sock = sock.to_owned();
    std::thread::spawn(move || {
        let mut c = open(&sock);
        let opts = PerfOptions {
            queue_depth: 8,
            io_size: 4096,
            pattern: Pattern::Randrw,
            read_percent: 50,
            duration: secs,
            workers: 1,
            verify: true,
            shadow_doorbells: false,
        };
        vnvme::perf::run(&mut c, &opts, |_, _| {}).unwrap().total()
    })
}

/// The neighbour's I/O ran, without an error or a verify failure.
fn assert_clean(io: std::thread::JoinHandle<JobResult>) {
    let r = io.join().unwrap();
    assert!(
        r.ios > 100 && r.errors == 0 && r.verify_failures == 0,
        "the neighbour's verified I/O: {r:?}"
    );
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn open(sock: &Path) -> NvmeDriver {
    let t = VfioUserTransport::connect(sock).expect("connect");
    NvmeDriver::new(Box::new(t), 8 << 20, 4).expect("controller")
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error: {v}"))
}

#[test]
fn a_running_daemon_is_managed_through_vnvme_rpc() {
    let tmp = TempDir::new("rpc");
    let pf = tmp.path().join("pf.sock");
    let cfg = tmp.path().join("vnvme.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[controller]]\nsocket = \"{}\"\nnqn = \"{NQN}\"\nvfs = 2\n\
             namespace_pool = \"malloc:64M\"\n\
             [[controller.namespace]]\nbackend = \"malloc:16M\"\n",
            pf.display()
        ),
    )
    .unwrap();
    let bin = vnvme_binary();
    let rpc = tmp.path().join("vnvme.rpc");
    // the daemon's own management socket, every method of it (the supervisor's, which
    // forwards to it and refuses what it cannot carry, is host_upgrade's)
    let child = Command::new(&bin)
        .args(["serve", "--unsupervised"])
        .arg("--config")
        .arg(&cfg)
        .arg("--rpc")
        .arg(&rpc)
        .spawn()
        .expect("vnvme serve");
    let d = Served { child, bin, rpc };
    wait_for(&d.rpc);

    // controllers and their state: the PF waits for a host, the VFs are offline
    let list = d.ok("controller_list", &[]);
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    assert_eq!(list[0]["kind"], "pf");
    assert_eq!(list[1]["endpoint"], vf_socket(&pf, 1).display().to_string());
    assert_eq!(d.state(1), "disabled");
    assert_eq!(d.state(0x1001), "offline");

    // NumVFs = 1: VF 1 online, a host brings it up
    d.ok("vf_enable", &[&format!("nqn={NQN}"), "count=1"]);
    assert_eq!(d.state(0x1001), "online");
    assert_eq!(d.state(0x1002), "offline");
    let mut v1 = open(&vf_socket(&pf, 1));
    assert_eq!(d.state(0x1001), "ready");

    // a namespace created, attached to VF 1 only, seen there; listed with its attachment
    let r = d.ok(
        "ns_create",
        &[&format!("nqn={NQN}"), "size=8M", "block_size=4096"],
    );
    assert_eq!(r["nsid"], 2);
    d.ok(
        "ns_attach",
        &[&format!("nqn={NQN}"), "nsid=2", "controllers=[4097]"],
    );
    let subs = d.ok("subsystem_list", &[]);
    let ns2 = &subs[0]["namespaces"][1];
    assert_eq!(ns2["attached"], json!([4097]), "{subs}");
    assert_eq!(
        (ns2["size"].as_u64(), ns2["block_size"].as_u64()),
        (Some(8 << 20), Some(4096))
    );
    assert_eq!(subs[0]["unallocated"], 40 << 20);
    v1.reset().unwrap();
    let ids: Vec<u32> = v1.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, [1, 2], "VF 1 after the attach");

    // per-controller QoS at run time: VF 1 held to 500 IOPS
    d.ok("qos_set", &["cntlid=4097", "iops=500"]);
    assert_eq!(d.ok("controller_list", &[])[1]["iops_limit"], 500);
    let opts = PerfOptions {
        queue_depth: 8,
        io_size: 4096,
        pattern: Pattern::Randread,
        read_percent: 100,
        duration: Duration::from_secs(2),
        workers: 1,
        verify: false,
        shadow_doorbells: false,
    };
    let rep = vnvme::perf::run(&mut v1, &opts, |_, _| {}).unwrap();
    let iops = u128::from(rep.total().ios) * 1000 / rep.elapsed.as_millis().max(1);
    assert!(
        (400..=600).contains(&iops),
        "{iops} IOPS under a 500 IOPS limit"
    );
    d.ok("qos_set", &["cntlid=4097"]);
    assert_eq!(d.ok("controller_list", &[])[1]["iops_limit"], Value::Null);

    // detach and delete; the capacity comes back
    d.ok(
        "ns_detach",
        &[&format!("nqn={NQN}"), "nsid=2", "controllers=[4097]"],
    );
    d.ok("ns_delete", &[&format!("nqn={NQN}"), "nsid=2"]);
    assert_eq!(d.ok("subsystem_list", &[])[0]["unallocated"], 48 << 20);
    v1.reset().unwrap();
    assert_eq!(v1.namespaces().len(), 1);
    drop(v1);

    // refusals: vnvme rpc exits 1 with the daemon's reason
    let (ok, _, err) = d.rpc("ns_delete", &[&format!("nqn={NQN}"), "nsid=9"]);
    assert!(!ok && err.contains("no such namespace"), "{err}");
    let (ok, _, err) = d.rpc(
        "ns_attach",
        &[&format!("nqn={NQN}"), "nsid=1", "controllers=[4097]"],
    );
    assert!(!ok && err.contains("already attached"), "{err}");
    let (ok, _, err) = d.rpc("ns_create", &["nqn=nqn.nobody", "size=1M"]);
    assert!(!ok && err.contains("no subsystem"), "{err}");
    let (ok, _, err) = d.rpc("vf_enable", &[&format!("nqn={NQN}"), "count=3"]);
    assert!(!ok && err.contains("has 2 VFs"), "{err}");
    let (ok, _, err) = d.rpc("qos_set", &["cntlid=77", "iops=5"]);
    assert!(!ok && err.contains("CNTLID"), "{err}");

    // garbage on the socket: JSON-RPC errors, and the daemon keeps answering
    assert_eq!(error_code(&d.raw(b"this is not json\n")), -32700);
    assert_eq!(error_code(&d.raw(b"{\"method\": 5}\n")), -32600);
    assert_eq!(
        error_code(&d.raw(b"{\"method\": \"format_everything\"}\n")),
        -32601
    );
    assert_eq!(
        error_code(&d.raw(b"{\"method\": \"ns_attach\", \"params\": {\"nqn\": \"x\", \"nsid\": 1, \"controllers\": \"all\"}}\n")),
        -32602
    );
    assert_eq!(
        error_code(&d.raw(b"{\"method\": \"ns_create\", \"params\": [1]}\n")),
        -32602
    );
    let mut huge = vec![b' '; 2 << 20];
    huge.push(b'\n');
    assert_eq!(error_code(&d.raw(&huge)), -32600);
    let answer = d.raw(b"{\"jsonrpc\": \"2.0\", \"id\": 7, \"method\": \"controller_list\"}\n");
    assert_eq!(
        (
            answer["id"].as_u64(),
            answer["result"].as_array().map(Vec::len)
        ),
        (Some(7), Some(3))
    );

    // a subsystem created and deleted at run time
    let new_sock = tmp.path().join("new.sock");
    let spec = json!({
        "socket": new_sock,
        "nqn": "nqn.2026-11.io.vnvme:made-at-run-time",
        "serial": "RUNTIME1",
        "namespace": [{"backend": "malloc:8M"}],
    });
    let (ok, _, err) = d.rpc(
        "subsystem_create",
        &[&json!({"socket": pf, "namespace": []}).to_string()],
    );
    assert!(
        !ok && err.contains("socket"),
        "a second user of pf.sock: {err}"
    );
    let (ok, _, err) = d.rpc("subsystem_create", &[&json!({"sockett": "x"}).to_string()]);
    assert!(!ok && err.contains("unknown field"), "{err}");
    // a create that fails half way (its namespace cannot be opened) leaves nothing behind
    let broken = json!({
        "socket": tmp.path().join("broken.sock"),
        "nqn": "nqn.2026-11.io.vnvme:broken",
        "namespace": [{"backend": "file:/nonexistent/dir/disk.img"}],
    });
    let (ok, _, err) = d.rpc("subsystem_create", &[&broken.to_string()]);
    assert!(!ok && err.contains("nonexistent"), "{err}");
    assert_eq!(d.ok("subsystem_list", &[]).as_array().unwrap().len(), 1);
    assert_eq!(d.ok("controller_list", &[]).as_array().unwrap().len(), 3);
    let r = d.ok("subsystem_create", &[&spec.to_string()]);
    assert_eq!(r["nqn"], "nqn.2026-11.io.vnvme:made-at-run-time");
    let n = open(&new_sock);
    assert_eq!(n.namespaces().len(), 1);
    assert!(n.identify().sn.starts_with(b"RUNTIME1 "), "serial");
    assert_eq!(d.ok("subsystem_list", &[]).as_array().unwrap().len(), 2);
    drop(n);
    // the first subsystem is still managed by name after the failed and the good create
    let r = d.ok("ns_create", &[&format!("nqn={NQN}"), "size=1M"]);
    assert_eq!(r["nsid"], 2);
    d.ok("ns_delete", &[&format!("nqn={NQN}"), "nsid=2"]);
    d.ok(
        "subsystem_delete",
        &["nqn=nqn.2026-11.io.vnvme:made-at-run-time"],
    );
    assert!(!new_sock.exists(), "socket removed with its subsystem");
    assert_eq!(d.ok("subsystem_list", &[]).as_array().unwrap().len(), 1);
    assert_eq!(d.ok("controller_list", &[]).as_array().unwrap().len(), 3);
    // the first subsystem still serves
    let _pf = open(&pf);
    assert_eq!(d.state(1), "ready");

    // a client trickling a request a byte a second (never idle for the 2 s read timeout)
    // is cut off at the 5 s line deadline: the main thread is free again for others
    let mut slow = UnixStream::connect(&d.rpc).unwrap();
    let t = std::time::Instant::now();
    let mut cut = None;
    for b in b"{\"method\": \"controller_list\"                    "
        .iter()
        .cycle()
        .take(15)
    {
        std::thread::sleep(Duration::from_secs(1));
        if std::io::Write::write_all(&mut slow, &[*b]).is_err() {
            cut = Some(t.elapsed());
            break;
        }
    }
    let mut rest = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let closed = cut.is_some() || std::io::Read::read_to_end(&mut slow, &mut rest).is_ok();
    assert!(closed, "the trickling client is disconnected");
    assert!(
        cut.is_none_or(|c| c < Duration::from_secs(9)),
        "cut off after {cut:?}"
    );
    assert_eq!(d.ok("controller_list", &[]).as_array().unwrap().len(), 3);

    // a second daemon on the live sockets is refused, naming the first; both paths stay
    for args in [
        vec![
            "serve",
            "--socket",
            pf.to_str().unwrap(),
            "--ns",
            "malloc:1M",
        ],
        vec![
            "serve",
            "--socket",
            tmp.path().join("other.sock").to_str().unwrap(),
            "--ns",
            "malloc:1M",
            "--rpc",
            d.rpc.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(&d.bin).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(
            err.contains(&format!("already served by process {}", d.child.id())),
            "{err}"
        );
    }
    assert!(pf.exists() && d.rpc.exists());
    assert_eq!(d.ok("controller_list", &[]).as_array().unwrap().len(), 3);
}

/// A management caller cannot hold the daemon: callers that connect and send nothing or
/// trickle a byte at a time wait on threads of their own, and a real request is answered
/// meanwhile, beside a client's verified I/O; beyond 16 callers at once the next one is told
/// the daemon is busy; when they leave, requests are answered again.
#[test]
fn slow_and_silent_management_callers_hold_up_nobody() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = TempDir::new("rpc-slow");
    let (d, sock) = serve_one(&tmp, true);
    let io = verified_io(&sock, Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = (0..3)
        .map(|_| {
            let mut s = UnixStream::connect(&d.rpc).unwrap();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(b" ").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        })
        .collect();
    let silent: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&d.rpc).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let list = d.ok("controller_list", &[]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered after {:?} behind slow callers",
        t.elapsed()
    );
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    stop.store(true, Ordering::Relaxed);
    for h in tricklers {
        let _ = h.join();
    }
    drop(silent);
    let answered_again = || {
        let t = Instant::now();
        loop {
            let (ok, v, _) = d.rpc("controller_list", &[]);
            if ok {
                assert_eq!(v.as_array().map(Vec::len), Some(1));
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "never answered again"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    answered_again();
    // with 16 callers connected the 17th is told the daemon is busy. The 16 are opened just
    // before it: the socket (the supervisor's) keeps a silent caller 1 s, so the ones held
    // since the start of the test may be gone by now on a loaded machine. The pause lets the
    // threads of the callers just closed finish, so that no slot is still counted for them.
    std::thread::sleep(Duration::from_millis(300));
    let held: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&d.rpc).unwrap())
        .collect();
    let busy = d.raw(b"{\"method\": \"controller_list\"}\n");
    assert_eq!(error_code(&busy), -32000, "{busy}");
    assert!(busy.to_string().contains("busy"), "{busy}");
    drop(held);
    answered_again();
    assert_clean(io);
}

/// One connection may carry many requests, one per line, answered in order (as SPDK's
/// `rpc.py load_config` sends them): on the daemon's own socket and on the supervisor's,
/// which answers some itself and forwards the rest. A bad line is answered and the
/// connection goes on; a blank line is skipped.
#[test]
fn several_requests_on_one_connection_are_each_answered_in_order() {
    for supervised in [true, false] {
        let tmp = TempDir::new("rpc-lines");
        let (d, _) = serve_one(&tmp, supervised);
        let s = UnixStream::connect(&d.rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let first = if supervised {
            "daemon_status"
        } else {
            "controller_list"
        };
        (&s).write_all(
            format!(
                "{{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"{first}\"}}\n\
                 \n\
                 {{\"jsonrpc\": \"2.0\", \"id\": 2, \"method\": \"controller_list\"}}\n\
                 {{not json\n\
                 {{\"jsonrpc\": \"2.0\", \"id\": 4, \"method\": \"no_such_method\"}}\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mut lines = BufReader::new(&s).lines();
        let mut next = || -> Value {
            let l = lines.next().expect("an answer").expect("read");
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
        };
        let a = next();
        assert_eq!(a["id"], 1, "{a}");
        assert!(a.get("result").is_some(), "{a}");
        let a = next();
        assert_eq!(a["id"], 2, "{a}");
        assert_eq!(a["result"].as_array().map(Vec::len), Some(1), "{a}");
        let a = next();
        assert_eq!(error_code(&a), -32700, "{a}");
        let a = next();
        assert_eq!(a["id"], 4, "{a}");
        assert_eq!(error_code(&a), -32601, "{a}");
        // and later on the same connection, after the answers were read
        (&s).write_all(b"{\"jsonrpc\": \"2.0\", \"id\": 5, \"method\": \"controller_list\"}\n")
            .unwrap();
        let a = next();
        assert_eq!(a["id"], 5, "supervised {supervised}: {a}");
    }
}

/// A caller that sends only blank lines (which are skipped, never answered) cannot keep its
/// place: the next request must arrive whole within 5 s of the last answer, blank lines
/// or not. On the daemon's own socket and on the supervisor's, beside a client's verified
/// I/O.
#[test]
fn blank_lines_do_not_keep_a_management_caller_forever() {
    let run = |supervised: bool| {
        std::thread::spawn(move || {
            let tmp = TempDir::new(if supervised {
                "rpc-blank-s"
            } else {
                "rpc-blank-u"
            });
            let (d, sock) = serve_one(&tmp, supervised);
            let io = verified_io(&sock, Duration::from_secs(6));
            let mut s = UnixStream::connect(&d.rpc).unwrap();
            let t = Instant::now();
            let closed = loop {
                if s.write_all(b"\n").is_err() {
                    break t.elapsed();
                }
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "supervised {supervised}: still open after 15 s of blank lines"
                );
                std::thread::sleep(Duration::from_millis(300));
            };
            assert!(
                closed > Duration::from_secs(4),
                "supervised {supervised}: closed after {closed:?}"
            );
            // and the socket serves the next caller
            assert_eq!(
                d.ok("controller_list", &[]).as_array().map(Vec::len),
                Some(1)
            );
            assert_clean(io);
        })
    };
    let (a, b) = (run(true), run(false));
    a.join().unwrap();
    b.join().unwrap();
}
