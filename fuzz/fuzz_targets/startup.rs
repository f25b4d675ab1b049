//! libFuzzer entry of the `startup` target; the body is `spillway_fuzz::startup` (src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway_fuzz::startup(data));
