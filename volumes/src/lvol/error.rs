//! What can go wrong with a volume store, as one typed error.

/// A volume store's error.
#[derive(Debug, thiserror::Error)]
pub enum LvolError {
    /// A request to the store's base backend failed (raw NVMe status bits).
    #[error("{what}: the base backend answered status {status:#06x}")]
    Io {
        /// What the store was doing.
        what: &'static str,
        /// The status, as CQE bits.
        status: u16,
    },
    /// The backend carries no volume store (no valid superblock copy).
    #[error("no volume store found: {0}")]
    NoStore(String),
    /// Metadata is damaged beyond what the format tolerates (a torn tail is tolerated).
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// The store was written with features this build does not know.
    #[error("the store needs format features {0:#x} this build does not know")]
    Unsupported(u64),
    /// The backend is too small for the store's metadata and one cluster.
    #[error("the backend is too small for a volume store: {0}")]
    TooSmall(String),
    /// No free cluster left.
    #[error("the volume store is full ({0})")]
    NoSpace(String),
    /// The metadata area cannot hold the store's metadata any more.
    #[error("the metadata area is full: {0}")]
    MetadataFull(String),
    /// No volume of that name.
    #[error("no volume named {0}")]
    NotFound(String),
    /// A volume of that name exists.
    #[error("a volume named {0} exists")]
    Exists(String),
    /// A bad argument (name, size, cluster size...).
    #[error("{0}")]
    Invalid(String),
    /// The volume is open by a namespace and the operation needs it closed.
    #[error("volume {0} is in use")]
    InUse(String),
    /// A metadata write failed earlier: the store takes no more changes until reloaded.
    #[error("the store stopped after a failed metadata write: {0}")]
    Failed(String),
}

impl LvolError {
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        LvolError::Corrupt(what.into())
    }
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, LvolError>;
