//! The remote path: an exit aimed at a device on a server becomes one
//! IoRequest frame carrying every id of the wire header; the vCPU waits for
//! the IoCompletion with its (VM, vCPU, sequence), retransmitting on a
//! timeout, and gives up with a clear error when the server stays silent.
//!
//! Each vCPU is a stop-and-wait stream: at most one request outstanding,
//! sequence numbers growing from 0 after [`RemoteIo::connect`], whose
//! Hello makes the server forget this client's earlier streams.

use std::time::{Duration, Instant};

use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::{FrameBatch, Transport, TransportError};
use dmfabric_wire::{Direction, EthernetRepr, FrameRepr, IoRequest, MacAddr, Message, NackReason, Route};

use crate::kvm::Exit;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("No answer from server {server} to Hello within {waited:?}: is `dmfabric server --server-id {server}` running on this link?")]
    NoServer { server: u16, waited: Duration },
    #[error("Server {server} did not answer device {device} at {addr:#x} after {tries} tries over {waited:?}: stopping the VM")]
    Unreachable { server: u16, device: u32, addr: u64, tries: u32, waited: Duration },
    #[error("Server {server} refused device {device}: {reason:?}")]
    Nacked { server: u16, device: u32, reason: NackReason },
}

/// What the remote path did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    pub requests: u64,
    pub retransmits: u64,
    /// Completions that matched no waiting request (duplicates, late answers,
    /// other VMs' or clients' frames): dropped.
    pub dropped_answers: u64,
}

/// One client platform's connection to its servers for one VM.
#[derive(Debug)]
pub struct RemoteIo<T> {
    t: T,
    client: u16,
    hypervisor: u16,
    vm: u32,
    /// Server id → MAC, learnt from Hello replies.
    servers: Vec<(u16, MacAddr)>,
    /// Next sequence number per vCPU.
    next_seq: Vec<u64>,
    retry: Retry,
    batch: FrameBatch,
    stats: RemoteStats,
}

impl<T: Transport> RemoteIo<T> {
    /// Find `server` on the link (broadcast Hello) and start every vCPU
    /// stream of this client afresh.
    pub fn connect(
        mut t: T,
        client: u16,
        hypervisor: u16,
        vm: u32,
        server: u16,
        retry: Retry,
        timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let route = Route { server, client, hypervisor, vm, ..Route::default() };
        let Some((mac, _)) = dmfabric_dataplane::hello::discover(&mut t, route, Some(server), timeout)? else {
            return Err(RemoteError::NoServer { server, waited: timeout });
        };
        Ok(RemoteIo {
            t,
            client,
            hypervisor,
            vm,
            servers: vec![(server, mac)],
            next_seq: Vec::new(),
            retry,
            batch: FrameBatch::new(),
            stats: RemoteStats::default(),
        })
    }

    pub fn stats(&self) -> RemoteStats {
        self.stats
    }

    pub fn transport(&self) -> &T {
        &self.t
    }

    /// Serve one exit of `vcpu` by `device` on `server`; returns the data
    /// of a read (zero for a write, once the server has finished it).
    pub fn access(&mut self, vcpu: u16, server: u16, device: u32, exit: &Exit) -> Result<u64, RemoteError> {
        let Some(&(_, mac)) = self.servers.iter().find(|(s, _)| *s == server) else {
            return Err(RemoteError::NoServer { server, waited: Duration::ZERO });
        };
        let v = usize::from(vcpu);
        if self.next_seq.len() <= v {
            self.next_seq.resize(v + 1, 0);
        }
        let seq = self.next_seq[v];
        self.next_seq[v] += 1;
        let req = IoRequest {
            route: Route { server, hypervisor: self.hypervisor, client: self.client, vm: self.vm, vcpu, device },
            seq,
            space: exit.space,
            dir: exit.dir,
            size: exit.size,
            addr: exit.addr,
            data: if exit.dir == Direction::Write { exit.data } else { 0 },
        };
        let mut repr = FrameRepr::new(EthernetRepr { dst: mac, src: self.t.mac() }, Message::IoRequest(req));
        self.stats.requests += 1;
        let start = Instant::now();
        let mut tries = 0u32;
        loop {
            repr.retransmit = tries > 0;
            self.batch.push_with(|buf| repr.emit(buf).ok());
            self.t.send(&mut self.batch)?;
            let deadline = Instant::now() + self.retry.timeout;
            let mut answer: Option<Result<u64, NackReason>> = None;
            let (vm, client, stats) = (self.vm, self.client, &mut self.stats);
            while answer.is_none() && Instant::now() < deadline {
                self.t.recv(16, &mut |f| {
                    let Ok(frame) = FrameRepr::parse_bytes(f) else { return };
                    let route = *frame.msg.route();
                    let mine = route.vm == vm && route.client == client && route.vcpu == vcpu;
                    match frame.msg {
                        Message::IoCompletion(c) if mine && c.seq == seq && answer.is_none() => {
                            answer = Some(Ok(c.data))
                        }
                        Message::Nack(n) if mine && n.seq == seq && answer.is_none() => answer = Some(Err(n.reason)),
                        Message::IoCompletion(_) | Message::Nack(_) => stats.dropped_answers += 1,
                        _ => {}
                    }
                })?;
            }
            match answer {
                Some(Ok(data)) => return Ok(data),
                Some(Err(reason)) => return Err(RemoteError::Nacked { server, device, reason }),
                None if tries < self.retry.retries => {
                    tries += 1;
                    self.stats.retransmits += 1;
                }
                None => {
                    return Err(RemoteError::Unreachable {
                        server,
                        device,
                        addr: exit.addr,
                        tries: tries + 1,
                        waited: start.elapsed(),
                    })
                }
            }
        }
    }
}
