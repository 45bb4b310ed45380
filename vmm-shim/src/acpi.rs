//! Minimal ACPI tables for Linux VMs with several vCPUs: kernels built
//! without MP-table parsing (Debian's cloud kernel) find their CPUs only in
//! the MADT. Hardware-reduced ACPI (no PM timer, no SCI, no legacy ports):
//!
//! ```text
//! RSDP (v2) → XSDT → FADT (rev 6, HW_REDUCED_ACPI) → DSDT (empty)
//!                  → MADT: one local APIC per vCPU, the I/O APIC, NMI on LINT1
//!                  → HPET (a VM whose I/O APIC and HPET are remote models)
//! ```
//!
//! The RSDP's address goes into the zero page (`acpi_rsdp_addr`), and it
//! also sits where a legacy scan finds it (0xe0000).

/// Where the tables go (the BIOS area the e820 map reserves is above).
pub const ACPI_START: u64 = 0xe_0000;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// A table: the 36-byte SDT header then `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 36];
    t[0..4].copy_from_slice(signature);
    t[4..8].copy_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t[8] = revision;
    t[10..16].copy_from_slice(b"DMFABR");
    t[16..24].copy_from_slice(b"DMFABRIC");
    t[24..28].copy_from_slice(&1u32.to_le_bytes()); // OEM revision
    t[28..32].copy_from_slice(b"DMFB"); // creator id
    t[32..36].copy_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The tables for `vcpus` processors, to be copied to [`ACPI_START`]; the
/// RSDP is at its start.
pub fn build(vcpus: u8) -> Vec<u8> {
    build_with(vcpus, false)
}

/// The HPET table's body (IA-PC HPET 1.0a, table 3): the event timer block
/// of dmfabric's HPET model at its PC address.
fn hpet_body() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x8086_a201u32.to_le_bytes()); // event timer block id: its capabilities' low dword
    b.extend_from_slice(&[0, 64, 0, 0]); // base address: system memory, 64 bits wide, offset 0
    b.extend_from_slice(&dmfabric_devices::platform::pc::HPET_MMIO.to_le_bytes());
    b.push(0); // HPET number
    b.extend_from_slice(&128u16.to_le_bytes()); // minimum clock ticks in periodic mode (as QEMU's)
    b.push(0); // page protection: none
    b
}

