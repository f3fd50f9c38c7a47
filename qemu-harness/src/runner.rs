//! Running a [`Guest`]: prepare the run directory, boot QEMU, follow the console until the
//! exit-status marker, QEMU's exit, a KVM failure or the timeout.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::cache::{Harness, ensure_built};
use super::console::{KVM_ERROR, TAIL_LINES, exit_status, spawn_reader, tail};
use super::initrd::{RunDir, write_initrd};
use super::process::QemuChild;
use super::progress::{passthrough, progress};
use super::{Accel, Guest, GuestOutput, VmError};

/// How long QEMU may take to exit after the guest printed its exit status.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Size of the raw images created for [`Guest::qemu_nvme`] when missing.
const DEFAULT_IMAGE_SIZE: &str = "1G";

impl Guest {
    /// Builds the harness if needed, boots the guest, waits for its script and returns
    /// the console and exit status. QEMU is always gone when this returns.
    pub fn run(&self) -> Result<GuestOutput, VmError> {
        run(self)
    }
}

fn run(guest: &Guest) -> Result<GuestOutput, VmError> {
    let harness = ensure_built()?;
    let accel = match guest.accel {
        Some(accel) => accel,
        None => Accel::detect()?,
    };
    let run_dir = RunDir::create()?;
    let initrd = run_dir.path().join("initrd.cpio");
    write_initrd(&harness.initramfs(), &initrd, &guest.script, &guest.files)?;
    for (image, _) in &guest.nvme {
        create_image_if_missing(&harness, image)?;
    }
    let args = guest.command_line(accel, &harness.kernel(), &initrd);
    log::debug!("{} {}", harness.qemu().display(), args.join(" "));

    progress(format_args!(
        "booting guest ({accel}, {} vCPU, {} MiB) ...",
        guest.smp, guest.mem_mib
    ));
    let start = Instant::now();
    let qemu = harness.qemu();
    let (mut child, output) = QemuChild::spawn(&qemu, &args)
        .map_err(VmError::io(format!("starting {}", qemu.display())))?;
    let lines = spawn_reader(output).map_err(VmError::io("starting the console reader"))?;
    let result = follow(guest, &mut child, &lines, start);
    let elapsed = start.elapsed();
    drop(child); // kills QEMU if `follow` returned early
    match result {
        Ok((console, status)) => {
            progress(format_args!(
                "guest exited status {status} after {:.1} s",
                elapsed.as_secs_f64()
            ));
            Ok(GuestOutput {
                console,
                status,
                elapsed,
                accel,
            })
        }
        Err(e) => {
            let error = e.to_string();
            let first_line = error.lines().next().unwrap_or_default();
            progress(format_args!(
                "guest failed after {:.1} s: {first_line}",
                elapsed.as_secs_f64()
            ));
            Err(e)
        }
    }
}

/// Collects the console until QEMU exits; returns it with the script's exit status.
fn follow(
    guest: &Guest,
    child: &mut QemuChild,
    lines: &Receiver<String>,
    start: Instant,
) -> Result<(String, i32), VmError> {
    let timeout_at = start + guest.timeout;
    let mut deadline = timeout_at;
    let mut console = String::new();
    let mut status = None;
    let mut eof = false;
    let qemu_status: ExitStatus = loop {
        let now = Instant::now();
        if now >= deadline {
            let pid = child.pid();
            child
                .kill()
                .map_err(VmError::io(format!("killing QEMU pid {pid}")))?;
            if let Some(status) = status {
                log::warn!("QEMU did not exit {EXIT_GRACE:?} after the guest finished; killed it");
                return Ok((console, status));
            }
            return Err(VmError::Timeout {
                secs: guest.timeout.as_secs(),
                qemu_pid: pid,
                console_tail: tail(&console, TAIL_LINES),
            });
        }
        if eof {
            // The console is closed; wait for QEMU itself to go.
            if let Some(s) = child.try_wait().map_err(VmError::io("waiting for QEMU"))? {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20).min(deadline - now));
            continue;
        }
        match lines.recv_timeout(deadline - now) {
            Ok(line) => {
                if guest.echo_console {
                    passthrough(&line);
                }
                if let Some(sink) = &guest.console_sink {
                    (sink.0)(&line);
                }
                console.push_str(&line);
                console.push('\n');
                if line.contains(KVM_ERROR) {
                    child.kill().map_err(VmError::io("killing QEMU"))?;
                    return Err(VmError::KvmUnusable {
                        console_tail: tail(&console, TAIL_LINES),
                    });
                }
                if let Some(s) = exit_status(&line) {
                    status = Some(s);
                    deadline = deadline.min(Instant::now() + EXIT_GRACE);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => eof = true,
        }
    };
    match status {
        Some(status) => Ok((console, status)),
        None => Err(VmError::NoExitStatus {
            qemu_status,
            console_tail: tail(&console, TAIL_LINES),
        }),
    }
}

/// Creates a raw image of [`DEFAULT_IMAGE_SIZE`] at `image` unless it exists.
fn create_image_if_missing(harness: &Harness, image: &Path) -> Result<(), VmError> {
    if image.exists() {
        return Ok(());
    }
    let qemu_img = harness.qemu_img();
    let output = Command::new(&qemu_img)
        .args(["create", "-f", "raw"])
        .arg(image)
        .arg(DEFAULT_IMAGE_SIZE)
        .output()
        .map_err(VmError::io(format!("running {}", qemu_img.display())))?;
    if output.status.success() {
        return Ok(());
    }
    Err(VmError::Command {
        command: format!(
            "qemu-img create -f raw {} {DEFAULT_IMAGE_SIZE}",
            image.display()
        ),
        status: output.status,
        output: String::from_utf8_lossy(&[output.stdout, output.stderr].concat()).into_owned(),
    })
}
