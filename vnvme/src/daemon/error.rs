//! What can go wrong starting the daemon, and why a management request is refused.

use nvmeof::export::ExportError;
use qemu_vfio_user::server::ServerError;

use crate::backend_spec::OpenError;

/// Errors starting or stopping the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("controller[{index}].namespace[{ns}]: {source}")]
    Backend {
        index: usize,
        ns: usize,
        source: OpenError,
    },
    #[error("controller[{index}]: {source}")]
    Io {
        index: usize,
        source: std::io::Error,
    },
    #[error("controller[{index}]: {source}")]
    Server { index: usize, source: ServerError },
    #[error("controller[{index}]: server thread panicked")]
    Panicked { index: usize },
    #[error("array[{index}]: {why}")]
    Array { index: usize, why: String },
    #[error("lvstore[{index}]: {why}")]
    Lvstore { index: usize, why: String },
    #[error("{0:?} is not an IP:PORT address")]
    Address(String),
    #[error("NVMe-oF target on {addr}: {source}")]
    Tcp { addr: String, source: ExportError },
}

/// Why a management request was refused.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error("no subsystem {0}")]
    NoSubsystem(String),
    #[error("no controller with CNTLID {0} ({0:#x})")]
    NoController(u16),
    #[error("{0}")]
    Namespace(#[from] device_model::NsError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Daemon(DaemonError),
}
