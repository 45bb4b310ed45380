//! A flood of malformed frames interleaved with valid (sealed) requests,
//! over real transports between two network namespaces: every valid
//! request is answered, every bad frame is counted by reason, nothing
//! stalls.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_bench::harness::{self, ServerLaunch, Setup};
use dmfabric_bench::loadgen::LoadError;
use dmfabric_dataplane::{FrameBatch, Transport, TransportKind};
use dmfabric_testkit::Need;
use dmfabric_wire::session::Seq;
use dmfabric_wire::{AccessSize, Direction, EthernetRepr, FrameRepr, IoRequest, Message, Route, Space};

const ROUNDS: u64 = 500;

/// Small deterministic generator for the random-bytes frames.
struct Lcg(u64);
impl Lcg {
    fn byte(&mut self) -> u8 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u8
    }
}

fn flood(kind: TransportKind) {
    let setup = Setup::new(kind, ServerLaunch::Thread);
    let stop = Arc::new(AtomicBool::new(false));
    let outcome = harness::run(&setup, &stop, |mut t: Box<dyn Transport>, target| -> Result<(u64, u64), LoadError> {
        let t = t.as_mut();
        let mut rng = Lcg(7);
        let mut batch = FrameBatch::new();
        let (mut answered, mut foreign_sent) = (0u64, 0u64);
        for seq in 0..ROUNDS {
            let req = IoRequest {
                route: Route {
                    server: target.server_id,
                    hypervisor: 1,
                    client: 1,
                    vm: 1,
                    vcpu: 0,
                    device: target.device,
                },
                seq: Seq::new(target.session, seq as u32).0,
                space: Space::Pio,
                dir: Direction::Write,
                size: AccessSize::B1,
                addr: 0x500,
                data: seq & 0xff,
            };
            let mut repr =
                FrameRepr::new(EthernetRepr { dst: target.server_mac, src: t.mac() }, Message::IoRequest(req));
            repr.epoch = target.epoch;
            let key = target.key.expect("the harness authenticates");
            let mut good = vec![0u8; repr.sealed_len()];
            repr.emit_sealed(&mut good, &key).unwrap();
            // Six kinds of bad frame around every good one.
            let mut short = good.clone();
            short.truncate(30);
            let mut magic = good.clone();
            magic[14] ^= 0xff;
            let mut version = good.clone();
            version[16] = 99;
            let mut unknown_kind = good.clone();
            unknown_kind[17] = 0x7f;
            let mut size = good.clone();
            size[47] = 3;
            let mut random = good[..14].to_vec();
            random.extend((0..60).map(|_| rng.byte()));
            random[14] = 0; // never a valid magic: counted as bad_magic
            batch.push(&short);
            batch.push(&magic);
            batch.push(&version);
            batch.push(&good);
            batch.push(&unknown_kind);
            batch.push(&size);
            batch.push(&random);
            if kind == TransportKind::Xdp {
                // dmfabric's XDP program passes other EtherTypes to the
                // kernel: this one must never reach the server.
                let mut other = good.clone();
                other[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                batch.push(&other);
                foreign_sent += 1;
            }
            t.send(&mut batch)?;
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut done = false;
            while !done && Instant::now() < deadline {
                t.recv(16, &mut |f| {
                    if let Ok(FrameRepr { msg: Message::IoCompletion(c), .. }) = FrameRepr::parse_bytes(f) {
                        done |= Seq(c.seq).counter() == seq as u32;
                    }
                })?;
            }
            answered += u64::from(done);
        }
        Ok((answered, foreign_sent))
    })
    .expect("harness run");
    let (answered, foreign_sent) = outcome.result;
    assert_eq!(answered, ROUNDS, "{kind}: every valid request answered");
    let s = outcome.server.expect("server stats");
    let count = |name: &str| s.malformed.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c);
    assert_eq!(s.requests, ROUNDS, "{kind}: {s}");
    assert_eq!(s.completions, ROUNDS);
    assert_eq!(count("truncated"), ROUNDS, "{s}");
    assert_eq!(count("bad_magic"), 2 * ROUNDS, "{s}");
    assert_eq!(count("bad_version"), ROUNDS, "{s}");
    assert_eq!(count("unknown_kind"), ROUNDS, "{s}");
    assert_eq!(count("bad_size"), ROUNDS, "{s}");
    assert_eq!(s.malformed_total(), 6 * ROUNDS, "{s}");
    // No frame of another EtherType reached the server (over AF_XDP one
    // was sent each round; AF_PACKET's socket is bound to 0x88B5).
    assert_eq!(foreign_sent, if kind == TransportKind::Xdp { ROUNDS } else { 0 });
    assert_eq!(s.foreign, 0, "{s}");
}

#[test]
fn malformed_flood_over_xdp() {
    if dmfabric_testkit::privileged_or_skip("malformed_flood_over_xdp", &[Need::Root]) {
        flood(TransportKind::Xdp);
    }
}

#[test]
fn malformed_flood_over_packet() {
    if dmfabric_testkit::privileged_or_skip("malformed_flood_over_packet", &[Need::Root]) {
        flood(TransportKind::Packet);
    }
}

#[test]
fn malformed_flood_over_udp() {
    if dmfabric_testkit::privileged_or_skip("malformed_flood_over_udp", &[Need::Root]) {
        flood(TransportKind::Udp);
    }
}
