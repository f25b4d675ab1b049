//! libFuzzer entry of the `classify` target; the body is `spillway_fuzz::classify` (src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway_fuzz::classify(data));
