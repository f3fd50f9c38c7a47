//! The whole controller: BAR0, doorbells, shadow doorbells, DMA map/unmap, resets and Keep
//! Alive checks under in-flight I/O held by a late backend.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vnvme_tests::fuzz::controller_ops(data);
});
