//! The guest builder: what to attach to a test VM and what to run in it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::console::{TAIL_LINES, tail};
use super::{Accel, VmError};

/// Environment variable that turns on live console echo to stderr by default (`1`).
pub const ECHO_ENV: &str = "VNVME_GUEST_ECHO";

/// A callback receiving each console line as it arrives.
#[derive(Clone)]
pub(super) struct ConsoleSink(pub(super) Arc<dyn Fn(&str) + Send + Sync>);

impl fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConsoleSink(..)")
    }
}

/// A test guest: a Linux VM booted from the harness kernel and initramfs that runs one
/// shell script (`sh -e`) in `/tmp/h` and powers off.
///
/// ```no_run
/// use qemu_harness::Guest;
/// let out = Guest::new("nvme list").qemu_nvme("/tmp/disk.img", "").run()?;
/// out.success()?;
/// # Ok::<(), qemu_harness::VmError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Guest {
    pub(super) script: String,
    pub(super) nvme: Vec<(PathBuf, String)>,
    pub(super) vfio_user: Vec<PathBuf>,
    pub(super) hostfwd: Vec<(u16, u16)>,
    pub(super) reach_host: bool,
    pub(super) iommu: bool,
    pub(super) files: Vec<PathBuf>,
    pub(super) smp: u32,
    pub(super) mem_mib: u32,
    pub(super) timeout: Duration,
    pub(super) append: Vec<String>,
    pub(super) qemu_args: Vec<String>,
    pub(super) echo_console: bool,
    pub(super) accel: Option<Accel>,
    pub(super) console_sink: Option<ConsoleSink>,
}

impl Guest {
    /// A guest that runs `script` (shell text, run with `sh -e` in `/tmp/h`).
    pub fn new(script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            nvme: Vec::new(),
            vfio_user: Vec::new(),
            hostfwd: Vec::new(),
            reach_host: false,
            iommu: false,
            files: Vec::new(),
            smp: 2,
            mem_mib: 1024,
            timeout: Duration::from_mins(10),
            append: Vec::new(),
            qemu_args: Vec::new(),
            echo_console: std::env::var(ECHO_ENV).is_ok_and(|v| v == "1"),
            accel: None,
            console_sink: None,
        }
    }

    /// Attaches QEMU's own NVMe controller backed by the raw `image` (created with 1 GiB if
    /// missing). The n-th one (from 0) has serial `vnvmeq<n>`; `extra_opts` are appended
    /// to its `-device nvme,...` options (e.g. `"max_ioqpairs=4"`).
    #[must_use]
    pub fn qemu_nvme(mut self, image: impl AsRef<Path>, extra_opts: &str) -> Self {
        self.nvme.push((
            image.as_ref().to_owned(),
            extra_opts.trim_start_matches(',').to_owned(),
        ));
        self
    }

    /// Attaches a vfio-user PCI device served on the unix socket `socket`. Repeatable.
    #[must_use]
    pub fn vfio_user(mut self, socket: impl AsRef<Path>) -> Self {
        self.vfio_user.push(socket.as_ref().to_owned());
        self
    }

    /// Forwards `127.0.0.1:host_port` to the guest's `guest_port`. Repeatable; enables a
    /// virtio-net NIC (run `net_up` in the script to configure it).
    #[must_use]
    pub fn hostfwd(mut self, host_port: u16, guest_port: u16) -> Self {
        self.hostfwd.push((host_port, guest_port));
        self
    }

    /// Lets the guest reach servers on the host's loopback as 10.0.2.2 (user networking
    /// without `restrict`); enables the virtio-net NIC (run `net_up` in the script).
    #[must_use]
    pub fn reach_host(mut self) -> Self {
        self.reach_host = true;
        self
    }

    /// Adds an emulated Intel IOMMU (interrupt remapping, caching mode) and enables it in
    /// the guest kernel.
    #[must_use]
    pub fn iommu(mut self) -> Self {
        self.iommu = true;
        self
    }

    /// Copies a host file into the guest as `/tmp/h/<basename>`, keeping its mode bits.
    #[must_use]
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.files.push(path.as_ref().to_owned());
        self
    }

    /// Number of vCPUs (default 2).
    #[must_use]
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n.max(1);
        self
    }

    /// Guest RAM in MiB (default 1024).
    #[must_use]
    pub fn mem_mib(mut self, m: u32) -> Self {
        self.mem_mib = m;
        self
    }

    /// How long the whole run may take before QEMU is killed (default 600 s).
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Appends arguments to the guest kernel command line.
    #[must_use]
    pub fn append(mut self, kernel_args: &str) -> Self {
        self.append.push(kernel_args.to_owned());
        self
    }

    /// Appends one raw argument to the QEMU command line.
    #[must_use]
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// Streams console lines to stderr while the guest runs (default: on if
    /// `VNVME_GUEST_ECHO=1`).
    #[must_use]
    pub fn echo_console(mut self, on: bool) -> Self {
        self.echo_console = on;
        self
    }

    /// Forces an accelerator instead of detecting one (see [`Accel::detect`]).
    #[must_use]
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    /// Calls `sink` with each console line as it arrives (in addition to any echo).
    #[must_use]
    pub fn on_console_line(mut self, sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.console_sink = Some(ConsoleSink(Arc::new(sink)));
        self
    }
}

/// What a finished guest run produced.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// Everything QEMU printed: the serial console and QEMU's own messages.
    pub console: String,
    /// The exit status of the guest script.
    pub status: i32,
    /// Wall time from starting QEMU to its exit.
    pub elapsed: Duration,
    /// The accelerator used.
    pub accel: Accel,
}

impl GuestOutput {
    /// `Ok(self)` if the script exited 0, else [`VmError::ScriptFailed`].
    pub fn success(&self) -> Result<&Self, VmError> {
        if self.status == 0 {
            Ok(self)
        } else {
            Err(VmError::ScriptFailed {
                status: self.status,
                console_tail: tail(&self.console, TAIL_LINES),
            })
        }
    }

    /// The console text between the lines `marker-BEGIN` and `marker-END` that the
    /// script printed (e.g. `echo @@LIST-BEGIN; ...; echo @@LIST-END`), if both are there.
    pub fn section(&self, marker: &str) -> Option<&str> {
        super::console::section(&self.console, marker)
    }
}
