//! Feature identifiers for Get/Set Features (NVMe base 2.0 §5.27.1).

pub const ARBITRATION: u8 = 0x01;
pub const POWER_MANAGEMENT: u8 = 0x02;
pub const LBA_RANGE_TYPE: u8 = 0x03;
pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
pub const ERROR_RECOVERY: u8 = 0x05;
pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
pub const NUMBER_OF_QUEUES: u8 = 0x07;
pub const INTERRUPT_COALESCING: u8 = 0x08;
pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
pub const WRITE_ATOMICITY: u8 = 0x0a;
pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
pub const AUTONOMOUS_POWER_STATE: u8 = 0x0c;
pub const TIMESTAMP: u8 = 0x0e;
pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
/// LBA Status Information Report Interval (NVMe base 2.0, Set Features, feature 15h).
pub const LBA_STATUS_INFO_REPORT_INTERVAL: u8 = 0x15;
pub const HOST_BEHAVIOR: u8 = 0x16;

/// Get Features select field (CDW10 bits 10:8).
pub mod select {
    pub const CURRENT: u8 = 0;
    pub const DEFAULT: u8 = 1;
    pub const SAVED: u8 = 2;
    pub const SUPPORTED_CAPABILITIES: u8 = 3;
}
