//! Core selection and affinity: which core runs which role.
//!
//! Owns: reading the cores this process may run on, parsing core lists,
//! choosing a thread layout from the machine or from flags, and pinning
//! the calling thread. Does not own the threads themselves.
//!
//! Two layouts (DESIGN.md, "Threads and cores"):
//! - **run-to-completion** (small hosts): one core receives, runs the
//!   device model and transmits;
//! - **split** (large hosts): data-plane cores each own a transport queue,
//!   worker cores each own a shard of device models, joined by SPSC rings.

#![forbid(unsafe_code)]

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    #[error("Bad core list `{0}`: expected numbers and ranges such as 0,2-3")]
    BadCoreList(String),
    #[error("Core {0} is not available to this process (allowed: {1})")]
    CoreNotAllowed(usize, String),
    #[error("The split layout needs {need} cores ({dataplane} data-plane + {workers} workers) but only {have} are available: use --layout rtc or fewer workers")]
    TooFewCores { need: usize, have: usize, dataplane: usize, workers: usize },
    #[error("Cannot pin to core {0}: sched_setaffinity refused")]
    PinFailed(usize),
    #[error("Unknown layout `{0}`: expected auto, rtc, or split:<data-plane cores>:<workers>")]
    BadLayout(String),
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutSpec {
    /// Pick from the number of cores.
    Auto,
    RunToCompletion,
    Split {
        dataplane: usize,
        workers: usize,
    },
}

impl std::str::FromStr for LayoutSpec {
    type Err = PinError;

    fn from_str(s: &str) -> Result<Self, PinError> {
        let bad = || PinError::BadLayout(s.to_string());
        match s {
            "auto" => Ok(LayoutSpec::Auto),
            "rtc" | "run-to-completion" => Ok(LayoutSpec::RunToCompletion),
            _ => {
                let rest = s.strip_prefix("split").ok_or_else(bad)?;
                if rest.is_empty() {
                    return Ok(LayoutSpec::Split { dataplane: 1, workers: 1 });
                }
                let mut parts = rest.strip_prefix(':').ok_or_else(bad)?.split(':');
                let dataplane = parts.next().and_then(|p| p.parse().ok()).filter(|&n| n > 0).ok_or_else(bad)?;
                let workers = parts.next().and_then(|p| p.parse().ok()).filter(|&n| n > 0).ok_or_else(bad)?;
                if parts.next().is_some() {
                    return Err(bad());
                }
                Ok(LayoutSpec::Split { dataplane, workers })
            }
        }
    }
}

/// The cores each role runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    RunToCompletion { core: usize },
    Split { dataplane: Vec<usize>, workers: Vec<usize> },
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::RunToCompletion { core } => write!(f, "run-to-completion on core {core}"),
            Layout::Split { dataplane, workers } => {
                write!(f, "split: data-plane cores {dataplane:?}, worker cores {workers:?}")
            }
        }
    }
}

/// Cores this process may be pinned to, ascending: the online CPUs,
/// narrowed by the cgroup's cpuset where there is one.
///
/// Not the calling thread's affinity mask: once a thread is pinned (or a
/// child process inherits a pinned thread's mask) that mask says only where
/// it runs now, not where it may go.
pub fn available_cores() -> Vec<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| parse_core_list(s.trim()).ok());
    let mut cores = read("/sys/devices/system/cpu/online")
        .unwrap_or_else(|| core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect());
    if let Some(allowed) = read("/sys/fs/cgroup/cpuset.cpus.effective") {
        cores.retain(|c| allowed.contains(c));
    }
    if cores.is_empty() {
        cores.push(0);
    }
    cores
}

