//! Golden frames: known bytes parse to known reprs, and the reprs emit
//! exactly those bytes.

use dmfabric_wire::*;

const DST: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);
const SRC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);

fn route() -> Route {
    Route { server: 0x0102, hypervisor: 0x0304, client: 0x0506, vm: 0x0708_090a, vcpu: 0x0b0c, device: 0x0d0e_0f10 }
}

#[rustfmt::skip]
const IO_REQUEST_OUT: [u8; 70] = [
    // Ethernet: dst, src, EtherType 0x88b5
    0x02, 0, 0, 0, 0, 0x02,  0x02, 0, 0, 0, 0, 0x01,  0x88, 0xb5,
    // magic "DF", version 2, kind 1 (IoRequest), flags WRITE, payload_len 0
    0x44, 0x46, 0x02, 0x01, 0x00, 0x01, 0x00, 0x00,
    // server, hypervisor, client, vcpu
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0b, 0x0c,
    // vm, device
    0x07, 0x08, 0x09, 0x0a, 0x0d, 0x0e, 0x0f, 0x10,
    // seq
    0, 0, 0, 0, 0, 0, 0x12, 0x34,
    // space PIO, size 1, status 0, reserved
    0x01, 0x01, 0x00, 0, 0, 0, 0, 0,
    // addr 0x3f8
    0, 0, 0, 0, 0, 0, 0x03, 0xf8,
    // data 0x41
    0, 0, 0, 0, 0, 0, 0, 0x41,
];

#[rustfmt::skip]
const MMIO_COMPLETION: [u8; 70] = [
    0x02, 0, 0, 0, 0, 0x01,  0x02, 0, 0, 0, 0, 0x02,  0x88, 0xb5,
    // kind 2, flags 0 (read)
    0x44, 0x46, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0b, 0x0c,
    0x07, 0x08, 0x09, 0x0a, 0x0d, 0x0e, 0x0f, 0x10,
    0, 0, 0, 0, 0, 0, 0, 0x07,
    // space MMIO, size 8, status Ok
    0x02, 0x08, 0x00, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0xd0, 0, 0, 0x08,
    0xde, 0xad, 0xbe, 0xef, 0xca, 0xfe, 0xba, 0xbe,
];

#[rustfmt::skip]
const LEVEL_INTERRUPT: [u8; 70] = [
    0x02, 0, 0, 0, 0, 0x01,  0x02, 0, 0, 0, 0, 0x02,  0x88, 0xb5,
    // kind 3, flags LEVEL|ASSERTED|RETRANSMIT = 0x1c
    0x44, 0x46, 0x02, 0x03, 0x00, 0x1c, 0x00, 0x00,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0b, 0x0c,
    0x07, 0x08, 0x09, 0x0a, 0x0d, 0x0e, 0x0f, 0x10,
    0, 0, 0, 0, 0, 0, 0, 0x02,
    // space 1 (line), size 0, status 0
    0x01, 0x00, 0x00, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0x04,
    0, 0, 0, 0, 0, 0, 0, 0,
];

#[rustfmt::skip]
const CONTROL_HELLO_TAGGED: [u8; 70 + 3 + 16] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  0x02, 0, 0, 0, 0, 0x01,  0x88, 0xb5,
    // kind 5, flags AUTH_TAG, payload_len 3
    0x44, 0x46, 0x02, 0x05, 0x00, 0x02, 0x00, 0x03,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0b, 0x0c,
    0x07, 0x08, 0x09, 0x0a, 0x0d, 0x0e, 0x0f, 0x10,
    0, 0, 0, 0, 0, 0, 0, 0x01,
    // op Hello
    0x01, 0x00, 0x00, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0,
    b'h', b'i', b'!',
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];

