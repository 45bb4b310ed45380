//! A VM in transit between client platforms: its memory, KVM's VM-wide
//! device state (PICs, I/O APIC, PIT, clock) and every vCPU's state, taken
//! while its vCPUs are held outside the guest with no access in flight.
//!
//! The encoding: a JSON header (ids, sizes, KVM state), then the memory's
//! non-zero 4 KiB pages as (page number, bytes) — a test guest's 4 MiB is
//! a few pages. A snapshot comes from the store: decoding checks every size
//! and page number before it allocates the memory, which is never more than
//! the VM may have ([`MAX_VM_MEM`] at most), and only the pages the snapshot
//! carries are written (the rest stays untouched zeros).

use crate::kvm::{VcpuState, VmDeviceState};

/// Why bytes are not a usable VM snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("Not a VM snapshot: no DMFVM001 header")]
    NoHeader,
    #[error("The snapshot is cut short ({0})")]
    Short(&'static str),
    #[error("The snapshot's header is unreadable: {0}")]
    Header(String),
    #[error(
        "The snapshot has {have} bytes of memory, more than the {max} this VM may have: \
         it is another VM's, or the VM's memory_mib is too small for it"
    )]
    TooBig { have: usize, max: usize },
    #[error("The snapshot's memory ({0} bytes) is not a whole number of 4 KiB pages")]
    Unaligned(usize),
    #[error("The snapshot lists {pages} pages for {max} pages of memory")]
    TooManyPages { pages: usize, max: usize },
    #[error("The snapshot's page {0} is outside its memory")]
    PageOutOfRange(u64),
    #[error("The snapshot's page {0} is out of order (pages come once each, in increasing order)")]
    PageOutOfOrder(u64),
    #[error("The snapshot has {0} bytes after its last page")]
    Trailing(usize),
    #[error("The snapshot has no state for vCPU {0}")]
    MissingVcpu(u16),
}

const PAGE: usize = 4096;
/// A page in the encoding: its number, then its bytes.
const PAGE_RECORD: usize = 8 + PAGE;
const MAGIC: &[u8; 8] = b"DMFVM001";
/// The most memory a snapshot may carry, whatever the caller allows: 64 GiB,
/// the most the control panel gives a VM (its `MAX_MEMORY_MIB`; migrations
/// go through it). Decoding allocates the memory, so this bounds what a
/// header can make a client allocate even when the caller's limit comes from
/// an unchecked record.
pub const MAX_VM_MEM: usize = 64 << 30;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Header {
    vm: u32,
    mem_bytes: usize,
    device: VmDeviceState,
    vcpus: Vec<VcpuState>,
    pages: usize,
}

/// A VM's state, ready to start on another client platform.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    pub vm: u32,
    pub device: VmDeviceState,
    pub vcpus: Vec<VcpuState>,
    pub memory: Vec<u8>,
}

impl VmSnapshot {
    pub fn encode(&self) -> Vec<u8> {
        let pages: Vec<(usize, &[u8])> =
            self.memory.chunks(PAGE).enumerate().filter(|(_, p)| p.iter().any(|&b| b != 0)).collect();
        let header = Header {
            vm: self.vm,
            mem_bytes: self.memory.len(),
            device: self.device.clone(),
            vcpus: self.vcpus.clone(),
            pages: pages.len(),
        };
        let json = serde_json::to_vec(&header).expect("snapshot headers serialise");
        let mut out = Vec::with_capacity(16 + json.len() + pages.len() * PAGE_RECORD);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for (n, bytes) in pages {
            out.extend_from_slice(&(n as u64).to_le_bytes());
            let mut page = [0u8; PAGE];
            page[..bytes.len()].copy_from_slice(bytes);
            out.extend_from_slice(&page);
        }
        out
    }