/// [`build`], with an HPET table when `hpet` (a VM with `irqchip = "remote"`).
pub fn build_with(vcpus: u8, hpet: bool) -> Vec<u8> {
    let base = ACPI_START;
    // Layout: RSDP (36, padded to 48), DSDT, FADT, MADT, XSDT.
    let rsdp_len = 48u64;
    let dsdt = sdt(b"DSDT", 2, &[]);
    let dsdt_at = base + rsdp_len;

    let mut fadt_body = vec![0u8; 276 - 36];
    // Offsets below are from the table's start (minus the 36-byte header).
    let put32 = |b: &mut Vec<u8>, off: usize, v: u32| b[off - 36..off - 32].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut Vec<u8>, off: usize, v: u64| b[off - 36..off - 28].copy_from_slice(&v.to_le_bytes());
    put32(&mut fadt_body, 40, dsdt_at as u32); // DSDT
    put32(&mut fadt_body, 112, 1 << 20); // Flags: HW_REDUCED_ACPI
    fadt_body[131 - 36] = 1; // FADT minor version (6.1)
    put64(&mut fadt_body, 140, dsdt_at); // X_DSDT
    let fadt = sdt(b"FACP", 6, &fadt_body);
    let fadt_at = dsdt_at + dsdt.len() as u64;

    let mut madt_body = Vec::new();
    madt_body.extend_from_slice(&0xfee0_0000u32.to_le_bytes()); // local APIC address
    madt_body.extend_from_slice(&0u32.to_le_bytes()); // flags: no 8259s to disable (PCAT_COMPAT 0)
    for id in 0..vcpus {
        madt_body.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]); // processor local APIC, enabled
    }
    let mut ioapic = [1u8, 12, vcpus, 0, 0, 0, 0, 0, 0, 0, 0, 0]; // I/O APIC, GSI base 0
    ioapic[4..8].copy_from_slice(&0xfec0_0000u32.to_le_bytes());
    madt_body.extend_from_slice(&ioapic);
    madt_body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]); // local APIC NMI: all, LINT1
    let madt = sdt(b"APIC", 4, &madt_body);
    let madt_at = fadt_at + fadt.len() as u64;

    let hpet_table = hpet.then(|| sdt(b"HPET", 1, &hpet_body()));
    let hpet_at = madt_at + madt.len() as u64;

    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_at.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_at.to_le_bytes());
    if hpet_table.is_some() {
        xsdt_body.extend_from_slice(&hpet_at.to_le_bytes());
    }
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);
    let xsdt_at = hpet_at + hpet_table.as_ref().map_or(0, |t| t.len() as u64);

    let mut rsdp = vec![0u8; 36];
    rsdp[0..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(b"DMFABR");
    rsdp[15] = 2; // revision: ACPI 2.0+
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt_at.to_le_bytes());
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut out = rsdp;
    out.resize(rsdp_len as usize, 0);
    for t in [Some(dsdt), Some(fadt), Some(madt), hpet_table, Some(xsdt)].into_iter().flatten() {
        out.extend_from_slice(&t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_check_out_and_list_every_cpu() {
        let t = build(3);
        assert_eq!(&t[0..8], b"RSD PTR ");
        assert_eq!((sum(&t[..20]), sum(&t[..36])), (0, 0), "RSDP checksums");
        let xsdt_at = u64::from_le_bytes(t[24..32].try_into().unwrap());
        let at = |a: u64| (a - ACPI_START) as usize;
        let table = |a: u64| {
            let off = at(a);
            let len = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()) as usize;
            &t[off..off + len]
        };
        let xsdt = table(xsdt_at);
        assert_eq!((&xsdt[0..4], sum(xsdt)), (&b"XSDT"[..], 0));
        let fadt = table(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let madt = table(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
        assert_eq!((&fadt[0..4], sum(fadt), fadt.len()), (&b"FACP"[..], 0, 276));
        let dsdt = table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!((&dsdt[0..4], sum(dsdt)), (&b"DSDT"[..], 0));
        assert_eq!((&madt[0..4], sum(madt)), (&b"APIC"[..], 0));
        // Three processor entries with APIC ids 0, 1, 2, then the I/O APIC (id 3).
        let entries = &madt[44..];
        let cpus: Vec<u8> = entries.chunks(8).take(3).map(|e| e[3]).collect();
        assert_eq!(cpus, vec![0, 1, 2]);
        assert_eq!((entries[24], entries[26]), (1, 3));
        assert!(ACPI_START as usize + t.len() < 0xf_0000, "below the reserved BIOS area");
    }

    #[test]
    fn a_vm_with_a_remote_hpet_gets_an_hpet_table() {
        let t = build_with(1, true);
        let xsdt_at = u64::from_le_bytes(t[24..32].try_into().unwrap());
        let at = |a: u64| (a - ACPI_START) as usize;
        let table = |a: u64| {
            let off = at(a);
            let len = u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()) as usize;
            &t[off..off + len]
        };
        let xsdt = table(xsdt_at);
        assert_eq!((xsdt.len(), sum(xsdt)), (36 + 3 * 8, 0));
        let hpet = table(u64::from_le_bytes(xsdt[52..60].try_into().unwrap()));
        assert_eq!((&hpet[0..4], hpet.len(), sum(hpet)), (&b"HPET"[..], 56, 0));
        assert_eq!(u32::from_le_bytes(hpet[36..40].try_into().unwrap()), 0x8086_a201);
        assert_eq!(u64::from_le_bytes(hpet[44..52].try_into().unwrap()), 0xfed0_0000);
        assert_eq!(build_with(2, false), build(2), "no HPET table otherwise");
    }
}
