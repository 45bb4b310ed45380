//! Parse arbitrary bytes; whatever parses must emit and parse back to itself.
#![no_main]

use dmfabric_wire::FrameRepr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(repr) = FrameRepr::parse_bytes(data) {
        let mut out = vec![0u8; repr.buffer_len()];
        let n = repr.emit(&mut out).expect("emit of a parsed frame");
        assert_eq!(n, out.len());
        assert_eq!(FrameRepr::parse_bytes(&out).expect("reparse"), repr);
    }
});
