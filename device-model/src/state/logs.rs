//! What the log pages report and the controller keeps between commands: the Error
//! Information log and the SMART counters (NVMe base 2.0 §5.16.1.2, §5.16.1.3). Get Log Page
//! is in `admin/log_page.rs`.

use nvme_spec::Status;
use nvme_spec::log_page::ErrorLogEntry;
use nvme_spec::opcode::nvm;

/// Error log entries kept (Identify ELPE + 1).
pub(crate) const ERROR_LOG_ENTRIES: usize = 64;

/// The error log: a ring of the most recent failed commands.
#[derive(Debug, Default)]
pub(crate) struct ErrorLog {
    pub(crate) entries: std::collections::VecDeque<ErrorLogEntry>,
    pub(crate) count: u64,
}

impl ErrorLog {
    pub(crate) fn record(&mut self, sqid: u16, cid: u16, status: Status, nsid: u32, _opcode: u8) {
        self.count += 1;
        let mut e = ErrorLogEntry::default();
        e.error_count = self.count.into();
        e.sqid = sqid.into();
        e.cid = cid.into();
        e.status = status.cqe_bits().into();
        e.param_error_location = 0xffff.into();
        e.nsid = nsid.into();
        if self.entries.len() == ERROR_LOG_ENTRIES {
            self.entries.pop_back();
        }
        self.entries.push_front(e);
    }
    pub(crate) fn count(&self) -> u64 {
        self.count
    }
}

/// SMART counters (since the daemon started; a supervised worker carries them to the next).
#[derive(Debug)]
pub(crate) struct SmartCounters {
    pub(crate) bytes_read: u64,
    pub(crate) bytes_written: u64,
    pub(crate) reads: u64,
    pub(crate) writes: u64,
    pub(crate) started: std::time::Instant,
    /// Seconds powered on before `started` (earlier workers).
    pub(crate) power_on_before: u64,
}

impl Default for SmartCounters {
    fn default() -> Self {
        Self {
            bytes_read: 0,
            bytes_written: 0,
            reads: 0,
            writes: 0,
            started: std::time::Instant::now(),
            power_on_before: 0,
        }
    }
}

impl SmartCounters {
    /// Seconds powered on, earlier workers included.
    pub(crate) fn power_on_secs(&self) -> u64 {
        self.power_on_before + self.started.elapsed().as_secs()
    }

    pub(crate) fn account(&mut self, opcode: u8, bytes: u64) {
        match opcode {
            nvm::READ | nvm::COMPARE => {
                self.reads += 1;
                self.bytes_read += bytes;
            }
            nvm::WRITE | nvm::WRITE_ZEROES => {
                self.writes += 1;
                self.bytes_written += bytes;
            }
            _ => {}
        }
    }
}
