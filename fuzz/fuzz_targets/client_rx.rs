//! The client's receive path: frames from the wire into a client platform's
//! port (VM 7 with a map whose device 1 on server 1 may raise line 5 and
//! reset the VM; a session with server 1). The input is a sequence of
//! frames (a length byte, then the bytes); a frame whose length byte is odd
//! is sealed with the client's key first (its tag fixed up), so that what
//! comes after the tag — sources, sessions, streams, grants, completions —
//! is fuzzed too. Nothing may panic.
#![no_main]

use std::sync::Arc;

use dmfabric_dataplane::hello::{Sealer, Session};
use dmfabric_dataplane::mem;
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::{FrameBatch, Transport};
use dmfabric_vmm_shim::devmap::{DeviceMap, Remote, Target};
use dmfabric_vmm_shim::exits::LiveMap;
use dmfabric_vmm_shim::kvm::{IrqSink, KvmError};
use dmfabric_vmm_shim::remote::{ClientConfig, ClientPort, VmEntry};
use dmfabric_wire::auth::testing::ring;
use dmfabric_wire::{FrameRepr, IrqSource, MacAddr, Space, Trigger};
use libfuzzer_sys::fuzz_target;

const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);
const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);

struct Nowhere;

impl IrqSink for Nowhere {
    fn inject(&self, _: IrqSource, _: Trigger) -> Result<(), KvmError> {
        Ok(())
    }
}

fn sealed(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut repr = FrameRepr::parse_bytes(bytes).ok()?;
    repr.epoch = 0x5151;
    let mut buf = vec![0u8; repr.sealed_len()];
    let n = repr.emit_sealed(&mut buf, &ring(3).sending()).ok()?;
    buf.truncate(n);
    Some(buf)
}

fuzz_target!(|data: &[u8]| {
    let (client_t, mut server_t) = mem::pair(CLIENT, SERVER, 8);
    let mut map = DeviceMap::default();
    map.add(Space::Pio, 0x500, 0x100, Target::Remote(Remote::new(1, 1).lines(&[5]).resets())).unwrap();
    let vms =
        [VmEntry { id: 7, vcpus: 2, irq: Arc::new(Nowhere), map: Arc::new(LiveMap::from_pointee(map)), ram: None }];
    let cfg = ClientConfig {
        client: 3,
        hypervisor: 1,
        servers: vec![],
        retry: Retry::default(),
        hello_timeout: std::time::Duration::from_millis(1),
        sealer: Sealer::new(ring(3)),
        open_on_demand: false,
    };
    let port = ClientPort::connect(Box::new(client_t), &cfg, &vms).unwrap();
    port.insert_session(Session { server: 1, mac: SERVER, epoch: 0x5151, id: 0x100 });
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len >> 1).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        let mut b = FrameBatch::new();
        match (len & 1 == 1).then(|| sealed(frame)).flatten() {
            Some(f) => b.push(&f),
            None => b.push(frame),
        };
        let _ = server_t.send(&mut b);
        let _ = port.poll_once();
        let _ = server_t.recv(64, &mut |_| {});
    }
});
