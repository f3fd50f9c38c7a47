//! The per-run directory and the per-run initrd: the harness initramfs with a second cpio
//! archive appended that holds `h/script` and the guest's files (`/init` copies `/h/*` to
//! `/tmp/h/`).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::VmError;
use super::cpio::NewcWriter;

/// Name prefix of run directories: `vnvme-guest-<pid>-<n>`.
const PREFIX: &str = "vnvme-guest-";

/// A temporary directory for one guest run, removed on drop.
#[derive(Debug)]
pub(super) struct RunDir(PathBuf);

impl RunDir {
    /// Creates `$TMPDIR/vnvme-guest-<pid>-<n>`, unique per process and run, after removing
    /// the run directories of processes that no longer exist (killed before cleaning up).
    pub(super) fn create() -> Result<Self, VmError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale(&std::env::temp_dir());
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("{PREFIX}{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(VmError::io(format!("creating {}", dir.display()))(e)),
            }
        }
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

/// Removes `<tmp>/vnvme-guest-<pid>-<n>` directories whose process is gone.
fn remove_stale(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            log::debug!("removing stale {}", entry.path().display());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            log::warn!("removing {}: {e}", self.0.display());
        }
    }
}

/// Writes `dest`: a copy of `initramfs`, zero-padded to 4 bytes, followed by an archive
/// with `h/script` (the script text) and `h/<basename>` for each of `files`.
pub(super) fn write_initrd(
    initramfs: &Path,
    dest: &Path,
    script: &str,
    files: &[PathBuf],
) -> Result<(), VmError> {
    let mut entries = Vec::with_capacity(files.len());
    let mut names = HashSet::from(["script".to_owned()]);
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| VmError::Config(format!("{}: no usable file name", path.display())))?
            .to_owned();
        if !names.insert(name.clone()) {
            return Err(VmError::Config(format!(
                "two guest files named {name:?} (\"script\" is reserved)"
            )));
        }
        let data = fs::read(path).map_err(VmError::io(format!("reading {}", path.display())))?;
        let mode = fs::metadata(path)
            .map_err(VmError::io(format!("reading {}", path.display())))?
            .permissions()
            .mode();
        entries.push((name, mode & 0o7777, data));
    }

    let context = format!("writing {}", dest.display());
    fs::copy(initramfs, dest).map_err(VmError::io(format!(
        "copying {} to {}",
        initramfs.display(),
        dest.display()
    )))?;
    let mut out = OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(VmError::io(&context))?;
    let len = out.seek(SeekFrom::End(0)).map_err(VmError::io(&context))?;
    let mut out = BufWriter::new(out);
    // The kernel expects each archive header at a 4-byte aligned offset.
    let pad = (len.next_multiple_of(4) - len) as usize;
    out.write_all(&[0; 3][..pad])
        .map_err(VmError::io(&context))?;
    let mut cpio = NewcWriter::new(out);
    let result = (|| {
        cpio.add_dir("h", 0o755)?;
        cpio.add_file("h/script", 0o755, script.as_bytes())?;
        for (name, mode, data) in &entries {
            cpio.add_file(&format!("h/{name}"), *mode, data)?;
        }
        cpio.finish()?.flush()
    })();
    result.map_err(VmError::io(context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_archive_after_padding() {
        let run = RunDir::create().unwrap();
        let base = run.path().join("base.cpio");
        fs::write(&base, b"12345").unwrap();
        let tool = run.path().join("tool.sh");
        fs::write(&tool, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o750)).unwrap();
        let dest = run.path().join("initrd");
        write_initrd(&base, &dest, "echo hi\n", std::slice::from_ref(&tool)).unwrap();

        let bytes = fs::read(&dest).unwrap();
        assert_eq!(&bytes[..8], b"12345\0\0\0");
        assert_eq!(&bytes[8..14], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("h/script\0"));
        assert!(text.contains("echo hi\n"));
        assert!(text.contains("h/tool.sh\0"));
        assert!(text.contains("000081e8"), "mode 0o100750 kept");
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn rejects_clashing_names() {
        let run = RunDir::create().unwrap();
        let base = run.path().join("base.cpio");
        fs::write(&base, b"").unwrap();
        let script = run.path().join("script");
        fs::write(&script, b"").unwrap();
        let err = write_initrd(&base, &run.path().join("i"), "", &[script]).unwrap_err();
        assert!(matches!(err, VmError::Config(_)), "{err}");
    }

    #[test]
    fn stale_run_dirs_are_removed() {
        let run = RunDir::create().unwrap();
        // pid 0 never names a live process in /proc
        let stale = run.path().join(format!("{PREFIX}0-7"));
        let live = run.path().join(format!("{PREFIX}{}-7", std::process::id()));
        let other = run.path().join("unrelated-0-7");
        for d in [&stale, &live, &other] {
            fs::create_dir(d).unwrap();
        }
        remove_stale(run.path());
        assert!(!stale.exists() && live.exists() && other.exists());
    }

    #[test]
    fn run_dir_is_removed() {
        let run = RunDir::create().unwrap();
        let path = run.path().to_owned();
        fs::write(path.join("x"), b"x").unwrap();
        drop(run);
        assert!(!path.exists());
    }
}
