//! Observability (issue 16 item 10) as a user sees it: `vnvme serve --metrics` in a process
//! of its own, verified I/O from the in-repo perf over vfio-user, then the Prometheus
//! endpoint scraped over TCP and `vnvme rpc stats` asked: the counters moved as the I/O did
//! (commands, bytes, the histogram's count, errors by status for two bad commands). Then the
//! endpoint is fed garbage (a huge head, a slowloris, POST, another path, binary noise) while
//! a host's verified I/O runs clean beside it; it answers or closes as it should, and
//! scrapes right after still work.

#![allow(clippy::cast_precision_loss)] // counts and nanoseconds shown as seconds and microseconds

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;
use host_driver::transport::vfio_user::VfioUserTransport;
use nvme_spec::Status;
use serde_json::Value;
use vnvme::perf::{Pattern, PerfOptions};
use vnvme_tests::guest::{TempDir, vnvme_binary};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send `request`, read the whole answer (until the server closes); "" when it closed
/// without one.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(request); // the server may answer and close before all is sent
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /metrics`: the body of a 200 answer.
fn scrape(addr: SocketAddr) -> String {
    let answer = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: text/plain\r\n\r\n",
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "the whole body");
    body.to_owned()
}

/// Samples of a scrape: series (name and labels as written) -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), v.parse().unwrap())
        })
        .collect()
}

/// The one sample of metric `name` whose labels contain every one of `labels`.
fn one(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> u64 {
    let found: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, &v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0] as u64
}

fn sum(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> u64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, &v)| v as u64)
        .sum()
}

/// Two bad I/O commands on a queue pair of our own: a Flush of a namespace that does not
/// exist, a Read past the end of namespace 1.
fn bad_commands(ctrl: &mut NvmeDriver, blocks: u64) {
    let buf = ctrl.dma().alloc(4096).unwrap();
    let mut qp = ctrl.create_io_queue_pair(4).unwrap();
    qp.flush(99, 1).unwrap();
    qp.read_write(false, 1, blocks, 8, buf.iova(), 4096, 2)
        .unwrap();
    qp.ring();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "bad commands unanswered"
        );
        qp.poll(8, |r| got.push((r.user, r.status)));
    }
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        [
            (1, Status::INVALID_NAMESPACE),
            (2, Status::LBA_OUT_OF_RANGE)
        ]
    );
    ctrl.delete_io_queue_pair(qp).unwrap();
}

/// The in-repo host driver on the controller at `sock`.
fn connect(sock: &Path) -> NvmeDriver {
    NvmeDriver::new(
        Box::new(VfioUserTransport::connect(sock).expect("connect")),
        16 << 20,
        4,
    )
    .expect("controller")
}

/// Verified random 4 KiB reads and writes, half each, QD 8, for `secs`.
fn verified_randrw(ctrl: &mut NvmeDriver, secs: Duration) -> vnvme::perf::JobResult {
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
    vnvme::perf::run(ctrl, &opts, |_, _| {})
        .expect("perf")
        .total()
}

#[test]
fn counters_move_with_the_io_and_the_endpoint_stands_garbage() {
    let tmp = TempDir::new("metrics");
    let sock = tmp.path().join("m.sock");
    let rpc = tmp.path().join("m.rpc");
    let bin = vnvme_binary();
    let mut child = Command::new(&bin)
        .args(["serve", "--socket"])
        .arg(&sock)
        .args(["--ns", "malloc:64M", "--block-size", "512"])
        .args(["--nqn", "nqn.2026-11.io.vnvme:metrics-test"])
        .args(["--metrics", "127.0.0.1:0", "--rpc"])
        .arg(&rpc)
        .stderr(Stdio::piped())
        .spawn()
        .expect("vnvme serve");
    // the bound address from the log; the log is drained to the end so the daemon never
    // blocks on a full pipe
    let stderr = child.stderr.take().unwrap();
    let daemon = Daemon(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("vnvme: metrics on http://") {
                let _ = tx.send(rest.trim_end_matches("/metrics").to_owned());
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_mins(1))
        .expect("the metrics address in the log")
        .parse()
        .unwrap();
    wait_for(&sock);
    wait_for(&rpc);

    // before any host: every I/O counter is zero, the families are declared
    let before = scrape(addr);
    for family in [
        "# TYPE vnvme_controller_commands_total counter",
        "# TYPE vnvme_controller_latency_seconds histogram",
        "# TYPE vnvme_namespace_latency_seconds histogram",
        "# TYPE vnvme_controller_errors_total counter",
        "# TYPE vnvme_controller_queue_depth gauge",
    ] {
        assert!(before.contains(family), "{family} missing:\n{before}");
    }
    let idle = samples(&before);
    let ctrl_labels = [
        "cntlid=\"1\"",
        "nqn=\"nqn.2026-11.io.vnvme:metrics-test\"",
        "kind=\"ctrl\"",
    ];
    assert_eq!(
        sum(&idle, "vnvme_controller_commands_total", &ctrl_labels),
        0
    );

    // verified random 4 KiB reads and writes, then two bad commands
    let mut ctrl = connect(&sock);
    let total = verified_randrw(&mut ctrl, Duration::from_secs(1));
    assert!(total.ios > 100, "{} I/Os", total.ios);
    assert_eq!((total.errors, total.verify_failures), (0, 0));
    assert_eq!(total.bytes, total.ios * 4096);
    bad_commands(&mut ctrl, (64 << 20) / 512);
    drop(ctrl);

    let text = scrape(addr);
    let scraped = samples(&text);
    let cm = |name: &str, extra: &[&str]| {
        let mut l = ctrl_labels.to_vec();
        l.extend_from_slice(extra);
        one(&scraped, name, &l)
    };
    let nm = |name: &str, extra: &[&str]| {
        let mut l = ctrl_labels.to_vec();
        l.push("nsid=\"1\"");
        l.extend_from_slice(extra);
        one(&scraped, name, &l)
    };
    let (reads, writes, other) = (
        cm("vnvme_controller_commands_total", &["op=\"read\""]),
        cm("vnvme_controller_commands_total", &["op=\"write\""]),
        cm("vnvme_controller_commands_total", &["op=\"other\""]),
    );
    assert!(
        reads > 1 && writes > 0,
        "randrw: {reads} reads {writes} writes"
    );
    // perf's I/Os, the read past the end, the Flush of namespace 99
    assert_eq!(reads + writes, total.ios + 1, "{text}");
    assert_eq!(other, 1);
    let (rb, wb) = (
        cm("vnvme_controller_bytes_total", &["op=\"read\""]),
        cm("vnvme_controller_bytes_total", &["op=\"write\""]),
    );
    assert_eq!(rb + wb, total.bytes, "failed commands move no bytes");
    assert_eq!(rb, (reads - 1) * 4096);
    assert_eq!(wb, writes * 4096);
    assert_eq!(
        cm("vnvme_controller_latency_seconds_count", &[]),
        reads + writes + other
    );
    assert_eq!(
        cm("vnvme_controller_latency_seconds_bucket", &["le=\"+Inf\""]),
        reads + writes + other
    );
    let lat_sum = scraped
        .iter()
        .find(|(k, _)| k.starts_with("vnvme_controller_latency_seconds_sum{"))
        .map(|(_, &v)| v)
        .unwrap();
    assert!(lat_sum > 0.0 && lat_sum < 60.0, "{lat_sum} s");
    assert_eq!(
        cm(
            "vnvme_controller_errors_total",
            &["status=\"invalid_namespace\""]
        ),
        1
    );
    assert_eq!(
        cm(
            "vnvme_controller_errors_total",
            &["status=\"lba_out_of_range\""]
        ),
        1
    );
    assert_eq!(
        sum(&scraped, "vnvme_controller_errors_total", &ctrl_labels),
        2
    );
    assert_eq!(cm("vnvme_controller_queue_depth", &[]), 0);
    assert!(cm("vnvme_controller_admin_commands_total", &[]) > 4);
    assert!(cm("vnvme_controller_enables_total", &[]) >= 1);
    // namespace 1 saw the same reads and writes, not the Flush of namespace 99
    assert_eq!(
        nm("vnvme_namespace_commands_total", &["op=\"read\""]),
        reads
    );
    assert_eq!(
        nm("vnvme_namespace_commands_total", &["op=\"write\""]),
        writes
    );
    assert_eq!(nm("vnvme_namespace_commands_total", &["op=\"other\""]), 0);
    assert_eq!(nm("vnvme_namespace_bytes_total", &["op=\"read\""]), rb);
    assert_eq!(nm("vnvme_namespace_errors_total", &[]), 1);
    assert_eq!(
        nm("vnvme_namespace_latency_seconds_count", &[]),
        reads + writes
    );

    // vnvme rpc stats: the same numbers, and percentiles
    let out = Command::new(&bin)
        .arg("rpc")
        .arg("-s")
        .arg(&rpc)
        .arg("stats")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let st = &reply[0];
    assert_eq!(st["cntlid"], 1);
    assert_eq!(st["kind"], "ctrl");
    assert_eq!(
        (
            st["reads"].as_u64(),
            st["writes"].as_u64(),
            st["other"].as_u64()
        ),
        (Some(reads), Some(writes), Some(1))
    );
    assert_eq!(
        (st["read_bytes"].as_u64(), st["written_bytes"].as_u64()),
        (Some(rb), Some(wb))
    );
    assert_eq!(st["errors"], 2);
    assert_eq!(st["errors_by_status"]["invalid_namespace"], 1);
    assert_eq!(st["queue_depth"], 0);
    let lat = &st["latency_us"];
    assert_eq!(lat["count"].as_u64(), Some(reads + writes + 1));
    let pct = |q: &str| lat[q].as_f64().unwrap_or_else(|| panic!("{q}: {lat}"));
    assert!(
        0.0 < pct("p50") && pct("p50") <= pct("p99") && pct("p99") <= pct("p99.9"),
        "{lat}"
    );
    assert_eq!(st["namespaces"][0]["nsid"], 1);
    assert_eq!(st["namespaces"][0]["reads"].as_u64(), Some(reads));
    let out = Command::new(&bin)
        .args(["rpc", "-s"])
        .arg(&rpc)
        .args(["stats", "cntlid=9"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "stats of a controller that is not there"
    );

    // garbage: each gets its answer or a close, and the endpoint keeps serving; a host runs
    // verified I/O on the controller meanwhile, untouched by it
    let s2 = sock.clone();
    let neighbour =
        std::thread::spawn(move || verified_randrw(&mut connect(&s2), Duration::from_secs(2)));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Fill: ".to_vec();
    huge.resize(64 << 10, b'a');
    let answer = exchange(addr, &huge);
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "huge head: {answer:.80}"
    );
    let answer = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert!(
        answer.starts_with("HTTP/1.1 405 ") && answer.contains("Allow: GET"),
        "{answer}"
    );
    let answer = exchange(addr, b"GET /admin HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    let answer = exchange(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "TLS hello: {answer:?}");
    drop(TcpStream::connect(addr).unwrap()); // connect and go
    assert!(scrape(addr).contains("vnvme_controller_commands_total"));

    // slowloris: a head trickled a byte every 200 ms is cut off at the 5 s deadline,
    // unanswered; a scrape waiting behind it is served once it is gone
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let t = Instant::now();
    let waiting = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let body = scrape(addr);
        (t.elapsed(), body)
    });
    let mut cut = None;
    let mut unanswered = Vec::new();
    for b in b"GET /metrics HTTP/1.1\r\n"
        .iter()
        .chain(b"X: y\r\n".repeat(20).iter())
    {
        if slow.write_all(&[*b]).is_err() {
            cut = Some(t.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(0) => {
                cut = Some(t.elapsed());
                break;
            }
            Ok(k) => unanswered.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                cut = Some(t.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let cut = cut.expect("the trickling peer is disconnected");
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(9)).contains(&cut),
        "cut off after {cut:?}"
    );
    assert!(
        unanswered.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&unanswered)
    );
    let (waited, body) = waiting.join().unwrap();
    assert!(waited < Duration::from_secs(9), "scrape waited {waited:?}");
    let n = neighbour.join().unwrap();
    assert!(
        n.ios > 100 && n.errors == 0 && n.verify_failures == 0,
        "verified I/O beside the garbage: {n:?}"
    );
    // the neighbour's commands are counted (it ended before the waiting scrape was served),
    // and nothing ran since: the numbers stand
    let after = samples(&body);
    let io = |m: &HashMap<String, f64>| {
        ["op=\"read\"", "op=\"write\""]
            .iter()
            .map(|op| one(m, "vnvme_controller_commands_total", &[ctrl_labels[0], op]))
            .sum::<u64>()
    };
    assert!(
        io(&after) >= reads + writes + n.ios,
        "{} I/O commands counted, {} before + {} by the neighbour",
        io(&after),
        reads + writes,
        n.ios
    );
    assert_eq!(samples(&scrape(addr)), after);
    drop(daemon);
}
