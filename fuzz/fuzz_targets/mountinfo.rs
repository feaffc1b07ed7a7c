//! /proc/self/mountinfo parsing (which filesystem holds a path): see rust/src/fuzzing.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| _native::fuzzing::mountinfo(data));
