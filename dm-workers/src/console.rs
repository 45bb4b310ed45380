//! Consoles at the server (the design centralises them): each VM's UART
//! sends its bytes into a lock-free queue that the console service drains
//! into the VM's console log and to whoever is attached; what attached
//! terminals type goes the other way, into the UART's receive FIFO.
//!
//! The models run on worker cores; the service is an ordinary thread. They
//! meet only in the bounded queues of a [`Console`], so a slow terminal or
//! disk never holds up a worker: output that finds the queue full is
//! dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::uart::{ByteSink, ByteSource};

/// Bytes of output a console holds for the service.
pub const OUTPUT_QUEUE: usize = 1 << 16;
/// Bytes typed and not yet taken by the UART.
pub const INPUT_QUEUE: usize = 1 << 12;

/// One console: a UART's output and input.
#[derive(Debug)]
pub struct Console {
    /// The VM the UART belongs to (its console is named after it).
    pub vm: u32,
    pub device: u32,
    output: ArrayQueue<u8>,
    input: ArrayQueue<u8>,
    output_dropped: AtomicU64,
    input_dropped: AtomicU64,
}

impl Console {
    fn new(vm: u32, device: u32) -> Console {
        Console {
            vm,
            device,
            output: ArrayQueue::new(OUTPUT_QUEUE),
            input: ArrayQueue::new(INPUT_QUEUE),
            output_dropped: AtomicU64::new(0),
            input_dropped: AtomicU64::new(0),
        }
    }

    /// Take what the UART sent.
    pub fn drain_output(&self, into: &mut Vec<u8>) {
        while let Some(b) = self.output.pop() {
            into.push(b);
        }
    }

    /// Queue typed bytes for the UART; returns how many fitted.
    pub fn type_in(&self, bytes: &[u8]) -> usize {
        let mut n = 0;
        for &b in bytes {
            if self.input.push(b).is_err() {
                self.input_dropped.fetch_add((bytes.len() - n) as u64, Ordering::Relaxed);
                break;
            }
            n += 1;
        }
        n
    }

    pub fn output_dropped(&self) -> u64 {
        self.output_dropped.load(Ordering::Relaxed)
    }

    pub fn input_dropped(&self) -> u64 {
        self.input_dropped.load(Ordering::Relaxed)
    }
}

/// The consoles of a server, one per UART.
#[derive(Debug, Default)]
pub struct Consoles {
    list: Vec<Arc<Console>>,
}

impl Consoles {
    /// Add the console of UART `device` of `vm`.
    pub fn add(&mut self, vm: u32, device: u32) -> Arc<Console> {
        let c = Arc::new(Console::new(vm, device));
        self.list.push(c.clone());
        c
    }

    /// The console of `vm` (its first UART).
    pub fn of_vm(&self, vm: u32) -> Option<&Arc<Console>> {
        self.list.iter().find(|c| c.vm == vm)
    }

    pub fn all(&self) -> &[Arc<Console>] {
        &self.list
    }
}

/// The UART's side of its console: output.
#[derive(Debug, Clone)]
pub struct ConsoleOut(pub Arc<Console>);

impl ByteSink for ConsoleOut {
    fn put(&mut self, byte: u8) {
        if self.0.output.push(byte).is_err() {
            self.0.output_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The UART's side of its console: input.
#[derive(Debug, Clone)]
pub struct ConsoleIn(pub Arc<Console>);

impl ByteSource for ConsoleIn {
    fn take(&mut self, max: usize, into: &mut dyn FnMut(u8)) {
        for _ in 0..max {
            match self.0.input.pop() {
                Some(b) => into(b),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_both_ways_and_overflow_is_counted() {
        let mut consoles = Consoles::default();
        let c = consoles.add(7, 3);
        let (mut out, mut inp) = (ConsoleOut(c.clone()), ConsoleIn(c.clone()));
        for b in b"boot\n" {
            out.put(*b);
        }
        let mut got = Vec::new();
        consoles.of_vm(7).unwrap().drain_output(&mut got);
        assert_eq!(got, b"boot\n");
        assert_eq!(c.type_in(b"ls\n"), 3);
        let mut typed = Vec::new();
        inp.take(2, &mut |b| typed.push(b));
        assert_eq!(typed, b"ls", "no more than the FIFO has room for");
        for _ in 0..OUTPUT_QUEUE + 5 {
            out.put(b'x');
        }
        assert_eq!(c.output_dropped(), 5);
        assert!(consoles.of_vm(8).is_none());
    }
}