/// Parse `0,2-3` into `[0, 2, 3]`.
pub fn parse_core_list(s: &str) -> Result<Vec<usize>, PinError> {
    let bad = || PinError::BadCoreList(s.to_string());
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Choose a layout for a server from `spec` and the `cores` it may use.
///
/// Auto picks run-to-completion below four cores (on the last core, leaving
/// core 0 to the system and the client), and otherwise one data-plane core
/// per four cores with the rest as workers.
pub fn choose(spec: LayoutSpec, cores: &[usize]) -> Result<Layout, PinError> {
    let have = cores.len();
    let last = *cores.last().unwrap_or(&0);
    match spec {
        LayoutSpec::RunToCompletion => Ok(Layout::RunToCompletion { core: last }),
        LayoutSpec::Auto if have < 4 => Ok(Layout::RunToCompletion { core: last }),
        LayoutSpec::Auto => {
            let dataplane = (have / 4).max(1);
            split(cores, dataplane, have - dataplane)
        }
        LayoutSpec::Split { dataplane, workers } => split(cores, dataplane, workers),
    }
}

fn split(cores: &[usize], dataplane: usize, workers: usize) -> Result<Layout, PinError> {
    let need = dataplane + workers;
    if cores.len() < need {
        return Err(PinError::TooFewCores { need, have: cores.len(), dataplane, workers });
    }
    // Take the highest cores: core 0 usually carries the system's interrupts.
    let used = &cores[cores.len() - need..];
    Ok(Layout::Split { dataplane: used[..dataplane].to_vec(), workers: used[dataplane..].to_vec() })
}

/// Like [`choose`], but on a machine with too few cores for the asked
/// split, share cores round-robin instead of failing (for running the
/// multi-core layout on a small host to test or measure it).
pub fn choose_shared(spec: LayoutSpec, cores: &[usize]) -> Result<Layout, PinError> {
    match (choose(spec, cores), spec) {
        (Err(PinError::TooFewCores { .. }), LayoutSpec::Split { dataplane, workers }) => {
            let pick = |i: usize| cores[cores.len() - 1 - (i % cores.len())];
            Ok(Layout::Split {
                dataplane: (0..dataplane).map(pick).collect(),
                workers: (dataplane..dataplane + workers).map(pick).collect(),
            })
        }
        (other, _) => other,
    }
}

/// Check that every core of `wanted` is available.
pub fn check_allowed(wanted: &[usize], available: &[usize]) -> Result<(), PinError> {
    for &c in wanted {
        if !available.contains(&c) {
            return Err(PinError::CoreNotAllowed(c, format!("{available:?}")));
        }
    }
    Ok(())
}

/// Pin the calling thread to `core`.
pub fn pin_current(core: usize) -> Result<(), PinError> {
    // A cpu_set_t holds 1024 cores; core_affinity would index past it.
    if core >= 1024 {
        return Err(PinError::PinFailed(core));
    }
    if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        Ok(())
    } else {
        Err(PinError::PinFailed(core))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_lists() {
        assert_eq!(parse_core_list("0,2-3, 5").unwrap(), vec![0, 2, 3, 5]);
        assert_eq!(parse_core_list("3,1,3").unwrap(), vec![1, 3]);
        for bad in ["", "a", "3-1", "1-", ",,"] {
            assert!(parse_core_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_layout_follows_the_machine() {
        assert_eq!(choose(LayoutSpec::Auto, &[0, 1]).unwrap(), Layout::RunToCompletion { core: 1 });
        assert_eq!(
            choose(LayoutSpec::Auto, &(0..8).collect::<Vec<_>>()).unwrap(),
            Layout::Split { dataplane: vec![0, 1], workers: vec![2, 3, 4, 5, 6, 7] }
        );
        assert_eq!(
            choose(LayoutSpec::Auto, &[0, 1, 2, 3]).unwrap(),
            Layout::Split { dataplane: vec![0], workers: vec![1, 2, 3] }
        );
    }

    #[test]
    fn explicit_layouts() {
        let cores: Vec<usize> = (0..6).collect();
        assert_eq!(
            choose(LayoutSpec::Split { dataplane: 1, workers: 4 }, &cores).unwrap(),
            Layout::Split { dataplane: vec![1], workers: vec![2, 3, 4, 5] }
        );
        assert!(matches!(
            choose(LayoutSpec::Split { dataplane: 1, workers: 4 }, &[0, 1]),
            Err(PinError::TooFewCores { need: 5, have: 2, .. })
        ));
        assert_eq!(
            choose_shared(LayoutSpec::Split { dataplane: 1, workers: 4 }, &[0, 1]).unwrap(),
            Layout::Split { dataplane: vec![1], workers: vec![0, 1, 0, 1] }
        );
        assert_eq!(choose(LayoutSpec::RunToCompletion, &cores).unwrap(), Layout::RunToCompletion { core: 5 });
    }

    #[test]
    fn layout_specs_parse() {
        assert_eq!("auto".parse(), Ok(LayoutSpec::Auto));
        assert_eq!("rtc".parse(), Ok(LayoutSpec::RunToCompletion));
        assert_eq!("split:2:4".parse(), Ok(LayoutSpec::Split { dataplane: 2, workers: 4 }));
        assert_eq!("split".parse(), Ok(LayoutSpec::Split { dataplane: 1, workers: 1 }));
        for bad in ["split:0:1", "split:1", "split:1:2:3", "fast"] {
            assert!(bad.parse::<LayoutSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pinning_to_an_available_core_works() {
        let cores = available_cores();
        assert!(!cores.is_empty());
        let core = *cores.last().unwrap();
        std::thread::spawn(move || pin_current(core)).join().unwrap().unwrap();
        // A pinned thread still sees every core as available.
        let before = cores.clone();
        let first = cores[0];
        assert_eq!(
            std::thread::spawn(move || {
                pin_current(first).unwrap();
                available_cores()
            })
            .join()
            .unwrap(),
            before
        );
        assert!(check_allowed(&[usize::MAX], &cores).is_err());
    }
}
