//! Carrying out a device model's DMA against its VM's memory: the one
//! place that turns a [`DmaRequest`] into a copy in or out of guest RAM,
//! for models kept in this process ([`crate::local`]) and for the DMA a
//! server asks of the client platform that runs the VM.
//!
//! A request comes from a model, and through it from whatever the guest
//! wrote into its rings: any address and any length. Nothing outside the
//! VM's RAM is touched and nothing here panics; such a request is
//! [`DmaResult::Refused`], and the model fails the I/O that needed it.

use dmfabric_devices::dma::MAX_DMA_LEN;
use dmfabric_devices::{DmaDevice, DmaOp, DmaRequest, DmaResult};

use crate::kvm::GuestRam;

/// Carry out `req` against `ram`: a read's bytes, a write done, or
/// `Refused` when the range is not all RAM or is longer than
/// [`MAX_DMA_LEN`] (nothing is read or written then).
pub fn serve(ram: &GuestRam, req: &DmaRequest) -> DmaResult {
    match &req.op {
        DmaOp::Read { addr, len } => {
            // Checked before allocating: the length is the guest's choice.
            if *len > MAX_DMA_LEN || !ram.contains(*addr, u64::from(*len)) {
                return DmaResult::Refused;
            }
            let mut buf = vec![0u8; *len as usize];
            if ram.read(*addr, &mut buf) {
                DmaResult::Read(buf)
            } else {
                DmaResult::Refused
            }
        }
        DmaOp::Write { addr, data } => {
            if data.len() > MAX_DMA_LEN as usize || !ram.write(*addr, data) {
                return DmaResult::Refused;
            }
            DmaResult::Written
        }
    }
}

/// Most rounds of [`pump`]: a model that keeps asking for more is polled
/// again later by whoever polls it while it is busy, so no model can hold
/// the thread that serves it for ever.
pub const MAX_PUMP_ROUNDS: usize = 256;

