//! Issue 20: the data plane is upgraded and killed under running clients, who see a stall and
//! never an error. `vnvme serve --supervised` with two controllers on file namespaces; a
//! `vnvme perf --verify` (a vfio-user client like QEMU: DMA map, sparse-mmapped doorbells,
//! polled queues) on each while the worker is upgraded five times and `kill -9`'d five times
//! at random moments: both runs finish with no failed command and every read verified.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vnvme_tests::guest::{TempDir, daemon_events, vnvme_binary};
use vnvme_tests::net::{free_port, wait_listening};

/// The supervisor, stopped (SIGTERM) when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: kill(2) with the pid of our own child and a plain signal number.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vnvme rpc` with `args` on `sock`, as run.
fn rpc_output(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vnvme_binary())
        .arg("rpc")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("vnvme rpc")
}

fn rpc(sock: &Path, args: &[&str]) -> Value {
    let o = rpc_output(sock, args);
    assert!(
        o.status.success(),
        "rpc {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON answer")
}

/// An RPC the supervisor refuses: its error message.
fn rpc_refused(sock: &Path, args: &[&str]) -> String {
    let o = rpc_output(sock, args);
    assert!(!o.status.success(), "rpc {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn status(sock: &Path) -> (u64, u64, u64, u64) {
    let s = rpc(sock, &["daemon_status"]);
    let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
    (
        n("worker_pid"),
        n("generation"),
        n("upgrades"),
        n("recoveries"),
    )
}

fn perf(sock: &Path, seconds: u32) -> Child {
    perf_with(sock, seconds, &[])
}

/// [`perf`] with more flags.
fn perf_with(sock: &Path, seconds: u32, flags: &[&str]) -> Child {
    Command::new(vnvme_binary())
        .arg("perf")
        .arg(format!("vfio-user:{}", sock.display()))
        .args(["-q", "16", "-o", "4096", "-w", "randrw", "--verify", "-t"])
        .arg(seconds.to_string())
        .args(flags)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vnvme perf")
}

fn finish(mut c: Child) -> (bool, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = c.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let ok = c.wait().is_ok_and(|s| s.success());
    (ok, format!("{out}\n{err}"))
}

/// One raw request line to the management socket; the parsed answer.
fn raw_rpc(sock: &Path, line: &[u8]) -> Value {
    vnvme_tests::rpc::raw(sock, line, Duration::from_secs(10))
}

/// `kill -9` the worker and wait for its successor.
fn kill_worker(rpc_sock: &Path) {
    let (pid, generation, _, _) = status(rpc_sock);
    // SAFETY: kill(2) with the worker's pid as the supervisor reports it.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while status(rpc_sock).1 == generation {
        assert!(t.elapsed() < Duration::from_secs(10), "no new worker");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ns_add` of `backend` to subsystem `nqn` and `ns_attach` to controller `cntlid`: the NSID.
fn add_and_attach(rpc_sock: &Path, nqn: &str, backend: &str, cntlid: u64) -> u64 {
    let nsid = rpc(
        rpc_sock,
        &[
            "ns_add",
            &format!("nqn={nqn}"),
            &format!("backend={backend}"),
        ],
    )["nsid"]
        .as_u64()
        .expect("nsid");
    rpc(
        rpc_sock,
        &[
            "ns_attach",
            &format!("nqn={nqn}"),
            &format!("nsid={nsid}"),
            &format!("controllers=[{cntlid}]"),
        ],
    );
    nsid
}

/// `vnvme serve --supervised` of a PF with two VFs (`extra`: more lines of its table, e.g.
/// `vfs_online = true\n`), each of the three with a file namespace of `size` of its own: the
/// supervisor, the PF's and the VFs' sockets and the management socket.
fn pf_and_two_vfs(dir: &Path, extra: &str, size: &str) -> (Served, [PathBuf; 3], PathBuf) {
    let pf = dir.join("pf.sock");
    let mut cfg = format!(
        "[[controller]]\nsocket = \"{}\"\nvfs = 2\n{extra}",
        pf.display()
    );
    for i in 0..3 {
        let _ = write!(
            cfg,
            "[[controller.namespace]]\nbackend = \"file:{}:{size}\"\nattach = [{i}]\n",
            dir.join(format!("d{i}.img")).display()
        );
    }
    let socks = [pf.clone(), dir.join("pf.vf1.sock"), dir.join("pf.vf2.sock")];
    let (served, rpc_sock) = serve_config(dir, &cfg, &socks);
    (served, socks, rpc_sock)
}

/// `vnvme serve --supervised` of a PF with one VF (online) and a namespace on `backend`
/// attached to the PF: the supervisor, the PF's socket, the management socket, the NQN and
/// the PF's CNTLID.
fn pf_and_a_vf(dir: &Path, backend: &str) -> (Served, PathBuf, PathBuf, String, u64) {
    let sock = dir.join("pf.sock");
    let cfg = format!(
        "[[controller]]\nsocket = \"{}\"\nvfs = 1\nvfs_online = true\n\
         [[controller.namespace]]\nbackend = \"{backend}\"\nattach = [0]\n",
        sock.display(),
    );
    let socks = [sock.clone(), dir.join("pf.vf1.sock")];
    let (served, rpc_sock) = serve_config(dir, &cfg, &socks);
    let nqn = rpc(&rpc_sock, &["subsystem_list"])[0]["nqn"]
        .as_str()
        .expect("nqn")
        .to_owned();
    let pf = rpc(&rpc_sock, &["controller_list"])[0]["cntlid"]
        .as_u64()
        .expect("cntlid");
    (served, sock, rpc_sock, nqn, pf)
}

/// At run time: mirror `mirror` of `members` (`members=[...]`), volume store `rt` on it and
/// thin volume `rt/v` of 16 MiB.
fn mirror_store_volume(rpc_sock: &Path, members: &str) {
    rpc(
        rpc_sock,
        &["raid_create", "name=mirror", "level=raid1", members],
    );
    rpc(
        rpc_sock,
        &[
            "lvs_create",
            "name=rt",
            "backend=array:mirror",
            "cluster_size=64K",
        ],
    );
    rpc(
        rpc_sock,
        &["lvol_create", "name=rt/v", "size=16M", "thin=true"],
    );
}

/// `perf --verify` on `sock` through an upgrade and a kill of the worker: no failed command,
/// no mismatch, and namespace `nsid` among those verified. The daemon's log after.
fn verified_through_an_upgrade_and_a_kill(
    sock: &Path,
    rpc_sock: &Path,
    dir: &Path,
    nsid: u64,
) -> String {
    let p = perf(sock, 10);
    std::thread::sleep(Duration::from_secs(2));
    let r = rpc(rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
    kill_worker(rpc_sock);
    let (ok, out) = finish(p);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        ok && out.contains(" 0 mismatches") && out.contains(&format!("NSID {nsid}")),
        "{out}\ndaemon:\n{log}"
    );
    log
}

/// A small random delay from the clock (no RNG crate in the tests).
fn random_ms(lo: u64, hi: u64) -> u64 {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    lo + ns.wrapping_mul(0x9e37_79b9_7f4a_7c15) % (hi - lo)
}

/// `vnvme serve --supervised` over `n` controllers on file namespaces in `dir`: the
/// supervisor, the controller sockets and the management socket.
fn supervised(dir: &Path, n: usize) -> (Served, Vec<PathBuf>, PathBuf) {
    let socks: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("c{i}.sock"))).collect();
    let mut cfg = String::new();
    for (i, s) in socks.iter().enumerate() {
        let _ = write!(
            cfg,
            "[[controller]]\nsocket = \"{}\"\n[[controller.namespace]]\nbackend = \"file:{}:64M\"\n",
            s.display(),
            dir.join(format!("d{i}.img")).display()
        );
    }
    let (served, rpc_sock) = serve_config(dir, &cfg, &socks);
    (served, socks, rpc_sock)
}

/// `vnvme serve --supervised` on configuration `cfg` (written to `dir`, where the daemon's
/// log goes too), once `socks` and the management socket are up: the supervisor and the
/// management socket.
fn serve_config(dir: &Path, cfg: &str, socks: &[PathBuf]) -> (Served, PathBuf) {
    let cfg_path = dir.join("vnvme.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let rpc_sock = dir.join("rpc");
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new(vnvme_binary())
        .args(["serve", "--supervised", "--config"])
        .arg(&cfg_path)
        .arg("--rpc")
        .arg(&rpc_sock)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("vnvme serve --supervised");
    let served = Served(child);
    for s in socks {
        wait_for(s);
    }
    wait_for(&rpc_sock);
    (served, rpc_sock)
}

#[test]
fn upgrades_and_crashes_under_perf_verify_fail_no_command() {
    let tmp = TempDir::new("upgrade");
    let (_served, socks, rpc_sock) = supervised(tmp.path(), 2);
    let (_, generation0, _, _) = status(&rpc_sock);
    assert_eq!(generation0, 1);

    // a limit set at run time (high enough not to slow the run) outlives every worker
    let list = rpc(&rpc_sock, &["controller_list"]);
    let cntlid = list[0]["cntlid"].as_u64().expect("cntlid");
    rpc(
        &rpc_sock,
        &["qos_set", &format!("cntlid={cntlid}"), "iops=9000000"],
    );
    // a namespace created at run time is carried now: the worker answers (this subsystem
    // has fixed namespaces)
    let nqn = rpc(&rpc_sock, &["subsystem_list"])[0]["nqn"]
        .as_str()
        .expect("nqn")
        .to_owned();
    let e = rpc_refused(&rpc_sock, &["ns_create", &format!("nqn={nqn}"), "size=1M"]);
    assert!(e.contains("fixed"), "{e}");
    // the first client keeps its I/O doorbells in a shadow page as Linux does (the worker
    // reads them from guest memory, and the next worker from its journal), the second rings
    // the registers
    let perfs: Vec<Child> = socks
        .iter()
        .enumerate()
        .map(|(i, s)| perf_with(s, 24, if i == 0 { &["--shadow-doorbells"] } else { &[] }))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..5 {
        let r = rpc(&rpc_sock, &["daemon_upgrade"]);
        assert!(r.get("generation").is_some(), "upgrade {i}: {r}");
        std::thread::sleep(Duration::from_millis(random_ms(400, 1200)));
    }
    for _ in 0..5 {
        kill_worker(&rpc_sock);
        std::thread::sleep(Duration::from_millis(random_ms(300, 1500)));
    }
    let (_, generation, upgrades, recoveries) = status(&rpc_sock);
    assert_eq!((upgrades, recoveries, generation), (5, 5, 11));
    // the rest of the management plane still reaches the worker through the supervisor
    let list = rpc(&rpc_sock, &["controller_list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let limited = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["cntlid"].as_u64() == Some(cntlid));
    assert_eq!(
        limited.map(|c| c["iops_limit"].clone()),
        Some(serde_json::json!(9_000_000)),
        "the run-time QoS limit after 5 upgrades and 5 kills: {list}"
    );

    for (p, s) in perfs.into_iter().zip(&socks) {
        let (ok, out) = finish(p);
        assert!(
            ok,
            "perf on {} failed:\n{out}\ndaemon:\n{}",
            s.display(),
            daemon_events(&tmp.path().join("daemon.log"))
        );
        assert!(out.contains(" 0 mismatches"), "{out}");
        eprintln!(
            "{}: {}",
            s.display(),
            out.lines()
                .filter(|l| l.starts_with("Total") || l.starts_with("verified"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
}

/// One vfio-user header: id, command, size, flags (command), errno.
fn header(command: u16, size: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&7u16.to_le_bytes());
    h[2..4].copy_from_slice(&command.to_le_bytes());
    h[4..8].copy_from_slice(&size.to_le_bytes());
    h
}

#[test]
fn a_hostile_client_while_the_worker_is_replaced_harms_nobody() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let tmp = TempDir::new("upgrade-hostile");
    let (_served, socks, rpc_sock) = supervised(tmp.path(), 1);
    let mut c = UnixStream::connect(&socks[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // the supervisor's own RESTORE and CLIENT_GONE numbers, a message shorter than its
    // header, a reply instead of a command, an unknown command: each refused or ignored
    for (cmd, size) in [(0x7f01, 16), (0x7f02, 16), (1, 4), (0x4444, 16)] {
        c.write_all(&header(cmd, size)).unwrap();
    }
    let mut reply = [0u8; 16];
    use std::io::Read as _;
    c.read_exact(&mut reply).unwrap();
    assert_ne!(
        reply[8] & 0x20,
        0,
        "RESTORE from a client is refused: {reply:?}"
    );
    // an upgrade and a crash with a half-sent message in the socket
    c.write_all(&header(9, 4096)).unwrap();
    rpc(&rpc_sock, &["daemon_upgrade"]);
    kill_worker(&rpc_sock);
    drop(c);
    // the supervisor lives and serves the next client as before
    let (ok, out) = finish(perf(&socks[0], 2));
    assert!(ok, "{out}");
    assert!(out.contains(" 0 mismatches"), "{out}");
    let (_, generation, upgrades, recoveries) = status(&rpc_sock);
    assert_eq!((generation, upgrades, recoveries), (3, 1, 1));
}

#[test]
fn an_upgrade_to_a_binary_that_does_not_start_falls_back_without_an_error_to_the_client() {
    let tmp = TempDir::new("upgrade-broken");
    let (_served, socks, rpc_sock) = supervised(tmp.path(), 1);
    let p = perf(&socks[0], 6);
    std::thread::sleep(Duration::from_secs(2));
    // a binary that exits at once: its worker never reports ready
    let o = Command::new(vnvme_binary())
        .args(["rpc", "--socket"])
        .arg(&rpc_sock)
        .args(["daemon_upgrade", "binary=/bin/true"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("vnvme rpc");
    assert!(
        !o.status.success(),
        "the upgrade to /bin/true was not refused"
    );
    let s = rpc(&rpc_sock, &["daemon_status"]);
    assert!(
        s.get("binary")
            .and_then(Value::as_str)
            .is_some_and(|b| b.ends_with("vnvme")),
        "{s}"
    );
    let (_, generation, upgrades, _) = status(&rpc_sock);
    assert_eq!((generation, upgrades), (2, 0));
    let (ok, out) = finish(p);
    assert!(ok && out.contains(" 0 mismatches"), "{out}");
}

#[test]
fn a_worker_that_stops_answering_is_replaced_and_the_message_answered() {
    use std::io::{Read as _, Write};
    use std::os::unix::net::UnixStream;
    let tmp = TempDir::new("upgrade-hung");
    let (_served, socks, rpc_sock) = supervised(tmp.path(), 1);
    let mut c = UnixStream::connect(&socks[0]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (pid, _, _, _) = status(&rpc_sock);
    // the signal is delivered asynchronously: wait until the worker is stopped
    vnvme_tests::process::freeze(pid as u32);
    let t = Instant::now();
    // DEVICE_GET_INFO with its 16-byte payload (argsz first)
    let mut m = header(4, 32).to_vec();
    m.extend_from_slice(&16u32.to_le_bytes());
    m.extend_from_slice(&[0; 12]);
    c.write_all(&m).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    let waited = t.elapsed();
    assert_eq!(
        reply[8] & 0x20,
        0,
        "GET_INFO failed after {waited:?}: {reply:?}"
    );
    let mut info = [0u8; 16];
    c.read_exact(&mut info).unwrap();
    assert!(
        waited < Duration::from_millis(4800),
        "answered after {waited:?}"
    );
    let (new_pid, generation, _, recoveries) = status(&rpc_sock);
    assert_ne!(new_pid, pid);
    assert_eq!((generation, recoveries), (2, 1));
    eprintln!("answered by the next worker after {waited:?}");
}

/// A thin volume's mapping of a write lives in the worker's memory until a commit: a worker
/// killed after acknowledging a write must not take the mapping with it, since the client
/// sees no power loss (the data is in the file, the journal must be too).
#[test]
fn a_thin_volume_keeps_every_acknowledged_write_across_worker_crashes() {
    let tmp = TempDir::new("upgrade-lvol");
    let dir = tmp.path();
    let sock = dir.join("c0.sock");
    let cfg = format!(
        "[[lvstore]]\nname = \"pool\"\nbackend = \"file:{}:96M\"\ncluster_size = \"64K\"\n\
         [[lvstore.volume]]\nname = \"v\"\nsize = \"64M\"\nthin = true\n\
         [[controller]]\nsocket = \"{}\"\n[[controller.namespace]]\nbackend = \"lvol:pool/v\"\n",
        dir.join("pool.img").display(),
        sock.display()
    );
    let (_served, rpc_sock) = serve_config(dir, &cfg, std::slice::from_ref(&sock));

    let p = perf(&sock, 14);
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        kill_worker(&rpc_sock);
        std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
    }
    let (ok, out) = finish(p);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(ok && out.contains(" 0 mismatches"), "{out}\ndaemon:\n{log}");
    eprintln!(
        "{}",
        out.lines()
            .filter(|l| l.starts_with("Total") || l.starts_with("verified"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// The worker processes the supervisor `sup` runs now.
fn workers_of(sup: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the fields after the last ')'
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if ppid == Some(sup) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// A management caller is as untrusted as a guest. Callers that connect and send nothing or
/// trickle a byte at a time, more of them than the supervisor serves at once, garbage lines
/// and methods it refuses: none of it may hold up the supervisor, whose loop is what
/// replaces a dead worker within QEMU's 5 s message timeout, nor cost the clients' verified
/// I/O anything.
#[test]
fn a_hostile_management_caller_does_not_hold_up_the_recovery_of_a_worker() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let tmp = TempDir::new("upgrade-hostile-rpc");
    let (served, socks, rpc_sock) = supervised(tmp.path(), 2);
    let sup = served.0.id();
    let perfs: Vec<Child> = socks.iter().map(|s| perf(s, 10)).collect();
    std::thread::sleep(Duration::from_millis(1500));

    // garbage and refusals, each with its JSON-RPC error
    let code = |v: &Value| v["error"]["code"].as_i64();
    assert_eq!(
        code(&raw_rpc(&rpc_sock, b"not json at all\n")),
        Some(-32700)
    );
    let mut huge = vec![b'['; 2 << 20];
    huge.push(b'\n');
    assert_eq!(code(&raw_rpc(&rpc_sock, &huge)), Some(-32600));
    assert_eq!(
        code(&raw_rpc(&rpc_sock, b"{\"method\": \"no_such_method\"}\n")),
        Some(-32601),
        "forwarded to the worker, answered there"
    );
    // answered by the worker (namespaces created at run time are carried): its own refusal
    assert_eq!(
        code(&raw_rpc(
            &rpc_sock,
            b"{\"id\": 4, \"method\": \"ns_create\", \"params\": {\"name\": 5}}\n"
        )),
        Some(-32602)
    );
    for (m, why) in [
        ("subsystem_create", "refused under --supervised"),
        ("subsystem_delete", "no subsystem"),
    ] {
        let v = raw_rpc(
            &rpc_sock,
            format!("{{\"id\": 3, \"method\": \"{m}\", \"params\": {{\"name\": 5}}}}\n").as_bytes(),
        );
        assert_eq!((code(&v), v["id"].as_u64()), (Some(-32000), Some(3)), "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|s| s.contains(why)),
            "{v}"
        );
    }
    let err = rpc_refused(&rpc_sock, &["daemon_upgrade", "binary=/no/such/vnvme"]);
    assert!(err.contains("/no/such/vnvme is not a file"), "{err}");
    // subsystems at run time: a socket already served (a neighbour's), one where no socket
    // can be, a namespace the worker refuses (its socket must go again), the supervisor's
    // own replay call; each refused, the neighbours' verified I/O running meanwhile
    let ns = |img: &str| format!("namespace=[{{\"backend\":\"file:{img}:8M\"}}]");
    let good_ns = ns(&tmp.path().join("x.img").display().to_string());
    let bad_sock = tmp.path().join("refused.sock");
    for (args, why) in [
        (
            vec![
                "subsystem_create".to_owned(),
                format!("socket={}", socks[0].display()),
                good_ns.clone(),
            ],
            "served already",
        ),
        (
            vec![
                "subsystem_create".to_owned(),
                "socket=/no/such/dir/x.sock".to_owned(),
                good_ns.clone(),
            ],
            "/no/such/dir",
        ),
        (
            vec![
                "subsystem_create".to_owned(),
                format!("socket={}", bad_sock.display()),
                "namespace=[{\"backend\":\"tape:1G\"}]".to_owned(),
            ],
            "tape",
        ),
        (
            vec!["subsystem_delete".to_owned(), "nqn=nqn.no.such".to_owned()],
            "no subsystem nqn.no.such",
        ),
        // a pool no controller's journal would keep (no vfio-user socket)
        (
            vec![
                "subsystem_create".to_owned(),
                "tcp_listen=127.0.0.1:1".to_owned(),
                "namespace_pool=malloc:1G".to_owned(),
            ],
            "needs a vfio-user socket",
        ),
        // more VFs than a PF has: refused before a socket is bound for any
        (
            vec![
                "subsystem_create".to_owned(),
                format!("socket={}", bad_sock.display()),
                "vfs=100000".to_owned(),
            ],
            "vfs: 0..=127",
        ),
        // RAM a caller names itself (another tenant's, or a configured namespace's): refused
        (
            vec![
                "raid_create".to_owned(),
                "name=stolen".to_owned(),
                "level=raid1".to_owned(),
                "members=[\"malloc:1M\",\"malloc:16M@c0\"]".to_owned(),
            ],
            "kept RAM is named by the supervisor",
        ),
        // RAM: more than one call may name, and RAM for a call the worker refuses (let go)
        (
            vec![
                "raid_create".to_owned(),
                "name=many".to_owned(),
                "level=raid1".to_owned(),
                format!("members=[{}]", vec!["\"malloc:1M\""; 17].join(",")),
            ],
            "at most 16",
        ),
        (
            vec![
                "raid_create".to_owned(),
                "name=odd".to_owned(),
                "level=raid7".to_owned(),
                "members=[\"malloc:1M\",\"malloc:1M\"]".to_owned(),
            ],
            "raid7",
        ),
        (
            vec!["subsystem_skip_entry".to_owned()],
            "the supervisor's own call",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = rpc_refused(&rpc_sock, &args);
        assert!(e.contains(why), "{args:?}: {e}");
    }
    assert!(
        socks[0].exists(),
        "a refused create took a neighbour's socket"
    );
    assert!(!bad_sock.exists(), "the socket of a refused create stayed");
    // the supervisor lets go of the RAM of a refused call (on its loop: within a moment), and
    // has the worker let go of it too (it was handed the RAM before the call)
    let worker = workers_of(sup)[0];
    let kept_ram = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().contains("vnvme-ram"))
            .count()
    };
    let t = Instant::now();
    while kept_ram(sup) + kept_ram(worker) > 0 && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(kept_ram(sup), 0, "RAM kept for refused calls");
    assert_eq!(kept_ram(worker), 0, "the worker kept RAM of refused calls");

    // more callers than the supervisor serves at once: most silent, some trickling
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tricklers: Vec<_> = (0..3)
        .map(|_| {
            let mut conn = UnixStream::connect(&rpc_sock).unwrap();
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if conn.write_all(b" ").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        })
        .collect();
    let mut silent: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&rpc_sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // the worker dies while they hold on: a new one is up at once
    let before = workers_of(sup);
    assert_eq!(before.len(), 1, "{before:?}");
    // SAFETY: kill(2) with the pid of the supervisor's child, the worker.
    assert_eq!(unsafe { libc::kill(before[0] as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    loop {
        let now = workers_of(sup);
        if now.len() == 1 && now[0] != before[0] {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "no new worker after {:?} with hostile management callers: {now:?}",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("a new worker after {:?}", killed.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in tricklers {
        let _ = h.join();
    }
    silent.clear();

    // the slots come back: management works again, and the clients saw no error
    let t = Instant::now();
    let (_, generation, _, recoveries) = loop {
        let o = rpc_output(&rpc_sock, &["daemon_status"]);
        if o.status.success() {
            let s: Value = serde_json::from_slice(&o.stdout).unwrap();
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            break (
                n("worker_pid"),
                n("generation"),
                n("upgrades"),
                n("recoveries"),
            );
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{o:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((generation, recoveries), (2, 1));
    for p in perfs {
        let (ok, out) = finish(p);
        assert!(ok && out.contains(" 0 mismatches"), "{out}");
    }
}

/// A supervised daemon with a vfio-user controller (`sock`) and an NVMe/TCP export, and a
/// host: a second daemon whose namespace is the export (its initiator reconnects and sends
/// again what had no response), reached through vfio-user at `front_sock`.
struct SupervisedExport {
    // the host goes first, then the supervisor
    _front: Served,
    _served: Served,
    sock: PathBuf,
    rpc_sock: PathBuf,
    front_sock: PathBuf,
    port: u16,
    /// Where the logs are.
    dir: PathBuf,
}

/// A host of NVMe/TCP subsystem `nqn` on `port`: a daemon whose namespace is that export
/// (its initiator reconnects every second and sends again what had no response), reached
/// through vfio-user at the socket returned; its log is `front.log` in `dir`.
fn tcp_host(dir: &Path, port: u16, nqn: &str) -> (Served, PathBuf) {
    let front_sock = dir.join("front.sock");
    let front = Served(
        Command::new(vnvme_binary())
            .args(["serve", "--socket"])
            .arg(&front_sock)
            .arg("--ns")
            .arg(format!(
                "nvme-tcp://127.0.0.1:{port}/{nqn}/1?reconnect_delay=1"
            ))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("front.log")).unwrap())
            .spawn()
            .expect("vnvme serve (the host)"),
    );
    wait_for(&front_sock);
    (front, front_sock)
}

impl SupervisedExport {
    fn start(dir: &Path, nqn: &str) -> Self {
        let sock = dir.join("c0.sock");
        let port = free_port();
        let cfg = format!(
            "[[controller]]\nsocket = \"{}\"\n[[controller.namespace]]\nbackend = \"file:{}:64M\"\n\
             [[controller]]\ntcp_listen = \"127.0.0.1:{port}\"\nnqn = \"{nqn}\"\n\
             [[controller.namespace]]\nbackend = \"file:{}:64M\"\n",
            sock.display(),
            dir.join("d0.img").display(),
            dir.join("d1.img").display(),
        );
        let (served, rpc_sock) = serve_config(dir, &cfg, std::slice::from_ref(&sock));
        let (front, front_sock) = tcp_host(dir, port, nqn);
        Self {
            _front: front,
            _served: served,
            sock,
            rpc_sock,
            front_sock,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// The verified runs over the export (`tcp`, through the host) and on the vfio-user
    /// controller (`local`) finish with no failed command and no mismatch.
    fn finish_clean(&self, tcp: Child, local: Child) {
        let log = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        for (what, p) in [("nvme-tcp", tcp), ("vfio-user", local)] {
            let (ok, out) = finish(p);
            assert!(
                ok && out.contains(" 0 mismatches"),
                "{what}:\n{out}\ndaemon:\n{}\nhost:\n{}",
                log("daemon.log"),
                log("front.log")
            );
            eprintln!(
                "{what}: {}",
                out.lines()
                    .filter(|l| l.starts_with("Total") || l.starts_with("verified"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
}

/// An NVMe/TCP export under `--supervised`: the supervisor keeps the listener, the worker's
/// connections close with it and the host reconnects. A host daemon whose namespace is the
/// export (`nvme-tcp://`), driven by `vnvme perf --verify`, and a vfio-user client on another
/// controller run through two upgrades and two kills: neither sees a failed command or a
/// mismatch.
#[test]
fn an_nvme_tcp_export_rides_through_upgrades_and_crashes() {
    let tmp = TempDir::new("upgrade-tcp");
    let dir = tmp.path();
    let x = SupervisedExport::start(dir, "nqn.2026-12.io.vnvme:supervised-tcp");
    let (sock, rpc_sock, front_sock) = (&x.sock, &x.rpc_sock, &x.front_sock);
    let tcp = perf(front_sock, 16);
    let local = perf(sock, 16);
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let r = rpc(rpc_sock, &["daemon_upgrade"]);
        assert!(r.get("generation").is_some(), "upgrade {i}: {r}");
        std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
        kill_worker(rpc_sock);
        std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
    }
    let (_, generation, upgrades, recoveries) = status(rpc_sock);
    assert_eq!((generation, upgrades, recoveries), (5, 2, 2));
    x.finish_clean(tcp, local);
    let log = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let losses = log("front.log").matches("reconnecting").count();
    assert!(
        losses >= 4,
        "the host lost its connection {losses} times, not at each of the 4 workers' ends"
    );
    drop(x);
}

/// What a hostile NVMe/TCP peer got from the target.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The answer the protocol names: a C2HTermReq and a close, or an error response.
    Named,
    /// The connection closed with nothing sent (its worker was being replaced).
    Cut,
}

