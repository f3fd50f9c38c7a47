//! NVMe wire formats (NVMe base 2.0, NVM command set 1.0): controller registers, submission
//! and completion queue entries, opcodes, status codes, Identify data structures and log pages.
//!
//! No logic lives here: only layouts (`zerocopy` derives, little-endian fields) and constants.

#![forbid(unsafe_code)]

/// `Default` as all-zero bytes for the large wire structures (arrays too big for derive).
macro_rules! zeroed_default {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                <$t as zerocopy::FromZeros>::new_zeroed()
            }
        }
    )*};
}

pub mod command;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log_page;
pub mod opcode;
pub mod registers;
pub mod status;
pub mod tcp;
pub mod uuid;

pub use command::{Completion, Submission};
pub use status::Status;
