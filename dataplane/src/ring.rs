//! Lock-free single-producer single-consumer rings between cores.
//!
//! These are `rtrb`'s rings, used as they are rather than written again:
//! split [`Producer`] / [`Consumer`], head and tail on their own cache
//! lines, each side caching the other's index, chunked reads and writes
//! committed with one release store, and a failed push that hands the item
//! back. That is exactly the design CONVENTIONS.md asks for.

pub use rtrb::{Consumer, Producer, PushError, RingBuffer};

/// A ring of `capacity` slots, split into its two ends.
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    RingBuffer::new(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ring_hands_the_item_back() {
        let (mut p, mut c) = channel::<u32>(2);
        p.push(1).unwrap();
        p.push(2).unwrap();
        assert_eq!(p.push(3), Err(PushError::Full(3)));
        assert_eq!(c.pop(), Ok(1));
        p.push(3).unwrap();
        assert_eq!((c.pop(), c.pop()), (Ok(2), Ok(3)));
        assert!(c.pop().is_err());
    }

    #[test]
    fn crosses_threads_in_order() {
        let (mut p, mut c) = channel::<u64>(64);
        const N: u64 = 200_000;
        let t = std::thread::spawn(move || {
            for i in 0..N {
                let mut v = i;
                loop {
                    match p.push(v) {
                        Ok(()) => break,
                        Err(PushError::Full(back)) => {
                            v = back;
                            std::hint::spin_loop();
                        }
                    }
                }
            }
        });
        let mut next = 0;
        while next < N {
            if let Ok(v) = c.pop() {
                assert_eq!(v, next);
                next += 1;
            }
        }
        t.join().unwrap();
    }
}
