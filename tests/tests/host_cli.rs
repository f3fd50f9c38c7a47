//! What a user of the `vnvme` command line sees when something is wrong (issue 16): one
//! line per error with its cause once and the hint that matters, no panic on a closed pipe,
//! refusals of combinations that would do nothing, and `perf --verify` output that stays
//! readable on a namespace that loses data.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vnvme_tests::guest::{TempDir, vnvme_binary};

/// A `vnvme serve` child, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], wait: &Path) -> Served {
    let child = Command::new(vnvme_binary())
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vnvme serve");
    let t = Instant::now();
    while !wait.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            wait.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Served(child)
}

fn vnvme(args: &[&str]) -> Output {
    Command::new(vnvme_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run vnvme")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with one error line that contains every piece of `want` and names the
/// OS error at most once.
fn assert_one_clear_error(o: &Output, want: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    for w in want {
        assert!(lines[0].contains(w), "{w:?} missing from: {err}");
    }
    assert!(
        lines[0].matches("os error").count() <= 1,
        "cause repeated: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn errors_say_their_cause_once_with_the_hint_that_matters() {
    let tmp = TempDir::new("cli-errors");
    let missing = tmp.path().join("missing.img");
    let sock = tmp.path().join("a.sock");
    let o = vnvme(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--ns",
        &format!("file:{}", missing.display()),
    ]);
    assert_one_clear_error(&o, &["does not exist", "file:PATH:SIZE creates it"]);
    let o = vnvme(&["serve", "--config", missing.to_str().unwrap()]);
    assert_one_clear_error(&o, &["cannot read", "No such file or directory"]);
    let rpc = tmp.path().join("none.rpc");
    let o = vnvme(&["rpc", "-s", rpc.to_str().unwrap(), "controller_list"]);
    assert_one_clear_error(&o, &["cannot reach the daemon", "is it running?", "--rpc"]);
    let o = vnvme(&["serve", "--socket", sock.to_str().unwrap()]);
    assert_one_clear_error(&o, &["give at least one --ns"]);
    // an export over NVMe/RDMA alone is a configuration of its own (no --tcp-listen
    // needed); this machine has no RDMA device (or not even rdma-core), which is what the
    // error says, with what to do
    let o = vnvme(&[
        "serve",
        "--rdma-listen",
        "127.0.0.1:4420",
        "--ns",
        "malloc:1M",
    ]);
    assert_one_clear_error(&o, &["RDMA listen on [127.0.0.1:4420]"]);
    let err = stderr(&o);
    assert!(
        err.contains("no RDMA device; load rdma_rxe") || err.contains("install libibverbs1"),
        "{err}"
    );
    assert!(!sock.exists(), "nothing was served");
    let help = String::from_utf8_lossy(&vnvme(&["serve", "--help"]).stdout).into_owned();
    for form in [
        "null:",
        "malloc:",
        "file:PATH",
        "nvme:vfio-user:",
        "nvme:pci:",
        "nvme-tcp://",
    ] {
        assert!(help.contains(form), "serve --help lacks {form}: {help}");
    }
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let tmp = TempDir::new("cli-epipe");
    let sock = tmp.path().join("a.sock");
    let _d = serve(
        &["--socket", sock.to_str().unwrap(), "--ns", "null:1G"],
        &sock,
    );
    let mut child = Command::new(vnvme_binary())
        .args([
            "identify",
            "--json",
            &format!("vfio-user:{}", sock.display()),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // like `| head` that has gone: the reader closes before the controller (tens of ms
    // away: connect, enable, identify) is described
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn perf_verify_checks_something_and_summarizes_mismatches() {
    let tmp = TempDir::new("cli-verify");
    let good = tmp.path().join("good.sock");
    let lossy = tmp.path().join("lossy.sock");
    let _g = serve(
        &["--socket", good.to_str().unwrap(), "--ns", "malloc:64M"],
        &good,
    );
    let _l = serve(
        &["--socket", lossy.to_str().unwrap(), "--ns", "null:64M"],
        &lossy,
    );
    let target = |s: &Path| format!("vfio-user:{}", s.display());

    // reads alone check nothing: refused
    let o = vnvme(&[
        "perf",
        &target(&good),
        "-w",
        "randread",
        "-t",
        "1",
        "--verify",
    ]);
    assert_one_clear_error(&o, &["--verify", "randread writes nothing"]);

    // writes alone are read back after the run, as fio does
    let o = vnvme(&[
        "perf",
        &target(&good),
        "-q",
        "8",
        "-w",
        "randwrite",
        "-t",
        "1",
        "--verify",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let verified = out
        .lines()
        .find_map(|l| l.strip_prefix("verified "))
        .unwrap_or_else(|| panic!("no verify summary: {out}"));
    let n: u64 = verified.split(' ').next().unwrap().parse().unwrap();
    assert!(n > 0 && verified.ends_with(" 0 mismatches"), "{verified}");
    // stderr is not a terminal here: progress comes as lines, never carriage returns
    assert!(!stderr(&o).contains('\r'), "{:?}", stderr(&o));

    // a namespace that loses data: a handful of lines and a summary, not one per block
    let o = vnvme(&[
        "perf",
        &target(&lossy),
        "-q",
        "8",
        "-w",
        "randrw",
        "-t",
        "2",
        "--verify",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let shown = err
        .lines()
        .filter(|l| l.contains("differ from what was written"))
        .count();
    assert!((1..=5).contains(&shown), "{shown} mismatch lines:\n{err}");
    assert!(
        err.contains("further mismatches are counted, not shown"),
        "{err}"
    );
    let summary = out
        .lines()
        .find(|l| l.starts_with("verified "))
        .unwrap_or_else(|| panic!("no verify summary: {out}"));
    let bad: u64 = summary
        .rsplit(' ')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    // counted beyond the (at most 5) shown; how many more depends on the machine's load
    assert!(bad > 5, "{summary}");
}

#[test]
fn management_and_offline_vf_messages_speak_the_users_terms() {
    let tmp = TempDir::new("cli-mgmt");
    let pf = tmp.path().join("pf.sock");
    let rpc = tmp.path().join("v.rpc");
    let cfg = tmp.path().join("v.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[controller]]\nsocket = \"{}\"\nvfs = 1\n[[controller.namespace]]\n\
             backend = \"malloc:16M\"\n",
            pf.display()
        ),
    )
    .unwrap();
    let _d = serve(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--rpc",
            rpc.to_str().unwrap(),
        ],
        &rpc,
    );
    let o = vnvme(&[
        "rpc",
        "-s",
        rpc.to_str().unwrap(),
        "qos_set",
        "cntlid=99",
        "iops=5",
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("CNTLID 99 (0x63)"),
        "{err}"
    );
    // VF 1 is offline until enabled: identify says so and how to bring it online
    let vf = vnvme::daemon::vf_socket(&pf, 1);
    let o = vnvme(&["identify", &format!("vfio-user:{}", vf.display())]);
    assert_one_clear_error(&o, &["VF that is offline", "vf_enable"]);
}
