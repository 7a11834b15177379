//! Any bytes as the body of a data datagram, compressed or not: decompression (the
//! claimed size is checked before anything is allocated) and batch decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncbus_mesh::wire::{self, ClusterId, Header, MessageKind};

fuzz_target!(|data: &[u8]| {
    for flags in [0, wire::FLAG_COMPRESSED] {
        let header = Header {
            kind: MessageKind::Data,
            flags,
            cluster: ClusterId(1),
        };
        if let Ok(body) = wire::data_body(&header, data) {
            let _ = wire::decode_batch(&body);
        }
    }
});
