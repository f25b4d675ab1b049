//! libFuzzer entry of the `journal` target; the body is `spillway_fuzz::journal` (src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway_fuzz::journal(data));
