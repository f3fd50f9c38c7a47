//! The harness itself: a failing script's status reaches the host, a hung guest is killed
//! at its timeout, a guest that dies without reporting is an error.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vnvme_tests::guest::{TempDir, VmError, harness_guest};

#[test]
fn script_status_and_files_reach_the_host() {
    let tmp = TempDir::new("harness-status");
    let helper = tmp.path().join("hello.sh");
    fs::write(&helper, "#!/bin/sh\necho \"helper says $1\"\n").unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();

    let out = harness_guest("./hello.sh world\necho hi\nexit 3\n")
        .file(&helper)
        .smp(1)
        .run()
        .unwrap_or_else(|e| panic!("run failed: {e}"));
    assert_eq!(out.status, 3, "console:\n{}", out.console);
    assert!(
        out.console.contains("helper says world"),
        "console:\n{}",
        out.console
    );
    assert!(
        out.console.lines().any(|l| l.trim() == "hi"),
        "console:\n{}",
        out.console
    );

    let err = out.success().expect_err("status 3 must fail success()");
    assert!(
        matches!(err, VmError::ScriptFailed { status: 3, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("exit status 3"), "{message}");
    assert!(
        message.contains("helper says world"),
        "no console tail in: {message}"
    );
}

#[test]
fn hung_guest_is_killed_at_timeout() {
    let timeout = Duration::from_secs(40);
    let start = Instant::now();
    let result = harness_guest("echo sleeping\nsleep 600\n")
        .smp(1)
        .timeout(timeout)
        .run();
    let elapsed = start.elapsed();
    let Err(VmError::Timeout {
        secs,
        qemu_pid,
        console_tail,
    }) = result
    else {
        panic!("expected a timeout, got {result:?}");
    };
    assert_eq!(secs, 40);
    assert!(
        elapsed >= timeout,
        "returned after {elapsed:?}, before the timeout"
    );
    assert!(
        elapsed < Duration::from_secs(50),
        "returned only after {elapsed:?}"
    );
    assert!(
        console_tail.contains("sleeping"),
        "script never ran:\n{console_tail}"
    );
    // The pid is gone (or, in the unlikely case it was reused, is not a QEMU).
    let proc = format!("/proc/{qemu_pid}");
    let cmdline = fs::read(format!("{proc}/cmdline")).unwrap_or_default();
    assert!(
        !Path::new(&proc).exists() || !String::from_utf8_lossy(&cmdline).contains("qemu"),
        "QEMU pid {qemu_pid} still exists after the timeout"
    );
}

#[test]
fn guest_dying_without_status_is_an_error() {
    let result = harness_guest("echo going down\npoweroff -f\n").smp(1).run();
    let Err(VmError::NoExitStatus { console_tail, .. }) = result else {
        panic!("expected NoExitStatus, got {result:?}");
    };
    assert!(console_tail.contains("going down"), "{console_tail}");
}
