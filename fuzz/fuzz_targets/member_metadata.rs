//! What a volume store or an array reads back from its base or members (array and store
//! superblocks, checkpoints, journal records), checksums made valid first.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vnvme_tests::fuzz::member_metadata(data);
});
