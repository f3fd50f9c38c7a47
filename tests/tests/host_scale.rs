//! 128 controllers in one process (issue 6's scale goal), run by two shared reactor
//! threads: every socket serves a client that brings its controller up and identifies it,
//! a sample runs I/O, and the figures (bring-up time, resident memory per idle controller)
//! are printed for BENCHMARKS.md.

use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;
use host_driver::transport::vfio_user::VfioUserTransport;
use vnvme::config::Config;
use vnvme::daemon::Daemon;
use vnvme::perf::{Pattern, PerfOptions};
use vnvme_tests::guest::TempDir;

const CONTROLLERS: usize = 128;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_process_serves_128_controllers_on_two_reactors() {
    let tmp = TempDir::new("scale");
    let d = tmp.path();
    let mut text = String::from("reactors = 2\n");
    for i in 0..CONTROLLERS {
        let _ = write!(
            text,
            "[[controller]]\nsocket = \"{d}/c{i}.sock\"\nserial = \"SCALE{i:03}\"\n\
             [[controller.namespace]]\nbackend = \"null:64M\"\n",
            d = d.display()
        );
    }
    let cfg = Config::parse(&text, Path::new("scale.toml")).unwrap();
    let before = rss_kib();
    let t = Instant::now();
    let daemon = Daemon::start(&cfg).expect("128 controllers start");
    let bring_up = t.elapsed();
    let per_ctrl = (rss_kib().saturating_sub(before)) / CONTROLLERS as u64;
    assert_eq!(daemon.sockets().len(), CONTROLLERS);
    // reactor threads: two, not 128
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("reactor"))
        })
        .count();
    assert_eq!(threads, 2, "reactor threads");

    // every controller answers: bring-up and Identify through its own socket
    let t = Instant::now();
    for i in 0..CONTROLLERS {
        let tr = VfioUserTransport::connect(&d.join(format!("c{i}.sock"))).expect("connect");
        let c = NvmeDriver::new(Box::new(tr), 4 << 20, 1).expect("bring-up");
        let (_, serial, _) = c.names();
        assert_eq!(serial, format!("SCALE{i:03}"));
        assert_eq!(c.namespaces().len(), 1);
    }
    let identify_all = t.elapsed();

    // I/O on a sample, one after another
    for i in [0, 1, 63, 127] {
        let tr = VfioUserTransport::connect(&d.join(format!("c{i}.sock"))).unwrap();
        let mut c = NvmeDriver::new(Box::new(tr), 8 << 20, 1).unwrap();
        let opts = PerfOptions {
            queue_depth: 16,
            io_size: 4096,
            pattern: Pattern::Randread,
            read_percent: 100,
            duration: Duration::from_millis(300),
            workers: 1,
            verify: false,
            shadow_doorbells: false,
        };
        let r = vnvme::perf::run(&mut c, &opts, |_, _| {}).unwrap().total();
        assert!(r.ios > 100 && r.errors == 0, "controller {i}: {r:?}");
    }
    println!(
        "scale: {CONTROLLERS} controllers up in {bring_up:?}, {per_ctrl} KiB resident each when idle, \
         all brought up and identified by a client in {identify_all:?}"
    );
    daemon.stop().unwrap();
}