#[rustfmt::skip]
const NACK_UNKNOWN_DEVICE: [u8; 70] = [
    0x02, 0, 0, 0, 0, 0x01,  0x02, 0, 0, 0, 0, 0x02,  0x88, 0xb5,
    0x44, 0x46, 0x02, 0x06, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0b, 0x0c,
    0x07, 0x08, 0x09, 0x0a, 0x0d, 0x0e, 0x0f, 0x10,
    0, 0, 0, 0, 0, 0, 0x12, 0x34,
    // nacked kind IoRequest, size 0, reason UnknownDevice
    0x01, 0x00, 0x01, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0,
];

fn check_golden(bytes: &[u8], repr: FrameRepr<'_>) {
    assert_eq!(FrameRepr::parse_bytes(bytes).unwrap(), repr, "parse");
    let mut out = vec![0u8; repr.buffer_len()];
    assert_eq!(repr.emit(&mut out).unwrap(), bytes.len());
    assert_eq!(out, bytes, "emit");
}

#[test]
fn golden_io_request_out() {
    let repr = FrameRepr::new(
        EthernetRepr { dst: DST, src: SRC },
        Message::IoRequest(IoRequest {
            route: route(),
            seq: 0x1234,
            space: Space::Pio,
            dir: Direction::Write,
            size: AccessSize::B1,
            addr: 0x3f8,
            data: 0x41,
        }),
    );
    check_golden(&IO_REQUEST_OUT, repr);
}

#[test]
fn golden_mmio_completion() {
    let repr = FrameRepr::new(
        EthernetRepr { dst: SRC, src: DST },
        Message::IoCompletion(IoCompletion {
            route: route(),
            seq: 7,
            space: Space::Mmio,
            dir: Direction::Read,
            size: AccessSize::B8,
            addr: 0xd000_0008,
            data: 0xdead_beef_cafe_babe,
            status: Status::Ok,
        }),
    );
    check_golden(&MMIO_COMPLETION, repr);
}

#[test]
fn golden_level_interrupt() {
    let mut repr = FrameRepr::new(
        EthernetRepr { dst: SRC, src: DST },
        Message::Interrupt(Interrupt {
            route: route(),
            seq: 2,
            source: IrqSource::Line(4),
            trigger: Trigger::Level { asserted: true },
        }),
    );
    repr.retransmit = true;
    check_golden(&LEVEL_INTERRUPT, repr);
}

#[test]
fn golden_control_hello_with_tag() {
    let mut repr = FrameRepr::new(
        EthernetRepr { dst: MacAddr::BROADCAST, src: SRC },
        Message::Control(ControlMsg { route: route(), seq: 1, op: ControlOp::Hello, payload: b"hi!" }),
    );
    let mut tag = [0u8; 16];
    for (i, b) in tag.iter_mut().enumerate() {
        *b = 0xa0 + i as u8;
    }
    repr.auth_tag = Some(tag);
    check_golden(&CONTROL_HELLO_TAGGED, repr);
}

#[test]
fn golden_nack() {
    let repr = FrameRepr::new(
        EthernetRepr { dst: SRC, src: DST },
        Message::Nack(Nack { route: route(), seq: 0x1234, reason: NackReason::UnknownDevice, nacked: Kind::IoRequest }),
    );
    check_golden(&NACK_UNKNOWN_DEVICE, repr);
}

