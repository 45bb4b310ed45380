//! A VM snapshot as a client takes it from the store to run a migrated VM
//! (`VmSnapshot::decode` with the VM's memory size). Whatever decodes holds
//! no more memory than allowed, and encodes to bytes that decode to the
//! same memory and encode the same again.
#![no_main]

use dmfabric_vmm_shim::migrate::VmSnapshot;
use libfuzzer_sys::fuzz_target;

/// The VM's memory, as the control panel gives it (small, to keep runs fast:
/// the checks do not depend on the size).
const MAX_MEM: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = VmSnapshot::decode(data, MAX_MEM) else { return };
    assert!(snap.memory.len() <= MAX_MEM, "{} bytes of memory for a VM of {MAX_MEM}", snap.memory.len());
    let bytes = snap.encode();
    let again = VmSnapshot::decode(&bytes, MAX_MEM).unwrap_or_else(|e| panic!("its own encoding is refused: {e}"));
    assert_eq!(again.memory, snap.memory, "memory survives encode + decode");
    assert_eq!((again.vm, again.vcpus.len()), (snap.vm, snap.vcpus.len()));
    assert_eq!(again.encode(), bytes, "one encoding");
    // A smaller VM than the snapshot's is refused, not truncated.
    if !snap.memory.is_empty() {
        assert!(VmSnapshot::decode(data, snap.memory.len() - 1).is_err());
    }
});
