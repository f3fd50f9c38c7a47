//! Helpers for tests that boot a Linux guest under QEMU (see `qemu_harness`).

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use qemu_harness::{Guest, GuestOutput, VmError};

/// Default timeout of test guests; generous because CI runs them under TCG on 2 cores.
pub const GUEST_TIMEOUT: Duration = Duration::from_mins(10);

/// A guest running `script` with the test defaults: console echo when
/// `VNVME_GUEST_ECHO=1`, [`GUEST_TIMEOUT`].
pub fn harness_guest(script: impl Into<String>) -> Guest {
    let echo = std::env::var(qemu_harness::ECHO_ENV).is_ok_and(|v| v == "1");
    Guest::new(script).echo_console(echo).timeout(GUEST_TIMEOUT)
}

/// `guest` with a NIC of its own on restricted user networking (nothing leaves the guest, no
/// host port is taken): `net_up` gives it 10.0.2.15, e.g. for Soft-RoCE (`rdma link add`).
pub fn with_private_nic(guest: Guest) -> Guest {
    guest
        .qemu_arg("-netdev")
        .qemu_arg("user,id=n0,restrict=on")
        .qemu_arg("-device")
        .qemu_arg("virtio-net-pci,netdev=n0,romfile=")
}

/// Runs `guest` and checks the script exited 0, panicking with the console tail if not.
pub fn run_ok(guest: &Guest) -> GuestOutput {
    run_ok_with(guest, String::new)
}

/// [`run_ok`], with `context()` (e.g. the daemon's log) added to the panic message.
pub fn run_ok_with(guest: &Guest, context: impl FnOnce() -> String) -> GuestOutput {
    let failed = match guest.run() {
        Ok(out) => match out.success().err().map(|e| e.to_string()) {
            None => return out,
            Some(e) => e,
        },
        Err(e) => format!("guest run failed: {e}"),
    };
    panic!("{failed}\n{}", context());
}

/// The lines of a supervised daemon's log `log` about upgrades, crashes and restores, and
/// every warning or error (the last 200): what a failed test shows, since its directory goes
/// with it.
pub fn daemon_events(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let keep = [
        "restored", "saved", "drain", "upgrade", "worker", "died", "attached", "WARN", "ERROR",
    ];
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| keep.iter().any(|k| l.contains(k)))
        .collect();
    lines[lines.len().saturating_sub(200)..].join("\n")
}

/// The console text between the script's `<marker>-BEGIN` and `<marker>-END` lines,
/// panicking with the whole console if they are missing.
pub fn section<'a>(out: &'a GuestOutput, marker: &str) -> &'a str {
    out.section(marker).unwrap_or_else(|| {
        panic!(
            "no {marker}-BEGIN/{marker}-END section in the console:\n{}",
            out.console
        )
    })
}

/// The value printed by the script as a line `<key> <value>`, if any (the last one wins).
pub fn value<'a>(out: &'a GuestOutput, key: &str) -> Option<&'a str> {
    out.console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(' '))
        .map(str::trim)
}

/// Whether `text` is one syntactically balanced JSON object or array (strings and escapes
/// are respected; scalars are not validated).
pub fn looks_like_json(text: &str) -> bool {
    let text = text.trim();
    if !(text.starts_with('{') || text.starts_with('[')) {
        return false;
    }
    let mut stack = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => stack.push('}'),
            '[' => stack.push(']'),
            '}' | ']' => {
                if stack.pop() != Some(c) {
                    return false;
                }
                if stack.is_empty() {
                    return i + 1 == text.len();
                }
            }
            _ => {}
        }
    }
    false
}

/// Set to 1 to keep the test directories (daemon logs, images) for a look after a failure.
pub const KEEP_DIRS_ENV: &str = "VNVME_KEEP_TEST_DIRS";

/// A temporary directory for one test, removed on drop (unless [`KEEP_DIRS_ENV`] is 1).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/vnvme-test-<tag>-<pid>` (emptied first if it exists).
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vnvme-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var(KEEP_DIRS_ENV).is_ok_and(|v| v == "1") {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Guest shell that binds QEMU's own `-device nvme` (1b36:0010) to vfio-pci, leaving its
/// PCI address in `$BDF` and its IOMMU group under `/dev/vfio` (needs `Guest::iommu`).
pub const BIND_QEMU_NVME_TO_VFIO: &str = r#"
modprobe vfio_iommu_type1
modprobe vfio_pci
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor) $(cat $d/device)" = "0x1b36 0x0010" ] && BDF=$(basename $d)
done
echo "bdf $BDF"
[ -e /sys/bus/pci/devices/$BDF/driver ] && echo $BDF > /sys/bus/pci/devices/$BDF/driver/unbind
echo "1b36 0010" > /sys/bus/pci/drivers/vfio-pci/new_id
for i in $(seq 50); do ls /dev/vfio/[0-9]* >/dev/null 2>&1 && break; sleep 0.1; done
echo "vfio $(ls /dev/vfio | tr '\n' ' ')"
"#;

/// Build the `vnvme` binary (debug) and return its path (tests that run it as users do).
pub fn vnvme_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "vnvme"])
        .current_dir(&root)
        .status()
        .expect("cargo build -p vnvme");
    assert!(st.success(), "building vnvme failed");
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), PathBuf::from);
    target.join("debug/vnvme")
}

/// Build the `vnvme` binary (debug) and copy it without debug info into `dir`, for a guest
/// to run (`.file(...)` puts it at `/tmp/h/vnvme`; it needs glibc >= the host's, which the
/// Debian trixie guest has).
pub fn vnvme_binary_for_guest(dir: &Path) -> PathBuf {
    let out = dir.join("vnvme");
    let st = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(vnvme_binary())
        .arg(&out)
        .status()
        .expect("objcopy");
    assert!(st.success(), "objcopy --strip-debug failed");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes() {
        assert!(looks_like_json(r#"{"a":[1,{"b":"}"}],"c":"x\"y"}"#));
        assert!(looks_like_json("  [1, 2]\n"));
        assert!(!looks_like_json(r#"{"a":1"#));
        assert!(!looks_like_json(r#"{"a":1}}"#));
        assert!(!looks_like_json("nvme: error"));
    }
}
