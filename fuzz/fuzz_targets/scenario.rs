//! Any text as a simulator scenario file: parsing and validation never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = syncbus_sim::Scenario::parse(&text);
});
