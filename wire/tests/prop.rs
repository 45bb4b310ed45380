//! Property tests: parsing never panics, and emit → parse is the identity.

use dmfabric_wire::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn route() -> impl Strategy<Value = Route> {
    (any::<u16>(), any::<u16>(), any::<u16>(), any::<u32>(), any::<u16>(), any::<u32>()).prop_map(
        |(server, hypervisor, client, vm, vcpu, device)| Route { server, hypervisor, client, vm, vcpu, device },
    )
}

fn io_fields() -> impl Strategy<Value = (Space, Direction, AccessSize, u64, u64)> {
    (prop_oneof![Just(Space::Pio), Just(Space::Mmio)], any::<bool>(), 0usize..4, any::<u64>(), any::<u64>())
        .prop_filter_map("size fits space", |(space, write, s, addr, data)| {
            let size = AccessSize::new([1, 2, 4, 8][s], space)?;
            let addr = if space == Space::Pio { addr & 0xffff } else { addr };
            let dir = if write { Direction::Write } else { Direction::Read };
            Some((space, dir, size, addr, data & size.mask()))
        })
}

fn message(payload: &[u8]) -> impl Strategy<Value = Message<'_>> {
    let io_req = (route(), any::<u64>(), io_fields()).prop_map(|(route, seq, (space, dir, size, addr, data))| {
        Message::IoRequest(IoRequest { route, seq, space, dir, size, addr, data })
    });
    let io_cmp = (route(), any::<u64>(), io_fields(), any::<bool>()).prop_map(
        |(route, seq, (space, dir, size, addr, data), ok)| {
            let status = if ok { Status::Ok } else { Status::Unclaimed };
            Message::IoCompletion(IoCompletion { route, seq, space, dir, size, addr, data, status })
        },
    );
    let irq = (route(), any::<u64>(), any::<u32>(), any::<u64>(), 0u8..4).prop_map(|(route, seq, n, a, t)| {
        let (source, trigger) = match t {
            0 => (IrqSource::Line(n), Trigger::Edge),
            1 => (IrqSource::Line(n), Trigger::Level { asserted: true }),
            2 => (IrqSource::Line(n), Trigger::Level { asserted: false }),
            _ => (IrqSource::Msi { address: a, data: n }, Trigger::Edge),
        };
        Message::Interrupt(Interrupt { route, seq, source, trigger })
    });
    let ack = (route(), any::<u64>()).prop_map(|(route, seq)| Message::InterruptAck(InterruptAck { route, seq }));
    let ctl = (route(), any::<u64>(), 1u8..=6).prop_map(move |(route, seq, op)| {
        Message::Control(ControlMsg { route, seq, op: ControlOp::from_u8(op).unwrap(), payload })
    });
    let nack = (route(), any::<u64>(), 1u8..=7, 1u8..=8).prop_map(|(route, seq, r, k)| {
        Message::Nack(Nack { route, seq, reason: NackReason::from_u8(r).unwrap(), nacked: Kind::from_u8(k).unwrap() })
    });
    // A DMA frame carries exactly `len` bytes where it carries data: a data
    // frame takes the payload's length (at least 1), the others any length.
    let dma = (route(), any::<u64>(), any::<bool>(), any::<bool>(), any::<u64>(), 1u32..=MAX_DMA_CHUNK).prop_map(
        move |(route, seq, write, reply, addr, len)| {
            let dir = if write { DmaDir::Write } else { DmaDir::Read };
            let (len, body) = if Dma::carries_data(dir, reply) {
                if payload.is_empty() {
                    (1, &[7u8][..])
                } else {
                    (payload.len() as u32, payload)
                }
            } else {
                (len, &[][..])
            };
            let addr = addr.min(u64::MAX - u64::from(len) + 1);
            Message::Dma(Dma { route, seq, dir, reply, addr, len, payload: body })
        },
    );
    prop_oneof![io_req, io_cmp, irq, ack, ctl, nack, dma]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = FrameRepr::parse_bytes(&bytes);
    }

    /// Random bytes behind a valid Ethernet + magic + version prefix reach
    /// the deeper checks instead of failing at the first byte.
    #[test]
    fn parse_never_panics_past_the_prefix(kind in 0u8..9, rest in proptest::collection::vec(any::<u8>(), 0..150)) {
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
        bytes.extend_from_slice(&MAGIC.to_be_bytes());
        bytes.push(VERSION);
        bytes.push(kind);
        bytes.extend_from_slice(&rest);
        if let Ok(repr) = FrameRepr::parse_bytes(&bytes) {
            // Whatever parses must emit and parse back to itself.
            let mut out = vec![0u8; repr.buffer_len()];
            repr.emit(&mut out).unwrap();
            prop_assert_eq!(FrameRepr::parse_bytes(&out).unwrap(), repr);
        }
    }

    #[test]
    fn emit_then_parse_is_identity(
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        seed in any::<u64>(),
        dst in mac(), src in mac(), retransmit in any::<bool>(), tag in proptest::option::of(any::<[u8; 16]>()), key_id in any::<u8>(), epoch in any::<u32>(),
    ) {
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            ProptestConfig::default(),
            proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &{
                let mut s = [0u8; 32];
                s[..8].copy_from_slice(&seed.to_le_bytes());
                s
            }),
        );
        let msg = message(&payload).new_tree(&mut runner).unwrap().current();
        let repr = FrameRepr { eth: EthernetRepr { dst, src }, msg, retransmit, auth_tag: tag, key_id, epoch };
        let mut buf = vec![0u8; repr.buffer_len() + 8];
        let n = repr.emit(&mut buf).unwrap();
        prop_assert_eq!(n, repr.buffer_len());
        // Trailing bytes (Ethernet padding) are ignored.
        prop_assert_eq!(FrameRepr::parse_bytes(&buf).unwrap(), repr);
        prop_assert_eq!(FrameRepr::parse_bytes(&buf[..n]).unwrap(), repr);
        prop_assert_eq!(FrameRepr::parse_bytes(&buf[..n - 1]).err(), Some(WireError::Truncated));
    }
}
