//! Shared by the targets that reach past the header checks.

use syncbus_mesh::wire::{self, ClusterId};

/// A datagram of `cluster` with a valid header and checksum around `body`; the kind is
/// taken modulo 10, so unknown kinds (0) and a nested seal (9) come up too.
pub fn frame(cluster: ClusterId, kind: u8, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire::HEADER_LEN + body.len());
    out.extend_from_slice(&wire::MAGIC);
    out.push(wire::VERSION);
    out.push(kind % 10);
    out.push(flags & 0x07);
    out.extend_from_slice(&cluster.0.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(body);
    wire::checksummed(out).to_vec()
}
