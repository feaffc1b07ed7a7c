//! The writer's zero-block scan (what a download leaves as holes): see rust/src/fuzzing.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| _native::fuzzing::zero_runs(data));
