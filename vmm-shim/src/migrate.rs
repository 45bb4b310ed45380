//! A VM in transit between client platforms: its memory, KVM's VM-wide
//! device state (PICs, I/O APIC, PIT, clock) and every vCPU's state, taken
//! while its vCPUs are held outside the guest with no access in flight.
//!
//! The encoding: a JSON header (ids, sizes, KVM state), then the memory's
//! non-zero 4 KiB pages as (page number, bytes) — a test guest's 4 MiB is
//! a few pages.

use crate::kvm::{VcpuState, VmDeviceState};

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

    pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, String> {
        let bad = |what: &str| format!("not a VM snapshot: {what}");
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(bad("no DMFVM001 header"));
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let json = bytes.get(16..16usize.saturating_add(len)).ok_or_else(|| bad("header cut short"))?;
        let h: Header = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
        if h.mem_bytes > 64 << 30 {
            return Err(bad("more than 64 GiB of memory"));
        }
        let mut memory = vec![0u8; h.mem_bytes];
        let mut at = 16 + len;
        for _ in 0..h.pages {
            let rec = bytes.get(at..at + 8 + PAGE).ok_or_else(|| bad("pages cut short"))?;
            let n = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            let start = n.checked_mul(PAGE).filter(|s| *s < memory.len()).ok_or_else(|| bad("page out of range"))?;
            let end = (start + PAGE).min(memory.len());
            memory[start..end].copy_from_slice(&rec[8..8 + (end - start)]);
            at += 8 + PAGE;
        }
        Ok(VmSnapshot { vm: h.vm, device: h.device, vcpus: h.vcpus, memory })
    }
}
