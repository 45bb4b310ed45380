//! Small rigs tests share: a scratch directory removed on drop, and an
//! echoing data-plane handler.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
use dmfabric_wire::ETHERTYPE_DMFABRIC;

/// A directory of a test's own under the system's temp dir
/// (`dmfabric-<name>-<pid>`), emptied when made and removed on drop.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("dmfabric-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot make {}: {e}", d.display()));
        TestDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends every dmfabric frame back with its MAC addresses swapped; ignores
/// frames of other EtherTypes.
#[derive(Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, _now: Instant) {
        if frame.len() < 14 || frame[12..14] != ETHERTYPE_DMFABRIC.to_be_bytes() {
            return;
        }
        tx.push_with(|buf| {
            buf[..frame.len()].copy_from_slice(frame);
            buf[..6].copy_from_slice(&frame[6..12]);
            buf[6..12].copy_from_slice(&frame[..6]);
            Some(frame.len())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_dir_is_made_empty_and_removed() {
        let path = {
            let d = TestDir::new("rigs-test");
            std::fs::write(d.join("f"), b"x").unwrap();
            assert!(d.join("f").exists());
            d.path().to_path_buf()
        };
        assert!(!path.exists());
    }

    #[test]
    fn echo_swaps_addresses_and_ignores_other_ethertypes() {
        let mut frame = vec![0u8; 60];
        frame[..6].copy_from_slice(&[1; 6]);
        frame[6..12].copy_from_slice(&[2; 6]);
        frame[12..14].copy_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
        frame[20] = 0x77;
        let mut tx = FrameBatch::new();
        Echo.on_frame(&frame, &mut tx, Instant::now());
        let out: Vec<Vec<u8>> = tx.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(out.len(), 1);
        assert_eq!((&out[0][..6], &out[0][6..12], out[0][20]), (&[2u8; 6][..], &[1u8; 6][..], 0x77));
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut tx = FrameBatch::new();
        Echo.on_frame(&frame, &mut tx, Instant::now());
        assert_eq!(tx.iter().count(), 0);
    }
}
