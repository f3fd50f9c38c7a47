//! vfio-user message parser (header checks and every command payload).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::vfio_user_message(data);
});
