//! Preallocated bursts of frames: the TX buffer of a poll loop.

use crate::{FRAME_CAP, MAX_BURST};

/// Up to [`MAX_BURST`] frames of at most [`FRAME_CAP`] bytes each, in one
/// allocation made up front. Filling and draining it never allocates.
pub struct FrameBatch {
    data: Box<[u8]>,
    lens: [u16; MAX_BURST],
    count: usize,
}

impl std::fmt::Debug for FrameBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBatch").field("count", &self.count).finish()
    }
}

impl Default for FrameBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBatch {
    pub fn new() -> Self {
        FrameBatch { data: vec![0u8; FRAME_CAP * MAX_BURST].into_boxed_slice(), lens: [0; MAX_BURST], count: 0 }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == MAX_BURST
    }

    /// Frames that still fit.
    pub fn room(&self) -> usize {
        MAX_BURST - self.count
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Append a frame written by `write` into a [`FRAME_CAP`]-byte buffer;
    /// `write` returns the length it used, or `None` to append nothing.
    /// Returns false (and calls nothing) when the batch is full.
    pub fn push_with<F>(&mut self, write: F) -> bool
    where
        F: FnOnce(&mut [u8]) -> Option<usize>,
    {
        if self.is_full() {
            return false;
        }
        let slot = &mut self.data[self.count * FRAME_CAP..(self.count + 1) * FRAME_CAP];
        if let Some(len) = write(slot) {
            self.lens[self.count] = len.min(FRAME_CAP) as u16;
            self.count += 1;
        }
        true
    }

    /// Append a copy of `frame` (cut to [`FRAME_CAP`]). False when full.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        self.push_with(|buf| {
            let n = frame.len().min(FRAME_CAP);
            buf[..n].copy_from_slice(&frame[..n]);
            Some(n)
        })
    }

    /// The `i`-th frame.
    pub fn get(&self, i: usize) -> &[u8] {
        let len = usize::from(self.lens[i]);
        &self.data[i * FRAME_CAP..i * FRAME_CAP + len]
    }

    /// Mutable access to the `i`-th frame (fault injection corrupts in place).
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let len = usize::from(self.lens[i]);
        &mut self.data[i * FRAME_CAP..i * FRAME_CAP + len]
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.count).map(move |i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_clear() {
        let mut b = FrameBatch::new();
        for i in 0..MAX_BURST {
            assert!(b.push(&[i as u8; 3]));
        }
        assert!(b.is_full());
        assert!(!b.push(&[9]));
        assert_eq!(b.get(5), &[5, 5, 5]);
        assert_eq!(b.iter().count(), MAX_BURST);
        b.clear();
        assert!(b.is_empty());
        assert!(b.push_with(|_| None));
        assert_eq!(b.len(), 0, "a writer returning None appends nothing");
    }

    #[test]
    fn oversized_frames_are_cut() {
        let mut b = FrameBatch::new();
        b.push(&vec![1u8; FRAME_CAP + 10]);
        assert_eq!(b.get(0).len(), FRAME_CAP);
    }
}
