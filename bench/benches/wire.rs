//! Parse and emit of the frames on the hot path, and what authentication
//! adds to each: sealing (tag) and checking (verify) one frame.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dmfabric_wire::auth::{KeyRing, Secret};
use dmfabric_wire::{AccessSize, Direction, EthernetRepr, Frame, FrameRepr, IoRequest, MacAddr, Message, Route, Space};

fn request() -> FrameRepr<'static> {
    FrameRepr::new(
        EthernetRepr { dst: MacAddr([2, 0, 0, 0, 0, 2]), src: MacAddr([2, 0, 0, 0, 0, 1]) },
        Message::IoRequest(IoRequest {
            route: Route { server: 1, hypervisor: 1, client: 1, vm: 7, vcpu: 3, device: 1 },
            seq: 123_456,
            space: Space::Pio,
            dir: Direction::Write,
            size: AccessSize::B1,
            addr: 0x3f8,
            data: 0x41,
        }),
    )
}

fn wire(c: &mut Criterion) {
    let repr = request();
    let mut buf = [0u8; 128];
    let n = repr.emit(&mut buf).unwrap();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("emit_io_request", |b| b.iter(|| black_box(&repr).emit(black_box(&mut buf)).unwrap()));
    let frame = buf;
    g.bench_function("parse_io_request", |b| b.iter(|| FrameRepr::parse_bytes(black_box(&frame[..n])).unwrap()));
    let mut bad = frame;
    bad[14] = 0;
    g.bench_function("reject_bad_magic", |b| b.iter(|| FrameRepr::parse_bytes(black_box(&bad[..n])).is_err()));
    // Authentication: sealing a request as a client does, checking one as a
    // server does (good and forged), and the bare MAC of one frame.
    let ring = KeyRing::single(1, &Secret::from_bytes([0x42; 32]));
    let key = ring.sending();
    g.bench_function("emit_sealed_io_request", |b| {
        b.iter(|| black_box(&repr).emit_sealed(black_box(&mut buf), &key).unwrap())
    });
    let sealed_len = repr.emit_sealed(&mut buf, &key).unwrap();
    let sealed = buf;
    g.bench_function("verify_io_request", |b| {
        b.iter(|| ring.verify(&Frame::new_checked(black_box(&sealed[..sealed_len])).unwrap()).is_ok())
    });
    let mut forged = sealed;
    forged[sealed_len - 1] ^= 1;
    g.bench_function("reject_forged_tag", |b| {
        b.iter(|| ring.verify(&Frame::new_checked(black_box(&forged[..sealed_len])).unwrap()).is_err())
    });
    g.bench_function("tag_70_bytes", |b| b.iter(|| key.key.tag(black_box(&sealed[..sealed_len - 16]))));
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
