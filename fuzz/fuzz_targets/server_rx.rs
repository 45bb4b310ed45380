//! The server's receive path: frames from the wire into a server with a
//! registry (client platform 3: VM 7, two vCPUs; the PC devices of VM 7
//! and the test devices) and an open session. The input is a sequence of
//! frames (a length byte, then the bytes); a frame whose length byte is odd
//! is sealed with client 3's key first (its tag fixed up), so that what
//! comes after the tag — identities, sessions, streams, the devices — is
//! fuzzed too. Every frame must be taken without a panic, and the
//! client's streams stay bounded by its VM's vCPUs and the devices that
//! exist (a frame can name any id).
#![no_main]

use std::time::Instant;

use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
use dmfabric_devices::platform::pc;
use dmfabric_dm_workers::server::Server;
use dmfabric_dm_workers::testing::{self, TestClient};
use dmfabric_wire::{FrameRepr, MacAddr};
use libfuzzer_sys::fuzz_target;

const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);

/// Seal `bytes` (a frame) as client 3 would, if they parse.
fn sealed(bytes: &[u8]) -> Option<Vec<u8>> {
    let repr = FrameRepr::parse_bytes(bytes).ok()?;
    let mut buf = vec![0u8; repr.sealed_len()];
    let n = repr.emit_sealed(&mut buf, &testing::ring(3).sending()).ok()?;
    buf.truncate(n);
    Some(buf)
}

fuzz_target!(|data: &[u8]| {
    let mut devices = vec![pc::test_device(1), pc::irq_test_device(0)];
    devices.extend(pc::PcLayout::new(7).unwrap().specs());
    let registry = testing::registry(vec![testing::client(3, CLIENT, &[(7, 2)])]);
    // A fixed epoch and first session (0x100), so that inputs can name them.
    let mut server = Server::new(1, SERVER, &devices, registry).with_epoch(0x5151_5151, 0x100);
    let mut client = TestClient::new(3, CLIENT, 1, SERVER);
    client.open(&mut server);
    let now = Instant::now();
    let mut tx = FrameBatch::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len >> 1).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        match (len & 1 == 1).then(|| sealed(frame)).flatten() {
            Some(f) => server.on_frame(&f, &mut tx, now),
            None => server.on_frame(frame, &mut tx, now),
        }
        server.on_poll(&mut tx, now);
        tx.clear();
    }
    // Streams: (device named, or 0 for "by address") × vCPU, no more.
    let (_, streams) = server.remembered(3);
    assert!(streams <= (devices.len() + 1) * 2, "{streams} streams");
});
