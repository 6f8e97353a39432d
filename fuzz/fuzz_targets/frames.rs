//! Fuzz target: securetunnel_agent::fuzzing::frames (see fuzz/run.sh).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| securetunnel_agent::fuzzing::frames(data));
