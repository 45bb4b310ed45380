//! A device model's saved state as it travels from one server to the next:
//! the JSON of dm-workers' `Handoff` (device, server it left, state, the
//! completions of its streams as frames) or a bare `DeviceState`. Whatever
//! parses is restored into every model (`dmfabric_devices::build`, as
//! `DeviceEnv::restore` does); a model that takes it is driven by the
//! access script after the first NUL byte, saved, and what it saved must
//! go through JSON unchanged and restore to a model that saves the same.
//!
//! Input `S...` is a device spec instead (kind, ports, MMIO window, then a
//! script): its check, `confined`, `build` and `fresh` must agree and never
//! panic or allocate more than a model may hold.
#![no_main]

use std::time::Instant;

use dmfabric_devices::{build, fresh, DeviceKind, DeviceSpec, DeviceState};
use dmfabric_fuzz::{drive, specs, FuzzWiring};
use dmfabric_wire::FrameRepr;
use libfuzzer_sys::fuzz_target;

/// What travels with a device model between servers (the shape of
/// `dmfabric_dm_workers::placement::Handoff`, which is private).
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Handoff {
    device: u32,
    from: u16,
    state: DeviceState,
    streams: Vec<(u64, u64, Vec<u8>)>,
}

/// Larger register-file windows are valid but slow to save and compare:
/// built only up to this (what is checked about sizes does not need more).
const BUILD_AT_MOST: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    if let Some(spec) = data.strip_prefix(b"S") {
        return fuzz_spec(spec);
    }
    let (json, script) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let state = match serde_json::from_slice::<Handoff>(json) {
        Ok(h) => {
            // The planner takes each stream's completion back out of its frame.
            for (_, _, frame) in &h.streams {
                let _ = FrameRepr::parse_bytes(frame);
            }
            h.state
        }
        Err(_) => match serde_json::from_slice::<DeviceState>(json) {
            Ok(s) => s,
            Err(_) => return,
        },
    };
    let t0 = Instant::now();
    let wiring = FuzzWiring::new(t0);
    for spec in specs() {
        if let Ok(d) = build(&spec, &wiring, Some(state.clone()), t0) {
            round_trip(d, &spec, script, &wiring, t0);
        }
    }
});

/// Drive `d`, save it, and check that the state survives its journey.
fn round_trip(mut d: Box<dyn dmfabric_devices::Device>, spec: &DeviceSpec, script: &[u8], w: &FuzzWiring, t0: Instant) {
    let now = drive(d.as_mut(), spec, script, t0);
    let saved = d.save();
    // (A register file's state is two byte strings: serde's own, and slow.)
    if !matches!(saved, DeviceState::RegFile(_)) {
        let json = serde_json::to_vec(&saved).expect("a saved state serialises");
        let parsed: DeviceState = serde_json::from_slice(&json).expect("a saved state parses back");
        assert_eq!(parsed, saved, "the JSON of a saved state round-trips");
    }
    let back = build(spec, w, Some(saved.clone()), now)
        .unwrap_or_else(|e| panic!("a {} refuses its own saved state: {e}\n{saved:?}", spec.kind.name()));
    assert_eq!(
        comparable(back.save()),
        comparable(saved),
        "a restored {} saves what it was restored from",
        spec.kind.name()
    );
}

/// A saved state as it must come back from a restore. An RTC latches its
/// time registers from its clock when it is built (unless SET froze them),
/// so a time a guest wrote without SET is not kept across a move: those
/// bytes are left out.
fn comparable(state: DeviceState) -> DeviceState {
    match state {
        DeviceState::Rtc(mut rtc) if rtc.cmos.get(0x0b).is_some_and(|b| b & 0x80 == 0) => {
            for r in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32] {
                rtc.cmos[r] = 0;
            }
            DeviceState::Rtc(rtc)
        }
        other => other,
    }
}

/// `[kind, ranges, pio base (2), pio len (2), mmio base (8), mmio len (4), script...]`.
fn fuzz_spec(data: &[u8]) {
    let Some((head, script)) = data.split_first_chunk::<18>() else { return };
    let kind = DeviceKind::parse(DeviceKind::NAMES[usize::from(head[0]) % DeviceKind::NAMES.len()], &[5, 12])
        .expect("every name parses");
    let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
    let pio = (head[1] & 1 != 0).then(|| (u16_at(2), u16_at(4)));
    let mmio_base = u64::from_le_bytes(head[6..14].try_into().unwrap_or_default());
    let mmio_len = u32::from_le_bytes(head[14..18].try_into().unwrap_or_default());
    let mmio = (head[1] & 2 != 0).then_some((mmio_base, mmio_len));
    let spec = DeviceSpec { id: 9, kind, pio, mmio, vm: Some(1), shard: None };
    let checked = spec.check();
    let confined = spec.confined();
    assert_eq!(confined.check(), Ok(()), "{spec:?} confined to {confined:?}");
    if checked.is_ok() {
        assert_eq!(confined, spec, "a valid spec is left as it is");
    }
    let t0 = Instant::now();
    let wiring = FuzzWiring::new(t0);
    let small = |s: &DeviceSpec| {
        s.kind != DeviceKind::RegFile
            || (s.mmio.is_none_or(|(_, len)| len <= BUILD_AT_MOST)
                && s.pio.is_none_or(|(_, len)| u32::from(len) <= BUILD_AT_MOST))
    };
    match &checked {
        // Refused before anything is allocated, whatever the size.
        Err(_) => assert!(build(&spec, &wiring, None, t0).is_err(), "build takes a spec its check refuses: {spec:?}"),
        Ok(()) if small(&spec) => {
            let d = build(&spec, &wiring, None, t0).unwrap_or_else(|e| panic!("a checked spec fails: {e}"));
            round_trip(d, &spec, script, &wiring, t0);
        }
        Ok(()) => {}
    }
    if small(&confined) {
        let d = fresh(&spec, &wiring, t0);
        round_trip(d, &confined, script, &wiring, t0);
    }
}
