//! The virtio-blk model against a driver that writes anything into its
//! rings: the harness sets the device up as a driver would (features,
//! queue 0 at fixed addresses), copies the input into guest RAM over the
//! descriptor table, the available ring and the buffers, notifies, and
//! answers the model's DMA out of order, late, twice or not at all (a
//! refusal), as the wire can. The model must never panic, never ask for
//! DMA past the end of the address space or longer than a model may, and
//! come to rest once every answer is in: no endless loop on any ring.
#![no_main]

use dmfabric_devices::testing::{CountingLine, MemBackend};
use dmfabric_devices::virtio::blk::VirtioBlk;
use dmfabric_devices::{Device, DmaOp, DmaRequest, DmaResult};
use dmfabric_wire::{AccessSize, Space};
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0xfeb0_0000;
const RAM: usize = 64 << 10;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fn w(d: &mut dyn Device, off: u64, v: u32) {
    d.write(Space::Mmio, BASE + off, AccessSize::B4, u64::from(v));
}

/// SplitMix64 over the input's choice bytes.
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn serve(ram: &mut [u8], req: &DmaRequest) -> DmaResult {
    let addr = usize::try_from(req.op.addr()).ok();
    match &req.op {
        DmaOp::Read { len, .. } => match addr.and_then(|a| ram.get(a..a.checked_add(*len as usize)?)) {
            Some(b) => DmaResult::Read(b.to_vec()),
            None => DmaResult::Refused,
        },
        DmaOp::Write { data, .. } => match addr.and_then(|a| ram.get_mut(a..a.checked_add(data.len())?)) {
            Some(b) => {
                b.copy_from_slice(data);
                DmaResult::Written
            }
            None => DmaResult::Refused,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let (head, body) = data.split_at(10);
    let qsize = 1u32 << (head[0] % 9);
    let flags = head[1];
    let mut choices = Choices(u64::from_le_bytes(head[2..10].try_into().unwrap_or_default()));
    let backend = MemBackend::new(1 << 20);
    backend.set_read_only(flags & 1 != 0);
    if flags & 2 != 0 {
        backend.fail_flushes(Some(5));
    }
    backend.fail_at(4096, 5);
    let mut dev = VirtioBlk::new(Some((BASE, 0x200)), CountingLine::default(), Box::new(backend), 1);
    let d: &mut dyn Device = &mut dev;
    // A driver's set-up: reset, ACKNOWLEDGE | DRIVER, VERSION_1 (and what
    // the flags pick of the rest), FEATURES_OK, queue 0, DRIVER_OK.
    w(d, 0x70, 0);
    w(d, 0x70, 3);
    w(d, 0x24, 0);
    w(d, 0x20, u32::from(head[1] & 0xfc) << 2);
    w(d, 0x24, 1);
    w(d, 0x20, 1);
    w(d, 0x70, 11);
    w(d, 0x30, 0);
    w(d, 0x38, qsize);
    for (off, v) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
        w(d, off, v as u32);
        w(d, off + 4, 0);
    }
    w(d, 0x44, 1);
    w(d, 0x70, 15);
    let mut ram = vec![0u8; RAM];
    let n = body.len().min(RAM);
    ram[..n].copy_from_slice(&body[..n]);
    // Notify, then play the wire: answers in any order, some late, some
    // twice, some refused; a second notify halfway.
    w(d, 0x50, 0);
    let mut pending: Vec<DmaRequest> = Vec::new();
    let mut out = Vec::new();
    let mut issued = 0usize;
    for round in 0..4000 {
        let Some(dma) = d.dma() else { return };
        dma.poll(&mut out);
        for r in &out {
            assert!(r.op.len() >= 1 && r.op.len() <= u64::from(dmfabric_devices::dma::MAX_DMA_LEN), "{r:?}");
            assert!(r.op.addr().checked_add(r.op.len() - 1).is_some(), "past the address space: {r:?}");
        }
        issued += out.len();
        assert!(issued < 1 << 20, "DMA without end");
        pending.append(&mut out);
        if round == 40 {
            w(d, 0x50, 0);
            continue;
        }
        let Some(dma) = d.dma() else { return };
        if pending.is_empty() {
            if !dma.busy() {
                break;
            }
            continue;
        }
        let pick = (choices.next() as usize) % pending.len();
        let late = round < 3000 && choices.next() % 8 == 0;
        if late {
            continue;
        }
        let r = pending.swap_remove(pick);
        let result = if choices.next() % 32 == 0 { DmaResult::Refused } else { serve(&mut ram, &r) };
        if choices.next() % 16 == 0 {
            // A duplicate answer (or one for a tag never issued).
            dma.dma_done(r.tag, result.clone());
            dma.dma_done(r.tag ^ 0x55, DmaResult::Refused);
        }
        dma.dma_done(r.tag, result);
        // The guest may acknowledge the interrupt or read any register meanwhile.
        if choices.next() % 4 == 0 {
            let off = (choices.next() % 0x200) & !3;
            let _ = d.read(Space::Mmio, BASE + off, AccessSize::B4);
            w(d, 0x64, 3);
        }
    }
    let Some(dma) = d.dma() else { return };
    dma.poll(&mut out);
    assert!(pending.is_empty() && out.is_empty() && !dma.busy(), "the model did not come to rest: {} pending", pending.len());
    let _ = d.save();
});
