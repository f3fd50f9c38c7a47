//! Logical volumes (issue 19) through the whole stack, host side:
//! - a thin volume's namespace: Identify NSFEAT thin bit, NUSE growing with writes; the
//!   store fills: writes get Capacity Exceeded (not an I/O error), the SMART log warns,
//!   deallocating returns clusters and writes work again; hostile RPCs get clear errors;
//! - a snapshot taken during `perf --verify` writes: no error, the clone reads exactly the
//!   snapshot's image, the snapshot can be deleted before its clone; `lvs-check` is clean;
//! - `kill -9` during writes: restarted, the store loads, `lvs-check` is clean, every
//!   flushed write reads back and unflushed blocks hold old or new data, never garbage.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest};
use host_driver::transport::vfio_user::VfioUserTransport;
use host_driver::{IoQueuePair, NvmeDriver};
use nvme_spec::opcode::admin as op;
use nvme_spec::{Status, Submission};
use serde_json::{Value, json};
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme::perf::{Pattern, PerfOptions};
use vnvme_tests::guest::{TempDir, vnvme_binary};

const MIB: u64 = 1 << 20;

fn toml(dir: &Path, store_mb: u64, volumes: &str, namespaces: &[&str]) -> String {
    let mut s = format!(
        "[[lvstore]]\nname = \"pool\"\nbackend = \"file:{}/pool.img:{store_mb}M\"\n\
         cluster_size = \"1M\"\nwarn_percent = 80\n{volumes}\
         [[controller]]\nsocket = \"{}/l.sock\"\n",
        dir.display(),
        dir.display()
    );
    for n in namespaces {
        let _ = writeln!(s, "[[controller.namespace]]\nbackend = \"{n}\"");
    }
    s
}

fn rpc(d: &mut Daemon, method: &str, p: &Value) -> Result<Value, String> {
    vnvme::rpc::methods::call(d, method, p).map_err(|e| e.message)
}

fn connect(sock: &Path) -> (NvmeDriver, IoQueuePair) {
    let t = VfioUserTransport::connect(sock).expect("connect");
    let mut c = NvmeDriver::new(Box::new(t), 16 << 20, 1).expect("bring-up");
    let qp = c.create_io_queue_pair(64).expect("queue pair");
    (c, qp)
}

