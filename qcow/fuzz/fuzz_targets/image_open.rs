//! Fuzz the QCOW2 header, extension and table parsers through opening, reading,
//! mapping and checking an arbitrary file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chainvault_qcow::fuzzing::open_and_read(data);
});
