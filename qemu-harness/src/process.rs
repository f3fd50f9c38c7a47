//! The QEMU child process: spawning it with its output on one pipe, and making sure it
//! never outlives its run.

use std::io::PipeReader;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running QEMU. Dropping it kills (SIGKILL) and reaps the process if it still runs.
#[derive(Debug)]
pub(super) struct QemuChild(Child);

impl QemuChild {
    /// Starts `program args...` with stdin from /dev/null and stdout + stderr on one pipe,
    /// whose read end is returned. The child is killed if this thread dies first.
    pub(super) fn spawn(program: &Path, args: &[String]) -> std::io::Result<(Self, PipeReader)> {
        let (reader, writer) = std::io::pipe()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        let parent = std::process::id();
        let hook = move || {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and touches no memory.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: getppid(2) cannot fail and touches no memory.
            if unsafe { libc::getppid() } as u32 != parent {
                return Err(std::io::Error::other("parent exited before QEMU started"));
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec; it only makes the
        // async-signal-safe calls prctl(2) and getppid(2) and allocates nothing on success.
        unsafe { command.pre_exec(hook) };
        let child = command.spawn()?;
        // `command` (holding the pipe's write ends) drops here, so the reader sees end of
        // file once QEMU exits.
        Ok((Self(child), reader))
    }

    /// The process id.
    pub(super) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub(super) fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.0.try_wait()
    }

    /// Kills the process (if it still runs) and reaps it.
    pub(super) fn kill(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.0.try_wait()? {
            return Ok(status);
        }
        // Only this child's pid is signalled; an ESRCH race is harmless.
        let _ = self.0.kill();
        self.0.wait()
    }
}

impl Drop for QemuChild {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            log::warn!("killing QEMU pid {}: {e}", self.pid());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn merges_output_and_reaps() {
        let args = ["-c".to_owned(), "echo out; echo err >&2".to_owned()];
        let (mut child, mut reader) = QemuChild::spawn(Path::new("/bin/sh"), &args).unwrap();
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "out\nerr\n");
        assert!(child.kill().unwrap().success());
    }

    #[test]
    fn drop_kills() {
        let args = ["-c".to_owned(), "exec sleep 600".to_owned()];
        let (child, _reader) = QemuChild::spawn(Path::new("/bin/sh"), &args).unwrap();
        let pid = child.pid();
        drop(child);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} still exists"
        );
    }
}