/// Move a model kept in this process on: poll it and serve each request it
/// issues at once against `ram` (no RAM: every request is refused), again
/// until it issues nothing more or [`MAX_PUMP_ROUNDS`] rounds passed.
/// `scratch` is reused between calls to save allocations. Returns the
/// requests served.
pub fn pump(dev: &mut dyn DmaDevice, ram: Option<&GuestRam>, scratch: &mut Vec<DmaRequest>) -> usize {
    let mut served = 0;
    for _ in 0..MAX_PUMP_ROUNDS {
        scratch.clear();
        dev.poll(scratch);
        if scratch.is_empty() {
            break;
        }
        for req in scratch.drain(..) {
            let result = ram.map_or(DmaResult::Refused, |ram| serve(ram, &req));
            dev.dma_done(req.tag, result);
            served += 1;
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(tag: u64, addr: u64, len: u32) -> DmaRequest {
        DmaRequest { tag, op: DmaOp::Read { addr, len } }
    }

    fn write(tag: u64, addr: u64, data: &[u8]) -> DmaRequest {
        DmaRequest { tag, op: DmaOp::Write { addr, data: data.to_vec() } }
    }

    #[test]
    fn requests_inside_ram_are_carried_out() {
        let ram = GuestRam::anonymous(0x4000).unwrap();
        assert_eq!(serve(&ram, &write(1, 0x3ffc, &[1, 2, 3, 4])), DmaResult::Written);
        assert_eq!(serve(&ram, &read(2, 0x3ffc, 4)), DmaResult::Read(vec![1, 2, 3, 4]));
        assert_eq!(serve(&ram, &read(3, 0x3ffe, 0)), DmaResult::Read(Vec::new()));
        assert_eq!(serve(&ram, &write(4, 0x4000, &[])), DmaResult::Written);
    }

    #[test]
    fn requests_outside_ram_or_too_long_are_refused_and_change_nothing() {
        let ram = GuestRam::anonymous(2 * MAX_DMA_LEN as usize).unwrap();
        let end = ram.size();
        assert_eq!(serve(&ram, &read(1, end - 3, 4)), DmaResult::Refused);
        assert_eq!(serve(&ram, &read(1, end, 1)), DmaResult::Refused);
        assert_eq!(serve(&ram, &read(1, u64::MAX, 2)), DmaResult::Refused);
        assert_eq!(serve(&ram, &read(1, u64::MAX - 1, u32::MAX)), DmaResult::Refused);
        assert_eq!(serve(&ram, &write(1, end - 1, &[9, 9])), DmaResult::Refused);
        assert_eq!(serve(&ram, &write(1, u64::MAX, &[9])), DmaResult::Refused);
        // The largest request is taken; one byte more is not, even in RAM.
        assert_eq!(serve(&ram, &read(1, 0, MAX_DMA_LEN)), DmaResult::Read(vec![0; MAX_DMA_LEN as usize]));
        assert_eq!(serve(&ram, &read(1, 0, MAX_DMA_LEN + 1)), DmaResult::Refused);
        let big = vec![7u8; MAX_DMA_LEN as usize + 1];
        assert_eq!(serve(&ram, &write(1, 0, &big)), DmaResult::Refused);
        let mut back = [0u8; 2];
        assert!(ram.read(end - 2, &mut back));
        assert_eq!(back, [0, 0]);
        assert!(ram.read(0, &mut back));
        assert_eq!(back, [0, 0]);
    }

    /// A model that copies `len` bytes from `from` to `to` in guest memory
    /// with a read then a write, `times` times over, and remembers answers.
    struct Copier {
        from: u64,
        to: u64,
        len: u32,
        times: usize,
        next: Option<DmaRequest>,
        answers: Vec<(u64, DmaResult)>,
    }

    impl DmaDevice for Copier {
        fn poll(&mut self, out: &mut Vec<DmaRequest>) {
            if let Some(r) = self.next.take() {
                out.push(r);
            } else if self.times > 0 {
                self.times -= 1;
                out.push(read(self.times as u64, self.from, self.len));
            }
        }
        fn busy(&self) -> bool {
            self.next.is_some() || self.times > 0
        }
        fn dma_done(&mut self, tag: u64, result: DmaResult) {
            if let DmaResult::Read(data) = &result {
                self.next = Some(write(tag | 1 << 63, self.to, data));
            }
            self.answers.push((tag, result));
        }
    }

    #[test]
    fn pump_serves_until_the_model_issues_nothing_more() {
        let ram = GuestRam::anonymous(0x1000).unwrap();
        assert!(ram.write(0x10, b"abcd"));
        let mut dev = Copier { from: 0x10, to: 0x100, len: 4, times: 2, next: None, answers: Vec::new() };
        let mut scratch = Vec::new();
        assert_eq!(pump(&mut dev, Some(&ram), &mut scratch), 4);
        assert!(!dev.busy());
        let mut got = [0u8; 4];
        assert!(ram.read(0x100, &mut got));
        assert_eq!(&got, b"abcd");
        assert_eq!(dev.answers.len(), 4);
        assert_eq!(pump(&mut dev, Some(&ram), &mut scratch), 0);
    }

    #[test]
    fn pump_refuses_everything_without_ram_and_stops_a_model_that_never_ends() {
        let mut dev = Copier { from: 0, to: 0, len: 4, times: 3, next: None, answers: Vec::new() };
        assert_eq!(pump(&mut dev, None, &mut Vec::new()), 3);
        assert!(dev.answers.iter().all(|(_, r)| *r == DmaResult::Refused));
        let ram = GuestRam::anonymous(0x1000).unwrap();
        let mut endless = Copier { from: 0, to: 8, len: 8, times: usize::MAX, next: None, answers: Vec::new() };
        assert_eq!(pump(&mut endless, Some(&ram), &mut Vec::new()), MAX_PUMP_ROUNDS);
        assert!(endless.busy());
    }
}