/// Submit with `f`, ring, wait for the completion.
fn wait(
    qp: &mut IoQueuePair,
    f: impl FnOnce(&mut IoQueuePair) -> Result<u16, host_driver::DriverError>,
) -> Status {
    f(qp).expect("submit");
    qp.ring();
    let t = Instant::now();
    loop {
        let mut got = None;
        qp.poll(1, |r| got = Some(r.status));
        if let Some(s) = got {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no completion");
    }
}

fn identify_ns(c: &mut NvmeDriver, nsid: u32) -> Vec<u8> {
    let buf = c.dma().alloc(4096).unwrap();
    let mut sqe = Submission::default();
    sqe.opcode = op::IDENTIFY;
    sqe.nsid = nsid.into();
    c.admin_command("Identify", sqe, Some((buf.iova(), 4096)))
        .expect("identify");
    buf.as_slice()[..4096].to_vec()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn smart_critical_warning(c: &mut NvmeDriver) -> u8 {
    let buf = c.dma().alloc(4096).unwrap();
    let mut sqe = Submission::default();
    sqe.opcode = op::GET_LOG_PAGE;
    sqe.nsid = u32::MAX.into();
    sqe.cdw10 = (0x02 | (127 << 16)).into();
    c.admin_command("Get Log Page", sqe, Some((buf.iova(), 512)))
        .expect("SMART log");
    buf.as_slice()[0]
}

#[test]
fn a_thin_volume_shows_its_use_fills_with_capacity_exceeded_and_recovers() {
    let tmp = TempDir::new("lvol-thin");
    let vols = "[[lvstore.volume]]\nname = \"thin\"\nsize = \"256M\"\nthin = true\n\
                [[lvstore.volume]]\nname = \"thick\"\nsize = \"8M\"\n";
    let text = toml(tmp.path(), 64, vols, &["lvol:pool/thin", "lvol:pool/thick"]);
    let cfg = Config::parse(&text, Path::new("l.toml")).unwrap();
    let mut d = Daemon::start(&cfg).expect("daemon with a volume store");
    let (mut c, mut qp) = connect(&tmp.path().join("l.sock"));
    let id = identify_ns(&mut c, 1);
    assert_eq!(id[24] & 1, 1, "NSFEAT thin provisioning");
    assert_eq!(
        (u64_at(&id, 0), u64_at(&id, 16)),
        ((256 * MIB) / 512, 0),
        "NSZE, NUSE"
    );
    assert!(
        u64_at(&id, 8) < u64_at(&id, 0),
        "NCAP is what the store can give"
    );
    assert_eq!(identify_ns(&mut c, 2)[24] & 1, 0, "thick");

    let mut buf = c.dma().alloc(MIB).unwrap();
    buf.as_mut_slice().fill(0x5a);
    let st = wait(&mut qp, |q| {
        q.read_write(true, 1, 8192, 8, buf.iova(), 4096, 1)
    });
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(
        u64_at(&identify_ns(&mut c, 1), 16),
        MIB / 512,
        "NUSE: one cluster"
    );

    // fill the store (128 KiB writes): every write succeeds or gets Capacity Exceeded
    const CHUNK: u64 = 128 << 10;
    let mut written = 0u64;
    let full = loop {
        let lba = written / 512;
        let st = wait(&mut qp, |q| {
            q.read_write(true, 1, lba, (CHUNK / 512) as u32, buf.iova(), CHUNK, 2)
        });
        if st != Status::SUCCESS {
            break st;
        }
        written += CHUNK;
        assert!(written < 256 * MIB, "never full");
    };
    let written = written / MIB;
    assert_eq!(
        full,
        Status::CAPACITY_EXCEEDED,
        "a full store: Capacity Exceeded (81h)"
    );
    assert!(written > 40, "{written} MiB before full");
    assert_eq!(
        smart_critical_warning(&mut c) & 1,
        1,
        "SMART: spare below threshold"
    );
    let pools = rpc(&mut d, "lvs_list", &json!({})).unwrap();
    assert_eq!(pools[0]["clusters_free"], 0, "{pools}");
    // the thick volume still writes: its clusters are its own
    assert_eq!(
        wait(&mut qp, |q| q.read_write(
            true,
            2,
            0,
            8,
            buf.iova(),
            4096,
            3
        )),
        Status::SUCCESS
    );
    // deallocate 16 MiB of the thin volume: writes work again
    let st = wait(&mut qp, |q| {
        q.write_zeroes_deallocate(1, 0, (16 * MIB / 512) as u32, 4)
    });
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(wait(&mut qp, |q| q.flush(1, 5)), Status::SUCCESS);
    let lba = (written * MIB) / 512;
    assert_eq!(
        wait(&mut qp, |q| q.read_write(
            true,
            1,
            lba,
            256,
            buf.iova(),
            CHUNK,
            6
        )),
        Status::SUCCESS
    );
    let list = rpc(&mut d, "lvol_list", &json!({})).unwrap();
    let thin = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pool/thin")
        .unwrap();
    assert_eq!(thin["thin"], true, "{list}");
    assert!(thin["used"].as_u64().unwrap() < 64 * MIB, "{list}");

    // hostile management requests: clear refusals, nothing breaks
    let bad: &[(&str, Value, &str)] = &[
        (
            "lvol_create",
            json!({"name": "pool/x"}),
            "\"size\" is required",
        ),
        (
            "lvol_create",
            json!({"name": "x", "size": "1M"}),
            "STORE/NAME",
        ),
        (
            "lvol_create",
            json!({"name": "nope/x", "size": "1M"}),
            "no volume store",
        ),
        (
            "lvol_create",
            json!({"name": "pool/../x", "size": "1M"}),
            "STORE/NAME",
        ),
        (
            "lvol_create",
            json!({"name": "pool/a b", "size": "1M"}),
            "bad volume name",
        ),
        (
            "lvol_create",
            json!({"name": "pool/x", "size": 1000}),
            "multiple of 4096",
        ),
        (
            "lvol_create",
            json!({"name": "pool/x", "size": "1T"}),
            "at most",
        ),
        (
            "lvol_create",
            json!({"name": "pool/x", "size": "1M", "thin": "yes"}),
            "true or false",
        ),
        (
            "lvol_create",
            json!({"name": "pool/big", "size": "512M"}),
            "full",
        ),
        (
            "lvol_create",
            json!({"name": "pool/thin", "size": "1M", "thin": true}),
            "exists",
        ),
        ("lvol_delete", json!({"name": "pool/thin"}), "in use"),
        (
            "lvol_resize",
            json!({"name": "pool/thin", "size": "4M"}),
            "in use",
        ),
        (
            "lvol_snapshot",
            json!({"name": "pool/ghost", "snapshot_name": "s"}),
            "no volume",
        ),
        (
            "lvol_snapshot",
            json!({"name": "pool/thin", "snapshot_name": "a/b"}),
            "plain name",
        ),
        (
            "lvol_clone",
            json!({"snapshot": "pool/thick", "clone_name": "c"}),
            "not a snapshot",
        ),
        (
            "lvol_clone",
            json!({"snapshot": "pool/thick", "clone_name": "other/c"}),
            "its snapshot's store",
        ),
        ("lvol_inflate", json!({}), "\"name\""),
        (
            "lvs_create",
            json!({"name": "p2", "backend": "lvol:pool/thin"}),
            "cannot live on a volume",
        ),
        (
            "lvs_create",
            json!({"name": "p2", "backend": "malloc:64M", "cluster_size": "3K"}),
            "power of two",
        ),
        (
            "lvs_create",
            json!({"name": "pool", "backend": "malloc:64M"}),
            "exists",
        ),
        ("lvs_delete", json!({"name": "pool"}), "in use"),
        ("lvs_delete", json!({"name": "ghost"}), "no volume store"),
    ];
    for (m, p, want) in bad {
        let e = rpc(&mut d, m, p).expect_err(m);
        assert!(e.contains(want), "{m} {p}: {e} (wanted {want:?})");
    }
    // a store made at run time on RAM, used and deleted
    assert_eq!(
        rpc(
            &mut d,
            "lvs_create",
            &json!({"name": "ram", "backend": "malloc:64M", "cluster_size": "64K"})
        )
        .unwrap()["made"],
        "created"
    );
    rpc(
        &mut d,
        "lvol_create",
        &json!({"name": "ram/v", "size": "8M", "thin": true}),
    )
    .unwrap();
    rpc(
        &mut d,
        "lvol_snapshot",
        &json!({"name": "ram/v", "snapshot_name": "s"}),
    )
    .unwrap();
    rpc(
        &mut d,
        "lvol_clone",
        &json!({"snapshot": "ram/s", "clone_name": "c"}),
    )
    .unwrap();
    rpc(
        &mut d,
        "lvol_rename",
        &json!({"name": "ram/c", "new_name": "c2"}),
    )
    .unwrap();
    rpc(
        &mut d,
        "lvol_resize",
        &json!({"name": "ram/c2", "size": "16M"}),
    )
    .unwrap();
    rpc(&mut d, "lvol_delete", &json!({"name": "ram/s"})).unwrap();
    rpc(&mut d, "lvol_inflate", &json!({"name": "ram/c2"})).unwrap();
    let l = rpc(&mut d, "lvol_list", &json!({"lvs": "ram"})).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 2, "{l}");
    rpc(&mut d, "lvs_delete", &json!({"name": "ram"})).unwrap();
    drop(qp);
    drop(c);
    d.stop().unwrap();
}

/// Read all of `b` (a volume opened in-process).
fn read_all(b: &mut dyn Backend) -> Vec<u8> {
    let size = b.size();
    let mut out = Vec::with_capacity(size as usize);
    let buf = IoBuffer::new(MIB as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        let mut list = GuestBufferList::new();
        list.set_range(buf.buffers(), 0, n);
        b.submit(&IoRequest {
            tag: 9,
            op: IoOp::Read,
            offset: off,
            iov: list.as_buffers(),
        })
        .unwrap();
        let mut got = None;
        while got.is_none() {
            b.poll(&mut |_, s| got = Some(s));
        }
        assert_eq!(got, Some(Status::SUCCESS));
        let mut chunk = vec![0u8; n as usize];
        buf.read_at(0, &mut chunk);
        out.extend_from_slice(&chunk);
        off += n;
    }
    out
}

fn perf(sock: &Path, secs: f64) -> vnvme::perf::JobResult {
    let t = VfioUserTransport::connect(sock).expect("connect");
    let mut c = NvmeDriver::new(Box::new(t), 32 << 20, 2).expect("bring-up");
    let opts = PerfOptions {
        queue_depth: 32,
        io_size: 8192,
        pattern: Pattern::Randrw,
        read_percent: 50,
        duration: Duration::from_secs_f64(secs),
        workers: 1,
        verify: true,
        shadow_doorbells: false,
    };
    vnvme::perf::run(&mut c, &opts, |_, _| {})
        .expect("perf runs")
        .total()
}

#[test]
fn a_snapshot_during_verified_writes_is_a_clone_source_and_deletable_first() {
    let tmp = TempDir::new("lvol-snap");
    let vols = "[[lvstore.volume]]\nname = \"vol\"\nsize = \"64M\"\nthin = true\n";
    let text = toml(tmp.path(), 256, vols, &["lvol:pool/vol"]);
    let cfg = Config::parse(&text, Path::new("l.toml")).unwrap();
    let mut d = Daemon::start(&cfg).expect("daemon");
    let sock = tmp.path().join("l.sock");
    let s2 = sock.clone();
    let during = std::thread::spawn(move || perf(&s2, 4.0));
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    rpc(
        &mut d,
        "lvol_snapshot",
        &json!({"name": "pool/vol", "snapshot_name": "snap"}),
    )
    .unwrap();
    eprintln!("snapshot under I/O took {:?}", t.elapsed());
    rpc(
        &mut d,
        "lvol_clone",
        &json!({"snapshot": "pool/snap", "clone_name": "clone"}),
    )
    .unwrap();
    let r = during.join().unwrap();
    assert!(
        r.ios > 100 && r.errors == 0 && r.verify_failures == 0,
        "{r:?}"
    );
    let store = d.lvstores().store("pool").unwrap();
    let snap = read_all(&mut store.open("snap").unwrap());
    let clone = read_all(&mut store.open("clone").unwrap());
    let vol = read_all(&mut store.open("vol").unwrap());
    assert!(snap == clone, "the clone reads the snapshot's image");
    assert!(snap != vol, "the volume went on after the snapshot");
    assert!(
        snap.iter().any(|&b| b != 0),
        "the snapshot holds what was written before it"
    );
    // the snapshot goes first; the clone keeps its image
    rpc(&mut d, "lvol_delete", &json!({"name": "pool/snap"})).unwrap();
    assert!(read_all(&mut store.open("clone").unwrap()) == clone);
    let list = rpc(&mut d, "lvol_list", &json!({})).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|v| v["parent"].is_null()),
        "{list}"
    );
    drop(store);
    d.stop().unwrap();
    let out = Command::new(vnvme_binary())
        .args([
            "lvs-check",
            &format!("file:{}/pool.img", tmp.path().display()),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("clean"), "{text}");
}