    /// The snapshot in `bytes`, checked: a VM of at most `max_mem` bytes of
    /// memory (the size the control panel gave it) and at most
    /// [`MAX_VM_MEM`], every page inside it and listed once in order,
    /// nothing cut short or left over. Everything is checked before the
    /// memory is allocated, and no more than that is allocated.
    pub fn decode(bytes: &[u8], max_mem: usize) -> Result<VmSnapshot, SnapshotError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(SnapshotError::NoHeader)?;
        let (len, rest) = rest.split_first_chunk::<8>().ok_or(SnapshotError::NoHeader)?;
        let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| SnapshotError::Short("header"))?;
        if len > rest.len() {
            return Err(SnapshotError::Short("header"));
        }
        let (json, body) = rest.split_at(len);
        let h: Header = serde_json::from_slice(json).map_err(|e| SnapshotError::Header(e.to_string()))?;
        let max = max_mem.min(MAX_VM_MEM);
        if h.mem_bytes > max {
            return Err(SnapshotError::TooBig { have: h.mem_bytes, max });
        }
        if !h.mem_bytes.is_multiple_of(PAGE) {
            return Err(SnapshotError::Unaligned(h.mem_bytes));
        }
        let mem_pages = h.mem_bytes / PAGE;
        if h.pages > mem_pages {
            return Err(SnapshotError::TooManyPages { pages: h.pages, max: mem_pages });
        }
        // At most MAX_VM_MEM / PAGE pages: no overflow.
        let need = h.pages * PAGE_RECORD;
        if body.len() < need {
            return Err(SnapshotError::Short("pages"));
        }
        if body.len() > need {
            return Err(SnapshotError::Trailing(body.len() - need));
        }
        let mut next = 0u64;
        for rec in body.chunks_exact(PAGE_RECORD) {
            let n = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
            if n >= mem_pages as u64 {
                return Err(SnapshotError::PageOutOfRange(n));
            }
            if n < next {
                return Err(SnapshotError::PageOutOfOrder(n));
            }
            next = n + 1;
        }
        let mut memory = vec![0u8; h.mem_bytes];
        for rec in body.chunks_exact(PAGE_RECORD) {
            // Checked above: a page inside the memory.
            let start = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default()) as usize * PAGE;
            memory[start..start + PAGE].copy_from_slice(&rec[8..]);
        }
        Ok(VmSnapshot { vm: h.vm, device: h.device, vcpus: h.vcpus, memory })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header of a snapshot of VM 7 with `mem` bytes and `pages` pages
    /// (KVM's state structs read as zeros from empty arrays).
    fn header(mem: usize, pages: usize) -> Vec<u8> {
        let device = r#"{"pic_master":[],"pic_slave":[],"ioapic":[],"pit":[],"clock":[]}"#;
        let json = format!(r#"{{"vm":7,"mem_bytes":{mem},"device":{device},"vcpus":[],"pages":{pages}}}"#);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(json.as_bytes());
        out
    }

    fn page(n: u64, fill: u8) -> Vec<u8> {
        let mut out = n.to_le_bytes().to_vec();
        out.extend_from_slice(&[fill; PAGE]);
        out
    }

    fn snapshot(mem: usize, pages: &[(u64, u8)]) -> Vec<u8> {
        let mut out = header(mem, pages.len());
        for &(n, fill) in pages {
            out.extend_from_slice(&page(n, fill));
        }
        out
    }

    #[test]
    fn a_snapshot_round_trips_with_only_its_non_zero_pages() {
        let bytes = snapshot(4 * PAGE, &[(1, 0xaa), (3, 0x55)]);
        let snap = VmSnapshot::decode(&bytes, 1 << 20).unwrap();
        assert_eq!((snap.vm, snap.memory.len()), (7, 4 * PAGE));
        assert_eq!((snap.memory[PAGE], snap.memory[3 * PAGE + 17], snap.memory[0]), (0xaa, 0x55, 0));
        let again = snap.encode();
        assert_eq!(VmSnapshot::decode(&again, 4 * PAGE).unwrap().memory, snap.memory);
        assert_eq!(VmSnapshot::decode(&again, 4 * PAGE).unwrap().encode(), again, "one encoding");
    }

    #[test]
    fn a_header_asking_for_more_memory_than_any_vm_has_is_refused_before_allocating() {
        // A header of 128 GiB and a VM record (unchecked) that would allow it.
        let err = VmSnapshot::decode(&header(128 << 30, 0), 128 << 30).unwrap_err();
        assert_eq!(err, SnapshotError::TooBig { have: 128 << 30, max: MAX_VM_MEM });
        assert!(err.to_string().contains("memory_mib"), "{err}");
        let err = VmSnapshot::decode(&header(8 << 20, 0), 4 << 20).unwrap_err();
        assert_eq!(err, SnapshotError::TooBig { have: 8 << 20, max: 4 << 20 });
        let err = VmSnapshot::decode(&header(usize::MAX, 0), usize::MAX).unwrap_err();
        assert!(matches!(err, SnapshotError::TooBig { .. }), "{err}");
    }

    #[test]
    fn page_lists_that_do_not_fit_the_memory_are_refused() {
        let mem = 4 * PAGE;
        let cases = [
            (header(mem - 1, 0), SnapshotError::Unaligned(mem - 1)),
            (header(mem, 5), SnapshotError::TooManyPages { pages: 5, max: 4 }),
            (header(mem, usize::MAX), SnapshotError::TooManyPages { pages: usize::MAX, max: 4 }),
            (header(mem, 2), SnapshotError::Short("pages")),
            (snapshot(mem, &[(4, 1)]), SnapshotError::PageOutOfRange(4)),
            (snapshot(mem, &[(u64::MAX, 1)]), SnapshotError::PageOutOfRange(u64::MAX)),
            (snapshot(mem, &[(2, 1), (2, 1)]), SnapshotError::PageOutOfOrder(2)),
            (snapshot(mem, &[(2, 1), (1, 1)]), SnapshotError::PageOutOfOrder(1)),
            ([snapshot(mem, &[(0, 1)]), vec![0; 3]].concat(), SnapshotError::Trailing(3)),
        ];
        for (bytes, want) in cases {
            assert_eq!(VmSnapshot::decode(&bytes, mem).unwrap_err(), want);
        }
    }

    #[test]
    fn a_header_that_is_missing_cut_or_unreadable_is_refused() {
        let mut long = header(PAGE, 0);
        long[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&3u64.to_le_bytes());
        garbage.extend_from_slice(b"{x}");
        for (bytes, want) in [
            (&b""[..], "no DMFVM001 header"),
            (&b"DMFVM001\x01"[..], "no DMFVM001 header"),
            (&b"DMFVM002\0\0\0\0\0\0\0\0"[..], "no DMFVM001 header"),
            (&long[..], "cut short (header)"),
            (&header(PAGE, 0)[..40], "cut short (header)"),
            (&garbage[..], "header is unreadable"),
        ] {
            let err = VmSnapshot::decode(bytes, 1 << 20).unwrap_err().to_string();
            assert!(err.contains(want), "{err} (want {want})");
        }
    }
}
