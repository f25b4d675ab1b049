//! libFuzzer entry of the `pgoutput` target; the body is `spillway_fuzz::pgoutput`
//! (src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway_fuzz::pgoutput(data));
