//! Feature values (NVMe base 2.0 §5.27) as Set Features leaves them; Get / Set Features
//! are in `admin/features.rs`.

/// Current feature values; reset to defaults on controller reset.
#[derive(Clone, Debug)]
pub(crate) struct Features {
    pub arbitration: u32,
    pub power_state: u32,
    pub temp_over: u16,
    pub temp_under: u16,
    pub error_recovery: u32,
    pub write_cache: bool,
    /// Allocated queues (0's based) once Set Features Number of Queues succeeded.
    pub queues: Option<(u16, u16)>,
    pub max_queues: u16,
    pub coalescing: u32,
    /// Interrupt Coalescing still has its power-on value (the daemon's, applied adaptively:
    /// see [`crate::irq_coalescing`]); false once the host sets feature 08h.
    pub coalescing_adaptive: bool,
    /// Interrupt Vector Configuration: coalescing disable per vector.
    pub vector_cd: Vec<bool>,
    pub write_atomicity: u32,
    pub async_event_config: u32,
    pub keep_alive_ms: u32,
    /// LBA Status Information Report Interval (feature 15h dword 11: LSIRI, LSIPI).
    pub lba_status_interval: u32,
    pub host_behavior: [u8; 512],
}

/// Composite temperature reported in SMART and the default over-temperature threshold (K).
pub(crate) const TEMPERATURE_K: u16 = 308;
pub(crate) const DEFAULT_TEMP_OVER: u16 = 343;

impl Features {
    /// The power-on values: `max_queues` I/O queue pairs, Interrupt Coalescing `coalescing`
    /// (feature 08h dword 11).
    pub(crate) fn new(max_queues: u16, coalescing: u32) -> Self {
        Self {
            arbitration: 0,
            power_state: 0,
            temp_over: DEFAULT_TEMP_OVER,
            temp_under: 0,
            error_recovery: 0,
            write_cache: true,
            queues: None,
            max_queues,
            coalescing,
            coalescing_adaptive: true,
            vector_cd: vec![false; crate::pci::MSIX_VECTORS as usize],
            write_atomicity: 0,
            async_event_config: 0,
            keep_alive_ms: 0,
            lba_status_interval: 0,
            host_behavior: [0; 512],
        }
    }

    /// SMART critical warning bit 1 (§5.16.1.3): the composite temperature is above the
    /// over-temperature or below the under-temperature threshold.
    pub(crate) fn temperature_warning(&self) -> bool {
        TEMPERATURE_K > self.temp_over || (self.temp_under != 0 && TEMPERATURE_K < self.temp_under)
    }

    /// I/O queues granted (0's based SQ and CQ counts): the request if set, else the maximum.
    pub(crate) fn granted(&self) -> (u16, u16) {
        self.queues
            .unwrap_or((self.max_queues - 1, self.max_queues - 1))
    }
}