/// Each semantic fault in a golden frame is caught by `parse`.
#[test]
fn semantic_faults_are_rejected() {
    let cases: &[(&[u8], usize, u8, WireError)] = &[
        (&IO_REQUEST_OUT, 46, 3, WireError::BadSpace),    // space 3
        (&IO_REQUEST_OUT, 47, 8, WireError::BadSize),     // 8-byte port I/O
        (&IO_REQUEST_OUT, 47, 3, WireError::BadSize),     // size 3
        (&IO_REQUEST_OUT, 68, 1, WireError::DataTooWide), // data 0x141 in a 1-byte OUT
        (&IO_REQUEST_OUT, 48, 1, WireError::BadStatus),   // status on a request
        (&IO_REQUEST_OUT, 59, 1, WireError::BadSpace),    // port 0x1_0000_03f8
        (&MMIO_COMPLETION, 48, 9, WireError::BadStatus),
        (&LEVEL_INTERRUPT, 46, 2, WireError::BadFlags), // MSI cannot be level
        (&LEVEL_INTERRUPT, 47, 1, WireError::BadSize),
        (&LEVEL_INTERRUPT, 19, 0x09, WireError::BadFlags), // WRITE on an interrupt
        (&NACK_UNKNOWN_DEVICE, 48, 0, WireError::BadStatus),
        (&NACK_UNKNOWN_DEVICE, 46, 9, WireError::BadSpace),
    ];
    for &(golden, at, val, want) in cases {
        let mut b = golden.to_vec();
        b[at] = val;
        assert_eq!(FrameRepr::parse_bytes(&b).err(), Some(want), "byte {at} = {val:#x}");
    }
    // A payload on a kind that carries none.
    let mut b = NACK_UNKNOWN_DEVICE.to_vec();
    b[21] = 1;
    b.push(0);
    assert_eq!(FrameRepr::parse_bytes(&b).err(), Some(WireError::UnexpectedPayload));
}

#[test]
fn emit_refuses_short_buffer() {
    let repr = FrameRepr::parse_bytes(&IO_REQUEST_OUT).unwrap();
    let mut out = [0u8; 69];
    assert_eq!(repr.emit(&mut out), Err(WireError::BufferTooSmall));
}

/// The fuzz seed corpus: every seed goes through parse without a panic, the
/// valid ones round-trip, and the known-bad ones are refused.
#[test]
fn fuzz_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/parse");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = FrameRepr::parse_bytes(&bytes);
        let bad = ["bad_", "short", "arp_"].iter().any(|p| name.starts_with(p));
        assert_eq!(parsed.is_err(), bad, "{name}: {parsed:?}");
        if let Ok(repr) = parsed {
            let mut out = vec![0u8; repr.buffer_len()];
            repr.emit(&mut out).unwrap();
            assert_eq!(out, bytes, "{name} re-emits byte for byte");
        }
        seen += 1;
    }
    assert!(seen >= 10, "seed corpus present ({seen} files)");
}

/// The tag construction is part of the wire format: a frame sealed with a
/// known secret has exactly this tag (SipHash-2-4-128 under the key BLAKE3
/// derives from the secret). Changing the KDF context or the MAC breaks
/// every peer of another build, so this vector must never change within a
/// protocol version.
#[test]
fn golden_sealed_frame() {
    let ring = auth::KeyRing::single(1, &auth::Secret::from_bytes([0x11; 32]));
    let repr = FrameRepr::parse_bytes(&IO_REQUEST_OUT).unwrap();
    let mut buf = vec![0u8; repr.sealed_len()];
    let n = repr.emit_sealed(&mut buf, &ring.sending()).unwrap();
    assert_eq!(n, 70 + 16);
    assert_eq!(&buf[..19], &IO_REQUEST_OUT[..19], "headers as before up to the flags");
    assert_eq!(&buf[20..14 + 35], &IO_REQUEST_OUT[20..14 + 35], "and after them up to the key id");
    assert_eq!(buf[19] & flags::AUTH_TAG as u8, flags::AUTH_TAG as u8);
    assert_eq!(buf[14 + 35], 1, "key id");
    assert_eq!(&buf[70..], &GOLDEN_TAG);
    assert_eq!(ring.verify(&Frame::new_checked(&buf[..]).unwrap()), Ok(()));
}

/// Recorded from the first build of protocol version 2 (a pin against
/// accidental change, not an independent derivation).
const GOLDEN_TAG: [u8; 16] =
    [0x71, 0xaf, 0xf6, 0x0f, 0x0c, 0xeb, 0xad, 0x79, 0x0a, 0x5d, 0xc6, 0x2b, 0xf3, 0x23, 0x92, 0x65];
