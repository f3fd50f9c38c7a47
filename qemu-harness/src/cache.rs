//! The harness cache: where it lives, whether it is current, and (re)building it.
//!
//! The cache (`$VNVME_CACHE/harness`, default `~/.cache/vnvme/harness`) is built by
//! `scripts/build-harness.sh`. The scripts are embedded in this crate and written to
//! `<cache>/harness/scripts/`; the build runs from there whenever a stage stamp is missing,
//! an output file is missing, or the embedded scripts differ from the written ones.
//!
//! A lock file serialises builds across threads and processes: [`ensure_built`] returns a
//! [`Harness`] holding a shared lock, so no build replaces files while a guest uses them.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use super::VmError;
use super::progress::{passthrough, progress};

/// Environment variable naming the cache directory (default `~/.cache/vnvme`).
pub const CACHE_ENV: &str = "VNVME_CACHE";

/// The harness scripts, embedded at compile time: (file name, contents).
const SCRIPTS: [(&str, &str); 3] = [
    (
        "build-harness.sh",
        include_str!("../scripts/build-harness.sh"),
    ),
    ("init.sh", include_str!("../scripts/init.sh")),
    ("net_up.sh", include_str!("../scripts/net_up.sh")),
];
/// The stamps `build-harness.sh` writes when a stage is done.
const STAMPS: [&str; 5] = [
    "debootstrap",
    "packages",
    "rdma-packages",
    "kernel",
    "initramfs",
];
/// The outputs a guest run needs, relative to the harness directory.
const OUTPUTS: [&str; 4] = [
    "guest/qemu",
    "guest/qemu-img",
    "guest/vmlinuz",
    "guest/initramfs.cpio",
];

/// The cache directory: `$VNVME_CACHE`, else `$HOME/.cache/vnvme`.
pub fn cache_dir() -> Result<PathBuf, VmError> {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| VmError::Config(format!("neither {CACHE_ENV} nor HOME is set")))?;
    Ok(Path::new(&home).join(".cache/vnvme"))
}

/// A built harness. Holds a shared lock on the cache until dropped.
#[derive(Debug)]
pub struct Harness {
    dir: PathBuf,
    _lock: File,
}

impl Harness {
    /// The harness directory (`<cache>/harness`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The QEMU wrapper script.
    pub fn qemu(&self) -> PathBuf {
        self.dir.join("guest/qemu")
    }

    /// The `qemu-img` wrapper script.
    pub fn qemu_img(&self) -> PathBuf {
        self.dir.join("guest/qemu-img")
    }

    /// The guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("guest/vmlinuz")
    }

    /// The guest initramfs (uncompressed newc cpio).
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("guest/initramfs.cpio")
    }
}

/// Makes sure the harness cache is built and current, building it if not (minutes on a
/// first run; progress goes to stderr).
pub fn ensure_built() -> Result<Harness, VmError> {
    let dir = cache_dir()?.join("harness");
    fs::create_dir_all(&dir).map_err(VmError::io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(VmError::io(format!("opening {}", lock_path.display())))?;
    let lock_err = || VmError::io(format!("locking {}", lock_path.display()));
    lock.lock_shared().map_err(lock_err())?;
    if !is_current(&dir) {
        // flock(2) converts the lock in place; recheck: another builder may have finished.
        lock.lock().map_err(lock_err())?;
        if !is_current(&dir) {
            build(&dir)?;
        }
        lock.lock_shared().map_err(lock_err())?;
    }
    Ok(Harness { dir, _lock: lock })
}

/// Whether every stamp and output exists, the written scripts equal the embedded ones, and
/// no script is newer than the initramfs stamp (as `build-harness.sh` itself checks).
fn is_current(dir: &Path) -> bool {
    let stamps = STAMPS.iter().all(|s| dir.join("stamps").join(s).exists());
    let outputs = OUTPUTS.iter().all(|o| dir.join(o).exists());
    let scripts = SCRIPTS.iter().all(|(name, text)| {
        fs::read(dir.join("scripts").join(name)).is_ok_and(|t| t == text.as_bytes())
    });
    let initramfs_stamp = mtime(&dir.join("stamps/initramfs"));
    let fresh = SCRIPTS
        .iter()
        .all(|(name, _)| mtime(&dir.join("scripts").join(name)) <= initramfs_stamp);
    log::debug!(
        "harness {}: stamps {stamps} outputs {outputs} scripts {scripts} fresh {fresh}",
        dir.display()
    );
    stamps && outputs && scripts && fresh
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Writes the embedded scripts (those that differ) and runs `build-harness.sh`, passing its
/// stderr progress through and keeping its whole output in `logs/build-harness.log`.
fn build(dir: &Path) -> Result<(), VmError> {
    let scripts = dir.join("scripts");
    let logs = dir.join("logs");
    for d in [&scripts, &logs] {
        fs::create_dir_all(d).map_err(VmError::io(format!("creating {}", d.display())))?;
    }
    for (name, text) in SCRIPTS {
        let path = scripts.join(name);
        if fs::read(&path).is_ok_and(|t| t == text.as_bytes()) {
            continue;
        }
        fs::write(&path, text)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)))
            .map_err(VmError::io(format!("writing {}", path.display())))?;
    }
    let log_path = logs.join("build-harness.log");
    let mut log_file =
        File::create(&log_path).map_err(VmError::io(format!("creating {}", log_path.display())))?;
    let log_out = log_file
        .try_clone()
        .map_err(VmError::io(format!("opening {}", log_path.display())))?;
    progress(format_args!(
        "building the VM harness in {} (a few minutes the first time; log: {})",
        dir.display(),
        log_path.display()
    ));
    let script = scripts.join("build-harness.sh");
    let cache = dir.parent().unwrap_or(dir);
    let mut child = Command::new("bash")
        .arg(&script)
        .env(CACHE_ENV, cache)
        .stdin(Stdio::null())
        .stdout(log_out)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VmError::io(format!("running {}", script.display())))?;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            passthrough(&line);
            let _ = writeln!(log_file, "{line}");
        }
    }
    let status = child
        .wait()
        .map_err(VmError::io(format!("waiting for {}", script.display())))?;
    if !status.success() {
        return Err(VmError::Build {
            reason: format!("{} exited with {status}", script.display()),
            log: log_path,
        });
    }
    if !is_current(dir) {
        return Err(VmError::Build {
            reason: "the build finished but stamps or outputs are still missing".into(),
            log: log_path,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_embedded() {
        for (name, text) in SCRIPTS {
            assert!(text.starts_with("#!/bin/"), "{name} has no shebang");
        }
    }

    #[test]
    fn empty_dir_is_not_current() {
        let dir = std::env::temp_dir().join(format!("vnvme-cache-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(!is_current(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }
}
