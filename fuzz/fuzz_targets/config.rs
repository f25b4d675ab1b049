//! libFuzzer entry of the `config` target; the body is `spillway_fuzz::config` (src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway_fuzz::config(data));
