//! Driver errors.

use nvme_spec::Status;

/// What went wrong talking to a controller.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("transport: {0}")]
    Transport(String),
    #[error("DMA memory: {0}")]
    Dma(String),
    #[error(
        "controller not ready within {0} ms (CAP.TO); an SR-IOV VF that is offline never \
         becomes ready: bring it online from its PF (`vnvme rpc vf_enable nqn=NQN count=N`, \
         NumVFs in the PF's SR-IOV capability, or `nvme virt-mgmt`)"
    )]
    Timeout(u64),
    #[error("controller fatal status (CSTS.CFS)")]
    Fatal,
    #[error("{command}: {status}")]
    Command {
        command: &'static str,
        status: Status,
    },
    #[error("{command}: no completion within {ms} ms")]
    CommandTimeout { command: &'static str, ms: u64 },
    #[error("{0}")]
    Invalid(String),
}
