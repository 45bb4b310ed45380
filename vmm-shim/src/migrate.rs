//! A VM in transit between client platforms: its memory, KVM's VM-wide
//! device state (PICs, I/O APIC, PIT, clock) and every vCPU's state, taken
//! while its vCPUs are held outside the guest with no access in flight.
//!
//! The encoding: a JSON header (ids, sizes, KVM state), then the memory's
//! non-zero 4 KiB pages as (page number, bytes) — a test guest's 4 MiB is
//! a few pages.

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
    #[error("The snapshot has {have} bytes of memory; this VM has {max}")]
    TooBig { have: usize, max: usize },
    #[error("The snapshot's page {0} is outside its memory")]
    PageOutOfRange(usize),
    #[error("The snapshot has {0} bytes after its last page")]
    Trailing(usize),
    #[error("The snapshot has no state for vCPU {0}")]
    MissingVcpu(u16),
}

const PAGE: usize = 4096;
const MAGIC: &[u8; 8] = b"DMFVM001";

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
        let mut out = Vec::with_capacity(16 + json.len() + pages.len() * (8 + PAGE));
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
    /// memory (the size the control panel gave it), every page inside it,
    /// nothing cut short or left over. Allocates no more than that.
    pub fn decode(bytes: &[u8], max_mem: usize) -> Result<VmSnapshot, SnapshotError> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::NoHeader);
        }
        let len = usize::try_from(u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default()))
            .map_err(|_| SnapshotError::Short("header"))?;
        let json = bytes.get(16..16usize.saturating_add(len)).ok_or(SnapshotError::Short("header"))?;
        let h: Header = serde_json::from_slice(json).map_err(|e| SnapshotError::Header(e.to_string()))?;
        if h.mem_bytes > max_mem {
            return Err(SnapshotError::TooBig { have: h.mem_bytes, max: max_mem });
        }
        let body = &bytes[16 + len..];
        let need = h.pages.checked_mul(8 + PAGE).ok_or(SnapshotError::Short("pages"))?;
        if body.len() < need {
            return Err(SnapshotError::Short("pages"));
        }
        if body.len() > need {
            return Err(SnapshotError::Trailing(body.len() - need));
        }
        let mut memory = vec![0u8; h.mem_bytes];
        for rec in body.chunks_exact(8 + PAGE) {
            let n = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default()) as usize;
            let start = n.checked_mul(PAGE).filter(|s| *s < memory.len()).ok_or(SnapshotError::PageOutOfRange(n))?;
            let end = (start + PAGE).min(memory.len());
            memory[start..end].copy_from_slice(&rec[8..8 + (end - start)]);
        }
        Ok(VmSnapshot { vm: h.vm, device: h.device, vcpus: h.vcpus, memory })
    }
}