/// A `vnvme serve` process, killed when dropped.
struct Served {
    child: Child,
    rpc: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(cfg: &Path, rpc: &Path, sock: &Path) -> Served {
    let _ = std::fs::remove_file(rpc);
    let _ = std::fs::remove_file(sock);
    let child = Command::new(vnvme_binary())
        .arg("serve")
        .arg("--config")
        .arg(cfg)
        .arg("--rpc")
        .arg(rpc)
        .spawn()
        .expect("vnvme serve");
    let s = Served {
        child,
        rpc: rpc.into(),
    };
    let t = Instant::now();
    while !(rpc.exists() && sock.exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

impl Served {
    fn call(&self, method: &str, params: &Value) -> Value {
        let mut s = UnixStream::connect(&self.rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let line = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }
}

/// Block `i` written in generation `g`: 4 KiB naming both.
fn block(i: u64, g: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|k| (i << 40 | g << 20 | k).to_le_bytes())
        .collect()
}

#[test]
fn kill_9_during_writes_keeps_every_flushed_write_and_the_store_checks_clean() {
    let tmp = TempDir::new("lvol-kill");
    let vols = "[[lvstore.volume]]\nname = \"thin\"\nsize = \"64M\"\nthin = true\n";
    let cfg = tmp.path().join("l.toml");
    std::fs::write(&cfg, toml(tmp.path(), 256, vols, &["lvol:pool/thin"])).unwrap();
    let (rpc_path, sock) = (tmp.path().join("rpc.sock"), tmp.path().join("l.sock"));
    let served = serve(&cfg, &rpc_path, &sock);
    let (c, mut qp) = connect(&sock);
    let mut buf = c.dma().alloc(4096).unwrap();
    // generation 1: 2048 blocks spread over the volume, flushed
    let n = 2048u64;
    let at = |i: u64| (i * 7919) % (64 * MIB / 4096);
    for i in 0..n {
        buf.as_mut_slice()[..4096].copy_from_slice(&block(i, 1));
        assert_eq!(
            wait(&mut qp, |q| q.read_write(
                true,
                1,
                at(i) * 8,
                8,
                buf.iova(),
                4096,
                i
            )),
            Status::SUCCESS
        );
    }
    assert_eq!(wait(&mut qp, |q| q.flush(1, 0)), Status::SUCCESS);
    let snap = served.call(
        "lvol_snapshot",
        &json!({"name": "pool/thin", "snapshot_name": "s1"}),
    );
    assert_eq!(snap["result"], true, "{snap}");
    // generation 2 over the first half, not flushed, then kill -9 mid-stream
    for i in 0..n / 2 {
        buf.as_mut_slice()[..4096].copy_from_slice(&block(i, 2));
        assert_eq!(
            wait(&mut qp, |q| q.read_write(
                true,
                1,
                at(i) * 8,
                8,
                buf.iova(),
                4096,
                i
            )),
            Status::SUCCESS
        );
    }
    drop(served); // SIGKILL
    drop((buf, qp, c));
    let img = format!("file:{}/pool.img", tmp.path().display());
    let out = Command::new(vnvme_binary())
        .args(["lvs-check", &img])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lvs-check after kill -9: {text}");
    eprintln!("{text}");
    let served = serve(&cfg, &rpc_path, &sock);
    let (c, mut qp) = connect(&sock);
    let buf = c.dma().alloc(4096).unwrap();
    let mut old = 0;
    for i in 0..n {
        let st = wait(&mut qp, |q| {
            q.read_write(false, 1, at(i) * 8, 8, buf.iova(), 4096, i)
        });
        assert_eq!(st, Status::SUCCESS);
        let got = &buf.as_slice()[..4096];
        let ok = got == block(i, 1).as_slice() || (i < n / 2 && got == block(i, 2).as_slice());
        assert!(ok, "block {i}: neither its flushed nor its later contents");
        old += u64::from(got == block(i, 1).as_slice() && i < n / 2);
    }
    eprintln!(
        "after kill -9: {old} of {} unflushed blocks hold their flushed contents",
        n / 2
    );
    let list = served.call("lvol_list", &json!({}));
    assert_eq!(list["result"].as_array().map(Vec::len), Some(2), "{list}");
    drop(qp);
    drop(c);
}

/// Namespace Management create (NSZE = NCAP `blocks`, 512-byte blocks); the NSID.
fn ns_create(c: &mut NvmeDriver, blocks: u64) -> u32 {
    let mut buf = c.dma().alloc(4096).unwrap();
    let data = &mut buf.as_mut_slice()[..4096];
    data.fill(0);
    data[0..8].copy_from_slice(&blocks.to_le_bytes());
    data[8..16].copy_from_slice(&blocks.to_le_bytes());
    let mut sqe = Submission::default();
    sqe.opcode = op::NS_MANAGEMENT;
    c.admin_command("Namespace Management", sqe, Some((buf.iova(), 4096)))
        .expect("create")
}

/// Namespace Attachment of `nsid` to controller `cntlid`.
fn ns_attach(c: &mut NvmeDriver, nsid: u32, cntlid: u16) {
    let mut buf = c.dma().alloc(4096).unwrap();
    let data = &mut buf.as_mut_slice()[..4096];
    data.fill(0);
    data[0..2].copy_from_slice(&1u16.to_le_bytes());
    data[2..4].copy_from_slice(&cntlid.to_le_bytes());
    let mut sqe = Submission::default();
    sqe.opcode = op::NS_ATTACHMENT;
    sqe.nsid = nsid.into();
    c.admin_command("Namespace Attachment", sqe, Some((buf.iova(), 4096)))
        .expect("attach");
}

#[test]
fn namespaces_the_host_creates_are_thin_volumes_and_a_clone_attaches_at_run_time() {
    let tmp = TempDir::new("lvol-pool");
    let vols = "[[lvstore.volume]]\nname = \"base\"\nsize = \"16M\"\nthin = true\n";
    let text = toml(tmp.path(), 128, vols, &["lvol:pool/base"]).replace(
        "[[controller.namespace]]",
        "namespace_pool = \"lvs:pool\"\n[[controller.namespace]]",
    );
    let cfg = Config::parse(&text, Path::new("l.toml")).unwrap();
    let mut d = Daemon::start(&cfg).expect("daemon");
    let (mut c, mut qp) = connect(&tmp.path().join("l.sock"));
    let cntlid = c.identify().cntlid.get();
    // the host's Namespace Management: a thin volume of the store
    let nsid = ns_create(&mut c, (32 * MIB) / 512);
    ns_attach(&mut c, nsid, cntlid);
    let id = identify_ns(&mut c, nsid);
    assert_eq!((id[24] & 1, u64_at(&id, 16)), (1, 0), "thin, nothing used");
    let list = rpc(&mut d, "lvol_list", &json!({"lvs": "pool"})).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"].as_str().unwrap().ends_with(&format!(".ns{nsid}"))),
        "{list}"
    );
    // a snapshot of the base volume, cloned and added as a namespace while it runs
    let mut buf = c.dma().alloc(4096).unwrap();
    buf.as_mut_slice()[..4096].fill(0x77);
    assert_eq!(
        wait(&mut qp, |q| q.read_write(
            true,
            1,
            64,
            8,
            buf.iova(),
            4096,
            1
        )),
        Status::SUCCESS
    );
    rpc(
        &mut d,
        "lvol_snapshot",
        &json!({"name": "pool/base", "snapshot_name": "s"}),
    )
    .unwrap();
    rpc(
        &mut d,
        "lvol_clone",
        &json!({"snapshot": "pool/s", "clone_name": "c"}),
    )
    .unwrap();
    buf.as_mut_slice()[..4096].fill(0x88);
    assert_eq!(
        wait(&mut qp, |q| q.read_write(
            true,
            1,
            64,
            8,
            buf.iova(),
            4096,
            2
        )),
        Status::SUCCESS
    );
    let nqn = rpc(&mut d, "subsystem_list", &json!({})).unwrap()[0]["nqn"]
        .as_str()
        .unwrap()
        .to_owned();
    for (p, want) in [
        (
            json!({"nqn": nqn, "backend": "malloc:8M"}),
            "takes a volume",
        ),
        (
            json!({"nqn": nqn, "backend": "lvol:pool/ghost"}),
            "no volume",
        ),
        (
            json!({"nqn": "nqn.x", "backend": "lvol:pool/c"}),
            "no subsystem",
        ),
    ] {
        let e = rpc(&mut d, "ns_add", &p).unwrap_err();
        assert!(e.contains(want), "{p}: {e}");
    }
    let added = rpc(
        &mut d,
        "ns_add",
        &json!({"nqn": nqn, "backend": "lvol:pool/c"}),
    )
    .unwrap();
    let cn = added["nsid"].as_u64().unwrap() as u32;
    rpc(
        &mut d,
        "ns_attach",
        &json!({"nqn": nqn, "nsid": cn, "controllers": [cntlid]}),
    )
    .unwrap();
    let _ = c.take_events();
    assert_eq!(
        wait(&mut qp, |q| q.read_write(
            false,
            cn,
            64,
            8,
            buf.iova(),
            4096,
            3
        )),
        Status::SUCCESS
    );
    assert!(
        buf.as_slice()[..4096].iter().all(|&b| b == 0x77),
        "the clone reads the snapshot point"
    );
    // grown while attached to a subsystem that shares its namespaces: the listing and the
    // host see the new size (the controller looks when I/O completes)
    rpc(
        &mut d,
        "lvol_resize",
        &json!({"name": "pool/c", "size": "24M"}),
    )
    .unwrap();
    let subs = rpc(&mut d, "subsystem_list", &json!({})).unwrap();
    let listed = subs[0]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nsid"] == cn)
        .map(|n| n["size"].as_u64());
    assert_eq!(listed, Some(Some(24 * MIB)), "{subs}");
    assert_eq!(
        wait(&mut qp, |q| q.read_write(
            false,
            cn,
            (24 * MIB - 4096) / 512,
            8,
            buf.iova(),
            4096,
            4
        )),
        Status::SUCCESS,
        "a read in the grown part"
    );
    assert_eq!(u64_at(&identify_ns(&mut c, cn), 0), 24 * MIB / 512, "NSZE");
    drop((buf, qp, c));
    d.stop().unwrap();
}
