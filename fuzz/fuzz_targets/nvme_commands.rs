//! NVMe admin and I/O commands, PRP lists and SGLs over guest memory, doorbell values.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::nvme_commands(data);
});
