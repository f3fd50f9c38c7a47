//! Unix socket paths a daemon listens on: never taken from a live server, and removed only
//! while they are still this daemon's own.
//!
//! A second daemon started on a path another one serves must not take it over (clients would
//! silently reach the new one, and its shutdown would delete the first one's socket): a path
//! that answers a connect is refused, naming the process behind it (SO_PEERCRED); a stale
//! file (nobody listening) is replaced. At shutdown the path is removed only if it is still
//! the socket this daemon bound (same device, inode and change time).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why a socket path could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{path} is already served by {who}; stop it first or choose another path")]
    InUse { path: PathBuf, who: String },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// A listening socket bound at a path, remembering which file it created there.
#[derive(Debug)]
pub struct OwnedSocketPath {
    path: PathBuf,
    /// Device, inode and change time of the socket file we made (inodes are reused).
    id: (u64, u64, i64, i64),
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl OwnedSocketPath {
    /// Bind `path`: refused if a live server answers there, a stale socket is replaced.
    pub fn bind(path: &Path) -> Result<(UnixListener, Self), ClaimError> {
        if let Ok(peer) = UnixStream::connect(path) {
            return Err(ClaimError::InUse {
                path: path.to_owned(),
                who: describe_peer(&peer),
            });
        }
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket_like()) {
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ClaimError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok((
            listener,
            Self {
                path: path.to_owned(),
                id: file_id(&meta),
            },
        ))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the path if it is still the socket we bound (not a successor's).
    pub fn remove(&self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

trait SocketLike {
    fn is_socket_like(&self) -> bool;
}

impl SocketLike for std::fs::FileType {
    fn is_socket_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_socket(self)
    }
}

/// "process PID (NAME)" for the server at the other end of `s`.
fn describe_peer(s: &UnixStream) -> String {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into our local ucred.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if r != 0 || cred.pid <= 0 {
        return "another process".into();
    }
    let name = std::fs::read_to_string(format!("/proc/{}/comm", cred.pid))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default();
    format!("process {} ({name})", cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_path_is_refused_a_stale_one_replaced_and_only_ours_removed() {
        let dir = std::env::temp_dir().join(format!("vnvme-sockpath-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        let (l1, own1) = OwnedSocketPath::bind(&p).unwrap();
        let e = OwnedSocketPath::bind(&p).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        drop(l1); // the file stays, nobody listens: stale
        let (_l2, own2) = OwnedSocketPath::bind(&p).unwrap();
        own1.remove(); // not ours any more: kept
        assert!(p.exists());
        own2.remove();
        assert!(!p.exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
