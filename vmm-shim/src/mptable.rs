//! An Intel MultiProcessor Specification 1.4 table, so that a Linux guest
//! with several vCPUs finds its processors, the I/O APIC and how the ISA
//! interrupts reach it (Firecracker's `mptable.rs` is the model).
//!
//! Layout: the floating pointer at [`MPTABLE_START`] (the start of the EBDA,
//! which the e820 map reserves and Linux scans), the configuration table
//! right after it: one processor entry per vCPU (APIC ids 0..n, vCPU 0 the
//! BSP), an ISA bus, the I/O APIC (id n, at 0xfec00000), ISA IRQs 0–15 to
//! I/O APIC pins 0–15 (KVM's default routing), ExtINT on LINT0, NMI on LINT1.

/// Where the floating pointer goes (the EBDA, reserved in the e820 map).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// The local APIC's address.
const LAPIC: u32 = 0xfee0_0000;
/// The I/O APIC's address.
const IOAPIC: u32 = 0xfec0_0000;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The table for `vcpus` processors, to be copied to [`MPTABLE_START`].
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..vcpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = 0x14; // local APIC version
        e[3] = 0x01 | if id == 0 { 0x02 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    let mut io = [2u8, ioapic_id, 0x11, 1, 0, 0, 0, 0]; // I/O APIC, enabled
    io[4..8].copy_from_slice(&IOAPIC.to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    for irq in 0..16u8 {
        // I/O interrupt: INT, conforming polarity and trigger, bus 0 IRQ → pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts to every local APIC: ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_at = MPTABLE_START as u32 + 16;
    let mut header = [0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    header[4..6].copy_from_slice(&length.to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"DMFABRIC");
    header[16..28].copy_from_slice(b"dmfabric-vm ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&LAPIC.to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut pointer = [0u8; 16];
    pointer[0..4].copy_from_slice(b"_MP_");
    pointer[4..8].copy_from_slice(&table_at.to_le_bytes());
    pointer[8] = 1; // length in 16-byte units
    pointer[9] = 4; // spec revision
    pointer[10] = checksum(&pointer);
    let mut out = pointer.to_vec();
    out.extend_from_slice(&table);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_adds_up() {
        let t = build(4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "pointer checksum");
        let at = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(u64::from(at), MPTABLE_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // Processors: APIC ids 0..4, only the first is the BSP.
        let cpus: Vec<(u8, u8)> = (0..4).map(|i| (table[44 + i * 20 + 1], table[44 + i * 20 + 3])).collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        // It fits below the 640 KiB line.
        assert!(MPTABLE_START as usize + t.len() <= 0xa_0000);
    }
}
