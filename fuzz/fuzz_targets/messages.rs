//! libFuzzer entry of the `messages` target; the body is `spillway_fuzz::messages` (src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway_fuzz::messages(data));