/// The next PDU on `s`: `None` when the target closed the connection first.
fn read_pdu(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).ok()?;
    let plen = u32::from_le_bytes(h[4..8].try_into().ok()?) as usize;
    assert!((8..=1 << 20).contains(&plen), "PDU length {plen}");
    let mut all = vec![0u8; plen];
    all[..8].copy_from_slice(&h);
    s.read_exact(&mut all[8..]).ok()?;
    Some(all)
}

/// The target closes `s` without sending more (EOF within the read timeout).
fn closes(s: &mut std::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// One round of three hostile peers: an unknown PDU type (C2HTermReq, Invalid Header
/// Field, then a close), a Read before Connect (Command Sequence Error), a capsule cut short
/// and abandoned (nothing to answer). `Cut` when a connection closed with no answer.
fn hostile_round(addr: std::net::SocketAddr) -> Answer {
    use nvme_spec::tcp::{fes, pdu_type};
    use nvmeof::pdu::{self, Negotiated, Pdu};
    use std::io::Write;
    let open = || {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let mut s = open();
    s.write_all(&[0xff, 0, 8, 0, 8, 0, 0, 0]).unwrap();
    let Some(t) = read_pdu(&mut s) else {
        return Answer::Cut;
    };
    assert_eq!(t[0], pdu_type::C2H_TERM_REQ, "unknown PDU type: {t:?}");
    assert_eq!(
        u16::from_le_bytes([t[8], t[9]]),
        fes::INVALID_HEADER_FIELD,
        "FES"
    );
    assert!(closes(&mut s), "left open after its C2HTermReq");

    let mut s = open();
    let neg = Negotiated::default();
    let mut out = Vec::new();
    pdu::encode(
        &Pdu::IcReq {
            pfv: 0,
            hpda: 0,
            dgst: 0,
            maxr2t: 0,
        },
        &neg,
        &mut out,
    );
    let mut sqe = nvme_spec::Submission::default();
    sqe.opcode = 0x02; // a Read before Connect
    sqe.cid = 9.into();
    pdu::encode_append(&Pdu::CapsuleCmd { sqe, data: &[] }, &neg, &mut out);
    let _ = s.write_all(&out);
    let Some(ic) = read_pdu(&mut s) else {
        return Answer::Cut;
    };
    assert_eq!(ic[0], pdu_type::IC_RESP, "{ic:?}");
    let Some(r) = read_pdu(&mut s) else {
        return Answer::Cut;
    };
    assert_eq!(r[0], pdu_type::CAPSULE_RESP, "{r:?}");
    let st = nvme_spec::Status::from_cqe_bits(u16::from_le_bytes([r[22], r[23]]));
    assert_eq!(
        st,
        nvme_spec::Status::COMMAND_SEQUENCE_ERROR,
        "Read before Connect"
    );

    let mut s = open();
    let _ = s.write_all(&out[..out.len() - 60]); // the ICReq and a capsule cut short
    drop(s);
    Answer::Named
}

/// A supervised daemon exporting a RAM namespace over NVMe/TCP on a free port: the
/// supervisor, its management socket and the port.
fn supervised_tcp_export(dir: &Path, nqn: &str) -> (Served, PathBuf, u16) {
    let port = free_port();
    let cfg = format!(
        "[[controller]]\ntcp_listen = \"127.0.0.1:{port}\"\nnqn = \"{nqn}\"\n\
         [[controller.namespace]]\nbackend = \"malloc:16M\"\n"
    );
    let (served, rpc_sock) = serve_config(dir, &cfg, &[]);
    wait_listening(port, "the supervised export");
    (served, rpc_sock, port)
}

/// A TCP connection to `port` past NVMe/TCP connection initialization (ICReq, ICResp), and
/// the ICReq's bytes (something to send again).
fn initialized_connection(port: u16) -> (std::net::TcpStream, Vec<u8>) {
    use nvme_spec::tcp::pdu_type;
    use nvmeof::pdu::{self, Negotiated, Pdu};
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ic = Vec::new();
    let req = Pdu::IcReq {
        pfv: 0,
        hpda: 0,
        dgst: 0,
        maxr2t: 0,
    };
    pdu::encode(&req, &Negotiated::default(), &mut ic);
    s.write_all(&ic).unwrap();
    let r = read_pdu(&mut s).expect("ICResp");
    assert_eq!(r[0], pdu_type::IC_RESP, "{r:?}");
    (s, ic)
}

/// A host that has not noticed yet: `s` reads end of stream (not a reset), two sends after
/// it (`bytes`) are taken (a reset makes the second fail), then the host closes its end.
fn hung_up_gracefully(s: &mut std::net::TcpStream, bytes: &[u8], dir: &Path) {
    use std::io::Write;
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        other => panic!(
            "the host read {other:?}, not end of stream\n{}",
            daemon_events(&dir.join("daemon.log"))
        ),
    }
    for i in 0..2 {
        if let Err(e) = s.write_all(bytes) {
            panic!(
                "send {i} after the target's end of stream: {e}\n{}",
                daemon_events(&dir.join("daemon.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
}

/// A planned upgrade hangs up on an NVMe/TCP host gracefully: the host reads end of stream,
/// not a reset, and what it still sends before it closes its end is taken, so no send fails
/// (on a reset, Linux's nvme-tcp host raises SIGPIPE in the task submitting the I/O); then
/// the next worker serves the host's new connection.
#[test]
fn an_upgrade_hangs_up_on_nvme_tcp_hosts_without_a_reset() {
    let tmp = TempDir::new("upgrade-hang-up");
    let dir = tmp.path();
    let (_served, rpc_sock, port) = supervised_tcp_export(dir, "nqn.2026-12.io.vnvme:hang-up");
    let (mut s, ic) = initialized_connection(port);
    let upgrade = {
        let rpc_sock = rpc_sock.clone();
        std::thread::spawn(move || rpc(&rpc_sock, &["daemon_upgrade"]))
    };
    hung_up_gracefully(&mut s, &ic, dir);
    let r = upgrade.join().expect("upgrade");
    assert!(r.get("generation").is_some(), "{r}");
    // the worker hung up, and its host closed in time: nothing was left to the supervisor
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("hung up on NVMe-oF hosts: those of 1 of 1 targets closed"),
        "{log}"
    );
    // the next worker serves a new connection
    drop(initialized_connection(port));
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(!log.contains("connections the worker left"), "{log}");
}

/// A worker waiting out its hang-up on a host that never closes (up to 500 ms) naps in
/// poll(2) on the connection instead of spinning on a core its hosts and the next worker may
/// need: its CPU time over the wait stays far below the wait (a spinning reactor used about
/// all of it: 490 ms of 526). The host is then closed on, and the next worker serves.
#[test]
fn a_worker_hanging_up_on_a_silent_host_does_not_spin() {
    let tmp = TempDir::new("hang-up-naps");
    let dir = tmp.path();
    let (_served, rpc_sock, port) = supervised_tcp_export(dir, "nqn.2026-12.io.vnvme:naps");
    let (mut silent, _) = initialized_connection(port);
    let (worker, ..) = status(&rpc_sock);
    let cpu_ms = |pid: u64| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf(3) with a valid name.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Some(ticks * 1000 / hz.max(1))
    };
    let before = cpu_ms(worker).expect("the worker's CPU time");
    let upgrade = {
        let rpc_sock = rpc_sock.clone();
        std::thread::spawn(move || rpc(&rpc_sock, &["daemon_upgrade"]))
    };
    // the last reading before the worker exits
    let (mut last, t) = (before, Instant::now());
    while let Some(ms) = cpu_ms(worker) {
        last = ms;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the worker did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = upgrade.join().expect("upgrade");
    assert!(r.get("generation").is_some(), "{r}");
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("hung up on NVMe-oF hosts: those of 0 of 1 targets closed"),
        "the silent host kept the worker waiting: {log}"
    );
    assert!(
        last - before < 250,
        "the worker used {} ms of CPU while waiting about 500 ms for a silent host",
        last - before
    );
    // the host is closed on (end of stream), and the next worker serves a new connection
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 8];
    assert!(matches!(silent.read(&mut b), Ok(0)), "not closed on");
    drop(initialized_connection(port));
}

/// A killed worker's NVMe/TCP connections are hung up on gracefully too: the supervisor
/// kept a duplicate of each, and once the worker is gone ends their write side and takes
/// what the hosts still send until they close. A host that never closes (and never reads)
/// holds nothing up: it is closed after 500 ms. The next worker serves new connections.
#[test]
fn a_killed_worker_s_nvme_tcp_hosts_are_hung_up_on_without_a_reset() {
    let tmp = TempDir::new("kill-hang-up");
    let dir = tmp.path();
    let (_served, rpc_sock, port) = supervised_tcp_export(dir, "nqn.2026-12.io.vnvme:kill-hang-up");
    let (mut s, ic) = initialized_connection(port);
    let (mut stubborn, _) = initialized_connection(port);
    let killed = {
        let rpc_sock = rpc_sock.clone();
        std::thread::spawn(move || kill_worker(&rpc_sock))
    };
    hung_up_gracefully(&mut s, &ic, dir);
    killed.join().expect("kill");
    // the stubborn host is closed on, within the supervisor's wait and a margin
    stubborn
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 8];
    let end = stubborn.read(&mut b);
    assert!(
        matches!(end, Ok(0))
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the stubborn host read {end:?}"
    );
    let t = Instant::now();
    let want = "hung up on 2 NVMe-oF connections the worker left (1 closed by their hosts";
    while !std::fs::read_to_string(dir.join("daemon.log"))
        .unwrap_or_default()
        .contains(want)
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            daemon_events(&dir.join("daemon.log"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(initialized_connection(port));
}

/// The descriptors a process has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The supervisor keeps a duplicate of each connection of the worker and lets go of those
/// the worker ended, whoever ended them: 40 hosts that close, 20 that break the protocol
/// (the target answers C2HTermReq and closes): its descriptors come back to what they
/// were, and the worker still serves.
#[test]
fn connections_a_worker_ended_are_let_go_of_by_its_supervisor() {
    use std::io::Write;
    let tmp = TempDir::new("kept-sweep");
    let dir = tmp.path();
    let (served, _rpc_sock, port) = supervised_tcp_export(dir, "nqn.2026-12.io.vnvme:sweep");
    // one connection first: the worker has its keeper, the supervisor its thread
    drop(initialized_connection(port));
    std::thread::sleep(Duration::from_millis(1500));
    let sup = served.0.id();
    let before = open_fds(sup);
    let open: Vec<_> = (0..40).map(|_| initialized_connection(port)).collect();
    // the supervisor keeps each (a duplicate: one descriptor more per connection)
    let t = Instant::now();
    while open_fds(sup) < before + 40 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the supervisor keeps {} descriptors, {before} before 40 connections",
            open_fds(sup)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(open);
    for _ in 0..20 {
        let (mut s, _) = initialized_connection(port);
        s.write_all(&[0xff, 0, 8, 0, 8, 0, 0, 0]).unwrap();
        let t = read_pdu(&mut s).expect("C2HTermReq");
        assert_eq!(t[0], nvme_spec::tcp::pdu_type::C2H_TERM_REQ, "{t:?}");
        assert!(closes(&mut s), "left open after its C2HTermReq");
    }
    let t = Instant::now();
    loop {
        let now = open_fds(sup);
        if now <= before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the supervisor holds {now} descriptors, {before} before 60 connections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(initialized_connection(port));
}

/// NVMe/TCP peers that break the protocol, against an export of a supervised daemon (the
/// supervisor holds the listener, the worker serves the connections), before, during and
/// after an upgrade: every peer gets the answer the protocol names, or, while its worker is
/// being replaced, a closed connection; the worker is never lost to them (no recovery); a
/// vfio-user neighbour's verified I/O and a well-behaved host's verified I/O over the same
/// export run clean throughout.
#[test]
fn hostile_nvme_tcp_peers_of_a_supervised_export_harm_nobody() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let tmp = TempDir::new("upgrade-tcp-hostile");
    let dir = tmp.path();
    let x = SupervisedExport::start(dir, "nqn.2026-12.io.vnvme:supervised-hostile");
    let (sock, rpc_sock, front_sock) = (&x.sock, &x.rpc_sock, &x.front_sock);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", x.port).parse().unwrap();
    let tcp = perf(front_sock, 12);
    let local = perf(sock, 12);
    std::thread::sleep(Duration::from_millis(500));

    // the peers, in a thread; each round's outcome with when it ran
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(Mutex::new(Vec::<(Instant, Instant, Answer)>::new()));
    let peers = {
        let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
        std::thread::spawn(move || {
            // a peer that connects and never speaks, held across the upgrade
            let _idle = std::net::TcpStream::connect(addr).expect("connect");
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let a = hostile_round(addr);
                rounds.lock().unwrap().push((t, Instant::now(), a));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let upgrade_from = Instant::now();
    let r = rpc(rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "upgrade: {r}");
    let upgrade_to = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    peers.join().expect("the hostile peers' thread");

    let rounds = rounds.lock().unwrap();
    let around = |from: Instant, to: Instant| {
        to + Duration::from_millis(50) >= upgrade_from
            && from <= upgrade_to + Duration::from_millis(500)
    };
    for (from, to, a) in rounds.iter() {
        assert!(
            *a == Answer::Named || around(*from, *to),
            "a hostile peer's connection closed unanswered away from the upgrade"
        );
    }
    let named = |before: bool| {
        rounds
            .iter()
            .filter(|(f, _, a)| *a == Answer::Named && (*f < upgrade_from) == before)
            .count()
    };
    assert!(
        named(true) >= 10 && named(false) >= 10,
        "hostile rounds answered: {} before the upgrade, {} after",
        named(true),
        named(false)
    );
    let (_, generation, upgrades, recoveries) = status(rpc_sock);
    assert_eq!(
        (generation, upgrades, recoveries),
        (2, 1, 0),
        "the worker was lost to hostile peers"
    );
    x.finish_clean(tcp, local);
    eprintln!(
        "{} hostile rounds ({} before the upgrade, {} after, {} cut by it)",
        rounds.len(),
        named(true),
        named(false),
        rounds.iter().filter(|r| r.2 == Answer::Cut).count()
    );
    drop(x);
}

/// `vnvme serve --unsupervised --tcp-listen 127.0.0.1:PORT --nqn NQN --ns NS` as a child,
/// once listening (one process: SIGSTOP stops its data plane).
fn tcp_target(dir: &Path, name: &str, port: u16, nqn: &str, ns: &str) -> Served {
    let s = Served(
        Command::new(vnvme_binary())
            .args([
                "serve",
                "--unsupervised",
                "--tcp-listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--nqn", nqn, "--ns", ns])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("vnvme serve --tcp-listen"),
    );
    wait_listening(port, name);
    s
}

fn signal(c: &Served, sig: i32) {
    // SAFETY: kill(2) with our own child's pid and a plain signal number.
    assert_eq!(unsafe { libc::kill(c.0.id() as i32, sig) }, 0);
}

/// The fence of a network namespace: a supervised worker whose namespace is `nvme-tcp://`
/// on a vnvme target is killed while that target's own backend (a second target) is
/// stopped, so the writes the worker sent are still running there. The new worker connects
/// again as the same host and gets Controller Busy until they are done (the target holds a
/// host's new association while its lost one has commands), then sends its journalled
/// commands again: the verified workload sees a stall, no failed command and no mismatch.
#[test]
fn a_network_namespace_is_fenced_when_its_worker_dies() {
    let tmp = TempDir::new("upgrade-fence");
    let dir = tmp.path();
    let (back_port, mid_port) = (free_port(), free_port());
    let back = tcp_target(
        dir,
        "back",
        back_port,
        "nqn.2026-12.io.vnvme:fence-back",
        "malloc:64M",
    );
    let mid_nqn = "nqn.2026-12.io.vnvme:fence-mid";
    let mid = tcp_target(
        dir,
        "mid",
        mid_port,
        mid_nqn,
        &format!("nvme-tcp://127.0.0.1:{back_port}/nqn.2026-12.io.vnvme:fence-back/1"),
    );
    let sock = dir.join("c0.sock");
    let cfg = format!(
        "[[controller]]\nsocket = \"{}\"\n[[controller.namespace]]\n\
         backend = \"nvme-tcp://127.0.0.1:{mid_port}/{mid_nqn}/1?reconnect_delay=1\"\n",
        sock.display(),
    );
    let (_served, rpc_sock) = serve_config(dir, &cfg, std::slice::from_ref(&sock));
    let p = perf(&sock, 12);
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..2 {
        signal(&back, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(200));
        let (pid, generation, _, _) = status(&rpc_sock);
        // SAFETY: kill(2) with the worker's pid as the supervisor reports it.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        // the next worker's Connect is held while the lost writes wait on the stopped
        // backend: let them finish, then the worker comes up
        std::thread::sleep(Duration::from_millis(800));
        signal(&back, libc::SIGCONT);
        let t = Instant::now();
        while status(&rpc_sock).1 == generation {
            assert!(t.elapsed() < Duration::from_secs(10), "no new worker");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
    }
    let (_, generation, _, recoveries) = status(&rpc_sock);
    assert_eq!((generation, recoveries), (3, 2));
    let log = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let (ok, out) = finish(p);
    assert!(
        ok && out.contains(" 0 mismatches"),
        "{out}\ndaemon:\n{}\nmid target:\n{}",
        log("daemon.log"),
        log("mid.log")
    );
    let fenced = log("mid.log")
        .matches("waits for the commands of its last association")
        .count();
    assert!(
        fenced >= 1,
        "the new workers never waited for the lost ones' commands:\n{}",
        log("mid.log")
    );
    eprintln!(
        "{} | fenced Connects logged: {fenced}",
        out.lines()
            .filter(|l| l.starts_with("Total") || l.starts_with("verified"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    drop(mid);
}

/// SR-IOV under `--supervised`: the PF and each VF are controllers on sockets of their own,
/// all relayed by the supervisor and restored by the next worker. A verified workload on the
/// PF and on each of two VFs (each on a namespace attached to it alone) runs through two
/// upgrades and two kills without a failed command or a mismatch.
#[test]
fn a_pf_and_its_vfs_ride_through_upgrades_and_crashes() {
    let tmp = TempDir::new("upgrade-sriov");
    let dir = tmp.path();
    let (_served, socks, rpc_sock) = pf_and_two_vfs(dir, "vfs_online = true\n", "32M");
    let perfs: Vec<Child> = socks.iter().map(|s| perf(s, 14)).collect();
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let r = rpc(&rpc_sock, &["daemon_upgrade"]);
        assert!(r.get("generation").is_some(), "upgrade {i}: {r}");
        std::thread::sleep(Duration::from_millis(random_ms(1000, 2000)));
        kill_worker(&rpc_sock);
        std::thread::sleep(Duration::from_millis(random_ms(1000, 2000)));
    }
    let list = rpc(&rpc_sock, &["controller_list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
    for (p, s) in perfs.into_iter().zip(&socks) {
        let (ok, out) = finish(p);
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        assert!(
            ok && out.contains(" 0 mismatches") && !out.contains("verified 0 blocks"),
            "{}:\n{out}\ndaemon:\n{log}",
            s.display()
        );
    }
}

/// Namespaces added and attached at run time (`ns_add`, `ns_attach`) live in the worker's
/// memory: the supervisor replays them to each next worker before its controllers restore.
/// A verified workload on the namespace added at run time (and on the configured one) runs
/// through an upgrade and a kill; the subsystem still lists it attached after both. Calls
/// that would not replay faithfully stay refused.
#[test]
fn namespaces_added_at_run_time_outlive_the_worker() {
    let tmp = TempDir::new("upgrade-ns-add");
    let dir = tmp.path();
    let sock = dir.join("pf.sock");
    let cfg = format!(
        "[[lvstore]]\nname = \"pool\"\nbackend = \"file:{}:96M\"\ncluster_size = \"64K\"\n\
         [[lvstore.volume]]\nname = \"extra\"\nsize = \"32M\"\nthin = true\n\
         [[controller]]\nsocket = \"{}\"\nvfs = 1\nvfs_online = true\n\
         [[controller.namespace]]\nbackend = \"file:{}:32M\"\nattach = [0]\n",
        dir.join("pool.img").display(),
        sock.display(),
        dir.join("d0.img").display()
    );
    let socks = [sock.clone(), dir.join("pf.vf1.sock")];
    let (_served, rpc_sock) = serve_config(dir, &cfg, &socks);
    let sub = rpc(&rpc_sock, &["subsystem_list"]);
    let nqn = sub[0]["nqn"].as_str().expect("nqn").to_owned();
    let pf = rpc(&rpc_sock, &["controller_list"])[0]["cntlid"]
        .as_u64()
        .expect("cntlid");
    let nsid = add_and_attach(&rpc_sock, &nqn, "lvol:pool/extra", pf);
    // the worker answers (no pool: no capacity for it)
    let e = rpc_refused(&rpc_sock, &["ns_create", &format!("nqn={nqn}"), "size=1M"]);
    assert!(e.contains("capacity"), "{e}");
    // an NSID a caller names (as the replay does): out of range or taken, refused; the
    // verified I/O below runs on the namespaces after
    for (wanted, why) in [
        ("0", "nsid: 1..=256"),
        ("257", "0..=256"),
        (&*nsid.to_string(), "has a namespace"),
    ] {
        let e = rpc_refused(
            &rpc_sock,
            &[
                "ns_add",
                &format!("nqn={nqn}"),
                "backend=lvol:pool/extra",
                &format!("nsid={wanted}"),
            ],
        );
        assert!(e.contains(why), "nsid={wanted}: {e}");
    }

    // perf finds both namespaces on the PF and verifies each
    verified_through_an_upgrade_and_a_kill(&sock, &rpc_sock, dir, nsid);
    let sub = rpc(&rpc_sock, &["subsystem_list"]);
    let ns = sub[0]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["nsid"].as_u64() == Some(nsid))
        .cloned();
    assert!(
        ns.as_ref()
            .is_some_and(|n| n["attached"].to_string().contains(&pf.to_string())),
        "namespace {nsid} after an upgrade and a kill: {sub}"
    );
}

/// A mirrored array, a volume store on it and a namespace on one of its volumes, all made at
/// run time (`raid_create`, `lvs_create`, `lvol_create`, `ns_add`, `ns_attach`): the
/// supervisor replays them to each next worker (the store loads, the array assembles from
/// its members' superblocks), so verified I/O on that namespace runs through an upgrade and
/// a kill. A store made and deleted at run time is not made again: its creation left the
/// list with its deletion.
#[test]
fn stores_and_arrays_made_at_run_time_outlive_the_worker() {
    let tmp = TempDir::new("upgrade-lvs-raid");
    let dir = tmp.path();
    let d0 = format!("file:{}:16M", dir.join("d0.img").display());
    let (_served, sock, rpc_sock, nqn, pf) = pf_and_a_vf(dir, &d0);
    let members = format!(
        "members=[\"file:{}:48M\",\"file:{}:48M\"]",
        dir.join("m0.img").display(),
        dir.join("m1.img").display()
    );
    mirror_store_volume(&rpc_sock, &members);
    // made and deleted at run time: must not come back
    let gone = format!("backend=file:{}:16M", dir.join("gone.img").display());
    rpc(&rpc_sock, &["lvs_create", "name=gone", &gone]);
    rpc(&rpc_sock, &["lvs_delete", "name=gone"]);
    let nsid = add_and_attach(&rpc_sock, &nqn, "lvol:rt/v", pf);

    let log = verified_through_an_upgrade_and_a_kill(&sock, &rpc_sock, dir, nsid);
    // every replay went through, twice
    assert!(!log.contains("supervisor: replaying"), "{log}");
    assert_eq!(log.matches("run-time changes replayed").count(), 2, "{log}");
    let stores = rpc(&rpc_sock, &["lvs_list"]).to_string();
    assert!(
        stores.contains("\"rt\"") && !stores.contains("\"gone\""),
        "{stores}"
    );
    let arrays = rpc(&rpc_sock, &["raid_list"]).to_string();
    assert!(arrays.contains("\"mirror\""), "{arrays}");
}

/// A vfio-user subsystem with a VF made at run time (`subsystem_create`): the supervisor
/// owns the PF's and the VF's sockets from before the worker makes them, hands them to every
/// next worker and replays the call, so verified I/O on the PF and on the VF runs through
/// an upgrade and a kill. Deleted
/// (`subsystem_delete`), its socket goes and the next worker does not make it again, but
/// keeps its entry number: a subsystem made after it has the same NQN in every worker. A
/// configured subsystem deleted goes too, and does not come back from the configuration in
/// the next workers. What the supervisor cannot own at run time is refused, saying so.
#[test]
fn a_subsystem_made_at_run_time_outlives_the_worker() {
    let tmp = TempDir::new("upgrade-subsystem");
    let dir = tmp.path();
    let (_served, socks, rpc_sock) = supervised(dir, 1);
    let made = dir.join("made.sock");
    let create = |sock: &Path, img: &str| {
        rpc(
            &rpc_sock,
            &[
                "subsystem_create",
                &format!("socket={}", sock.display()),
                &format!(
                    "namespace=[{{\"backend\":\"file:{}:32M\"}}]",
                    dir.join(img).display()
                ),
            ],
        )["nqn"]
            .as_str()
            .expect("nqn")
            .to_owned()
    };
    // with a VF: the supervisor owns the PF's and the VF's sockets
    let made_vf = dir.join("made.vf1.sock");
    let nqn = rpc(
        &rpc_sock,
        &[
            "subsystem_create",
            &format!("socket={}", made.display()),
            "vfs=1",
            "vfs_online=true",
            &format!(
                "namespace=[{{\"backend\":\"file:{}:32M\",\"attach\":[0]}},\
                 {{\"backend\":\"file:{}:32M\",\"attach\":[1]}}]",
                dir.join("made.img").display(),
                dir.join("made-vf.img").display()
            ),
        ],
    )["nqn"]
        .as_str()
        .expect("nqn")
        .to_owned();
    wait_for(&made);
    wait_for(&made_vf);
    let perfs = [perf(&made, 8), perf(&made_vf, 8)];
    std::thread::sleep(Duration::from_secs(2));
    let r = rpc(&rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(random_ms(1200, 2000)));
    kill_worker(&rpc_sock);
    let log = || std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    for p in perfs {
        let (ok, out) = finish(p);
        assert!(
            ok && out.contains(" 0 mismatches") && !out.contains("verified 0 blocks"),
            "{out}\ndaemon:\n{}",
            log()
        );
    }
    let count = || {
        rpc(&rpc_sock, &["subsystem_list"])
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(count(), 2);

    // what the supervisor cannot carry is refused, saying so
    let e = rpc_refused(
        &rpc_sock,
        &[
            "subsystem_create",
            "tcp_listen=127.0.0.1:1",
            "namespace_pool=malloc:64M",
        ],
    );
    assert!(e.contains("needs a vfio-user socket"), "{e}");
    let configured = rpc(&rpc_sock, &["subsystem_list"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["nqn"].as_str().map(str::to_owned))
        .find(|n| *n != nqn)
        .expect("the configured subsystem");
    assert!(socks[0].exists());

    // deleted: its socket goes, and it stays gone in the next worker
    rpc(&rpc_sock, &["subsystem_delete", &format!("nqn={nqn}")]);
    let t = std::time::Instant::now();
    while made.exists() || made_vf.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "socket still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = dir.join("again.sock");
    let nqn2 = create(&again, "again.img");
    wait_for(&again);
    rpc(&rpc_sock, &["daemon_upgrade"]);
    assert_eq!(count(), 2, "{}", log());
    assert!(!made.exists());
    let nqns = rpc(&rpc_sock, &["subsystem_list"]).to_string();
    assert!(
        nqns.contains(&nqn2) && !nqns.contains(&format!("\"{nqn}\"")),
        "{nqns}"
    );
    assert!(!log().contains("supervisor: replaying"), "{}", log());
    let p = perf(&again, 3);
    let (ok, out) = finish(p);
    assert!(
        ok && out.contains(" 0 mismatches"),
        "{out}\ndaemon:\n{}",
        log()
    );

    // the configured subsystem deleted: its socket goes, and it does not come back from the
    // configuration in the next workers (upgrade, kill); the one made after it keeps its NQN
    rpc(
        &rpc_sock,
        &["subsystem_delete", &format!("nqn={configured}")],
    );
    let t = std::time::Instant::now();
    while socks[0].exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "socket still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    rpc(&rpc_sock, &["daemon_upgrade"]);
    kill_worker(&rpc_sock);
    let nqns = rpc(&rpc_sock, &["subsystem_list"]).to_string();
    assert!(
        nqns.contains(&nqn2) && !nqns.contains(&format!("\"{configured}\"")),
        "{nqns}\n{}",
        log()
    );
    assert!(!socks[0].exists());
    let e = rpc_refused(
        &rpc_sock,
        &["subsystem_delete", &format!("nqn={configured}")],
    );
    assert!(e.contains(&configured), "deleted twice: {e}");
    let (ok, out) = finish(perf(&again, 2));
    assert!(ok && out.contains(" 0 mismatches"), "{out}");
}

/// `malloc:` namespaces under a supervisor: their RAM is a memfd the supervisor keeps and
/// hands to every worker, so what a host wrote is read back after an upgrade and a kill. A
/// configured RAM namespace and a volume on a mirror of two RAM members made at run time:
/// verified I/O on both, 0 mismatches (without kept RAM the next worker reads zeroes). A
/// store on RAM deleted at run time lets go of its RAM.
#[test]
fn ram_namespaces_keep_their_data_across_workers() {
    let tmp = TempDir::new("upgrade-malloc");
    let dir = tmp.path();
    let (_served, sock, rpc_sock, nqn, pf) = pf_and_a_vf(dir, "malloc:16M");
    mirror_store_volume(&rpc_sock, "members=[\"malloc:32M\",\"malloc:32M\"]");
    let nsid = add_and_attach(&rpc_sock, &nqn, "lvol:rt/v", pf);
    // a store on RAM made and deleted
    rpc(
        &rpc_sock,
        &["lvs_create", "name=gone", "backend=malloc:16M"],
    );
    rpc(&rpc_sock, &["lvs_delete", "name=gone"]);
    // a RAM member replaced at run time: the new one's RAM is kept (the superblocks name it),
    // the removed one's let go
    let removed = rpc(
        &rpc_sock,
        &["raid_remove_member", "name=mirror", "member=1"],
    );
    assert_eq!(removed["member"], "malloc:32M@r1", "{removed}");
    rpc(
        &rpc_sock,
        &["raid_add_member", "name=mirror", "member=malloc:32M"],
    );
    let mirror = || rpc(&rpc_sock, &["raid_list"])[0].clone();
    let t = Instant::now();
    while mirror()["last_rebuild"]["finished"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no rebuild: {}",
            mirror()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let log = verified_through_an_upgrade_and_a_kill(&sock, &rpc_sock, dir, nsid);
    assert!(!log.contains("supervisor: replaying"), "{log}");
    assert_eq!(log.matches("run-time changes replayed").count(), 2, "{log}");
    // RAM made at run time: the two members' (r0, r1) and the deleted store's (r2)
    assert!(log.contains("RAM r2 let go"), "{log}");
    assert!(!log.contains("RAM r0 let go"), "{log}");
    // the removed member's RAM stays: the array's creation, replayed, names it
    assert!(!log.contains("RAM r1 let go"), "{log}");
    assert!(!log.contains("RAM r3 let go"), "{log}");
    let m = mirror();
    let members: Vec<(String, String)> = m["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["member"].as_str().unwrap().to_owned(),
                x["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        members
            .iter()
            .any(|(spec, state)| spec == "malloc:32M@r3" && state == "active"),
        "the member added at run time, after an upgrade and a kill: {m}"
    );
    // removed again, its RAM goes (within a moment: the supervisor's loop)
    rpc(
        &rpc_sock,
        &["raid_remove_member", "name=mirror", "member=malloc:32M@r3"],
    );
    let t = Instant::now();
    let daemon_log = || std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    while !daemon_log().contains("RAM r3 let go") {
        assert!(t.elapsed() < Duration::from_secs(3), "{}", daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stores = rpc(&rpc_sock, &["lvs_list"]).to_string();
    assert!(
        stores.contains("\"rt\"") && !stores.contains("\"gone\""),
        "{stores}"
    );
}

/// SR-IOV state the PF's host set at run time (`vfs_online = false`): it brings two VFs
/// online with VF Enable (NumVFs = 2 in the SR-IOV capability) and takes VF 2 offline again
/// with Virtualization Management. The PF's journal carries that (NVMe base 2.0 §8.26), so
/// after an upgrade and a kill VF 1 is still online (verified I/O on it runs through both,
/// 0 mismatches) and VF 2 still offline: the VF Enable the supervisor replays to the next
/// worker does not bring it back. The PF's host keeps its connection and its admin queue.
#[test]
fn vfs_the_pf_host_brought_online_stay_so_across_workers() {
    const CONFIG: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
    let tmp = TempDir::new("upgrade-virt");
    let dir = tmp.path();
    let (_served, socks, rpc_sock) = pf_and_two_vfs(dir, "", "16M");
    let pf = socks[0].clone();
    let states = || -> Vec<String> {
        rpc(&rpc_sock, &["controller_list"])
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["kind"] == "vf")
            .map(|c| c["state"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(states(), ["offline", "offline"]);
    let vf2 = rpc(&rpc_sock, &["controller_list"])
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["vf"] == 2)
        .and_then(|c| c["cntlid"].as_u64())
        .expect("VF 2's cntlid");

    // the PF's host: NumVFs = 2, VF Enable; then VF 2 offline (Virtualization Management)
    let mut host = vnvme_tests::nvme_client::NvmeClient::connect(&pf);
    host.client
        .region_write(CONFIG, 0x110, &2u16.to_le_bytes())
        .unwrap();
    host.client
        .region_write(CONFIG, 0x108, &1u16.to_le_bytes())
        .unwrap();
    assert_eq!(states(), ["online", "online"]);
    host.enable();
    let offline = vnvme_tests::nvme_client::cmd(0x1c, 0, 0, &[0x7 | ((vf2 as u32) << 16)]);
    assert!(host.submit(0, offline).ok(), "secondary offline");
    assert_eq!(states(), ["online", "offline"]);

    let p = perf(&socks[1], 10);
    std::thread::sleep(Duration::from_secs(2));
    let r = rpc(&rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
    kill_worker(&rpc_sock);
    let (ok, out) = finish(p);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        ok && out.contains(" 0 mismatches") && !out.contains("verified 0 blocks"),
        "VF 1:\n{out}\ndaemon:\n{log}"
    );
    // VF 1 online (perf disabled its controller on the way out), VF 2 offline
    assert_eq!(states(), ["online", "offline"], "{log}");
    assert_eq!(
        log.matches("SR-IOV state restored: 1 of 2 VFs online")
            .count(),
        2,
        "{log}"
    );
    // the PF's host still has its controller: an admin command completes
    let get_features = vnvme_tests::nvme_client::cmd(0x0a, 0, 0, &[0x07]);
    assert!(host.submit(0, get_features).ok(), "the PF's admin queue");
}

/// An NVMe/TCP export made at run time (`subsystem_create` with `tcp_listen`): the
/// supervisor binds the listener first and hands it to every worker, as for a configured
/// one. A host daemon whose namespace is the export runs verified I/O through an upgrade and
/// a kill: 0 errors, 0 mismatches. Deleted, the export's port is let go (nothing listens
/// there), and the same address can be exported again. An address served already, or
/// garbage, is refused.
#[test]
fn an_nvme_tcp_export_made_at_run_time_outlives_the_worker() {
    let tmp = TempDir::new("upgrade-tcp-run-time");
    let dir = tmp.path();
    let (served, socks, rpc_sock) = supervised(dir, 1);
    let port = free_port();
    let export = |name: &str| {
        rpc(
            &rpc_sock,
            &[
                "subsystem_create",
                &format!("tcp_listen=127.0.0.1:{port}"),
                &format!("nqn=nqn.2026-12.io.vnvme:{name}"),
                &format!(
                    "namespace=[{{\"backend\":\"file:{}:64M\"}}]",
                    dir.join(format!("{name}.img")).display()
                ),
            ],
        )["nqn"]
            .as_str()
            .expect("nqn")
            .to_owned()
    };
    let nqn = export("rt");
    let sup = served.0.id();
    assert!(
        listens(sup, port),
        "the supervisor holds no listener on {port}"
    );
    for (args, why) in [
        (format!("tcp_listen=127.0.0.1:{port}"), "served already"),
        ("tcp_listen=nowhere".to_owned(), "IP:PORT"),
    ] {
        let e = rpc_refused(&rpc_sock, &["subsystem_create", &args]);
        assert!(e.contains(why), "{args}: {e}");
    }
    let (_front, front_sock) = tcp_host(dir, port, &nqn);
    let tcp = perf(&front_sock, 12);
    let local = perf(&socks[0], 12);
    std::thread::sleep(Duration::from_secs(2));
    let r = rpc(&rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(random_ms(2000, 3000)));
    kill_worker(&rpc_sock);
    let log = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    for (what, p) in [("nvme-tcp", tcp), ("vfio-user", local)] {
        let (ok, out) = finish(p);
        assert!(
            ok && out.contains(" 0 mismatches") && !out.contains("verified 0 blocks"),
            "{what}:\n{out}\ndaemon:\n{}\nhost:\n{}",
            log("daemon.log"),
            log("front.log")
        );
    }
    assert!(
        !log("daemon.log").contains("supervisor: replaying"),
        "{}",
        log("daemon.log")
    );
    rpc(&rpc_sock, &["subsystem_delete", &format!("nqn={nqn}")]);
    assert!(!listens(sup, port), "the supervisor kept the listener");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "port {port} still open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    export("again");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(listens(sup, port));
}

/// Whether process `pid` holds a TCP socket listening on `port` (its descriptors against
/// `/proc/net/tcp`).
fn listens(pid: u32, port: u16) -> bool {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9
                && f[1].ends_with(&format!(":{port:04X}"))
                && f[3] == "0A"
                && inodes.iter().any(|i| i == f[9])
        })
}

/// The statistics (`rpc stats`, metrics) count on across workers: after an upgrade exactly
/// (the worker saves after draining), after a kill as of the last save, at most about a
/// second old (they are saved once a second while they move).
#[test]
fn statistics_count_on_across_workers() {
    let tmp = TempDir::new("upgrade-stats");
    let (_served, socks, rpc_sock) = supervised(tmp.path(), 1);
    let counts = || {
        let s = rpc(&rpc_sock, &["stats"]);
        let c = &s[0];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        (
            n(&c["reads"]) + n(&c["writes"]),
            n(&c["namespaces"][0]["reads"]) + n(&c["namespaces"][0]["writes"]),
            n(&c["admin_commands"]),
        )
    };
    let (ok, out) = finish(perf(&socks[0], 2));
    assert!(ok, "{out}");
    let before = counts();
    assert!(
        before.0 > 1000 && before.1 == before.0 && before.2 > 0,
        "{before:?}"
    );
    let r = rpc(&rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    assert_eq!(counts(), before, "after an upgrade");
    kill_worker(&rpc_sock);
    assert_eq!(
        counts(),
        before,
        "after a kill, nothing done since the upgrade"
    );
    // a kill under I/O: what was counted more than a second before it is still there
    let p = perf(&socks[0], 6);
    std::thread::sleep(Duration::from_secs(2));
    let sampled = counts();
    std::thread::sleep(Duration::from_secs(2));
    kill_worker(&rpc_sock);
    let after = counts();
    assert!(
        after.0 >= sampled.0 && sampled.0 > before.0,
        "counted {sampled:?} 2 s before the kill, {after:?} after it"
    );
    let (ok, out) = finish(p);
    assert!(ok && out.contains(" 0 mismatches"), "{out}");
}

/// Every worker builds the configuration the supervisor read at its start, not the file as it
/// is now: an operator who edits the file (here: the two controllers swapped, a third added)
/// changes nothing until the supervisor itself restarts. Each controller's RAM namespace keeps
/// its own data through an upgrade and a kill (verified I/O on both, 0 mismatches); were the
/// file read again, the swapped entries would open each other's RAM.
#[test]
fn a_configuration_file_edited_under_the_supervisor_changes_no_worker() {
    let tmp = TempDir::new("upgrade-config-edit");
    let dir = tmp.path();
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    let entry = |s: &Path| {
        format!(
            "[[controller]]\nsocket = \"{}\"\n[[controller.namespace]]\nbackend = \"malloc:16M\"\n",
            s.display()
        )
    };
    let (_served, rpc_sock) = serve_config(dir, &(entry(&socks[0]) + &entry(&socks[1])), &socks);
    let third = dir.join("c.sock");
    let edited = entry(&socks[1]) + &entry(&socks[0]) + &entry(&third);
    std::fs::write(dir.join("vnvme.toml"), edited).unwrap();

    let perfs: Vec<Child> = socks.iter().map(|s| perf(s, 10)).collect();
    std::thread::sleep(Duration::from_secs(2));
    let r = rpc(&rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(random_ms(1500, 2500)));
    kill_worker(&rpc_sock);
    let log = || std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    for p in perfs {
        let (ok, out) = finish(p);
        assert!(
            ok && out.contains(" 0 mismatches"),
            "{out}\ndaemon:\n{}",
            log()
        );
    }
    assert!(!third.exists(), "a worker built the edited file");
    assert_eq!(status(&rpc_sock).1, 3, "{}", log());
}

/// What guests change with Namespace Management and Attachment (NVMe base 2.0 §5.20,
/// §5.19) outlives the worker: it is in the journal of the subsystem's keeper (the PF), and
/// each new worker settles to it after the replay, before any host is served again. A PF
/// with a `dir:` namespace pool and an online VF share a configured namespace. The PF's host
/// creates a namespace from the pool (4 KiB blocks), attaches it to itself and the VF,
/// writes a block, detaches the configured namespace from the VF, creates and deletes
/// another; the management plane creates one more (`ns_create`) and attaches it to the PF.
/// Through an upgrade and a kill: the same namespaces, attachments and NGUID, the block
/// reads back, the VF's host (connected throughout) sees the created namespace and no
/// longer the configured one. Fails without the settle (the next worker builds the
/// configuration: the created namespaces are gone, the configured one back on the VF).
#[test]
fn namespaces_guests_create_and_attach_outlive_the_worker() {
    guest_namespaces_outlive_the_worker(true);
}

/// The same with a `malloc:` pool: its RAM is a sparse memfd the supervisor keeps, a range
/// per NSID.
#[test]
fn namespaces_guests_create_in_a_ram_pool_outlive_the_worker() {
    guest_namespaces_outlive_the_worker(false);
}

/// [`namespaces_guests_create_and_attach_outlive_the_worker`] with a `dir:` pool (`files`)
/// or a `malloc:` one.
fn guest_namespaces_outlive_the_worker(files: bool) {
    use nvme_spec::Status;
    use vnvme_tests::ns_admin::{attach, create, delete, identify, io, open, u16_list, u32_list};
    const PF: u16 = 1;
    const VF1: u16 = 0x1001;
    let tmp = TempDir::new(if files {
        "upgrade-ns-mgmt"
    } else {
        "upgrade-ns-mgmt-ram"
    });
    let dir = tmp.path();
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let pool_spec = if files {
        format!("dir:{}:64M", pool.display())
    } else {
        "malloc:64M".to_owned()
    };
    let pf_sock = dir.join("pf.sock");
    let vf_sock = sriov::topology::vf_socket(&pf_sock, 1);
    let nqn = "nqn.2026-12.io.vnvme:pooled";
    let cfg = format!(
        "[[controller]]\nsocket = \"{}\"\nnqn = \"{nqn}\"\nvfs = 1\nvfs_online = true\n\
         namespace_pool = \"{pool_spec}\"\n[[controller.namespace]]\nbackend = \"file:{}:8M\"\n",
        pf_sock.display(),
        dir.join("configured.img").display()
    );
    let (served, rpc_sock) = serve_config(dir, &cfg, &[pf_sock.clone(), vf_sock.clone()]);
    let mut pf = open(&pf_sock);
    let mut vf = open(&vf_sock);
    let made = create(&mut pf, 2048, 2048, 1, 1).expect("create");
    assert_eq!(attach(&mut pf, false, made, &[PF, VF1]), Ok(0));
    let mut block = [0u8; 4096];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    assert_eq!(io(&mut pf, true, made, &mut block.clone()), Status::SUCCESS);
    assert_eq!(attach(&mut pf, true, 1, &[VF1]), Ok(0));
    let gone = create(&mut pf, 256, 256, 0, 1).expect("create");
    assert_eq!(delete(&mut pf, gone), Ok(0));
    let by_rpc = rpc(
        &rpc_sock,
        &[
            "ns_create",
            &format!("nqn={nqn}"),
            "size=4M",
            "block_size=4096",
        ],
    )["nsid"]
        .as_u64()
        .expect("nsid") as u32;
    rpc(
        &rpc_sock,
        &[
            "ns_attach",
            &format!("nqn={nqn}"),
            &format!("nsid={by_rpc}"),
            "controllers=[1]",
        ],
    );
    let nguid = identify(&mut pf, 0x00, made)[104..120].to_vec();
    assert!(nguid.iter().any(|&b| b != 0));
    // a subsystem made at run time with a pool of its own: its namespaces are kept from the
    // start too (nothing saved to wait for)
    let rt_sock = dir.join("rt.sock");
    rpc(
        &rpc_sock,
        &[
            "subsystem_create",
            &format!("socket={}", rt_sock.display()),
            "nqn=nqn.2026-12.io.vnvme:pooled-rt",
            &format!("namespace_pool={pool_spec}"),
        ],
    );
    let mut rt = open(&rt_sock);
    let rt_cntlid = u16::from_le_bytes(identify(&mut rt, 0x01, 0)[78..80].try_into().unwrap());
    let rt_made = create(&mut rt, 512, 512, 0, 1).expect("create at run time");
    assert_eq!(attach(&mut rt, false, rt_made, &[rt_cntlid]), Ok(0));
    assert_eq!(u32_list(&identify(&mut rt, 0x02, 0)), [rt_made]);

    let r = rpc(&rpc_sock, &["daemon_upgrade"]);
    assert!(r.get("generation").is_some(), "{r}");
    kill_worker(&rpc_sock);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();

    let mut active = vec![1, made, by_rpc];
    active.sort_unstable();
    assert_eq!(u32_list(&identify(&mut pf, 0x02, 0)), active, "{log}");
    assert_eq!(u16_list(&identify(&mut pf, 0x12, made)), [PF, VF1]);
    assert_eq!(u16_list(&identify(&mut pf, 0x12, 1)), [PF]);
    assert_eq!(u16_list(&identify(&mut pf, 0x12, by_rpc)), [PF]);
    assert_eq!(identify(&mut pf, 0x00, made)[104..120], nguid[..]);
    assert_eq!(u32_list(&identify(&mut vf, 0x02, 0)), [made]);
    let mut back = [0u8; 4096];
    assert_eq!(io(&mut vf, false, made, &mut back), Status::SUCCESS);
    assert_eq!(back, block, "the created namespace's data");
    assert_eq!(io(&mut vf, false, 1, &mut back), Status::INVALID_NAMESPACE);
    assert_eq!(u32_list(&identify(&mut rt, 0x02, 0)), [rt_made], "{log}");
    assert!(!log.contains("supervisor: replaying"), "{log}");
    assert!(!log.contains("not put back"), "{log}");
    assert_eq!(log.matches("subsystems settled").count(), 3, "{log}");
    // and it goes on: deleting the created namespace removes its file
    assert_eq!(delete(&mut pf, made), Ok(0));
    let left = std::fs::read_dir(&pool).unwrap().count();
    assert_eq!(
        left,
        2 * usize::from(files),
        "the ns_create one and the run-time one"
    );
    if !files {
        // the pool's RAM is the supervisor's (one memfd)
        let sup = served.0.id();
        let kept = std::fs::read_dir(format!("/proc/{sup}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().contains("vnvme-ram"))
            .count();
        assert_eq!(kept, 2, "the pools' memfds");
    }
}
