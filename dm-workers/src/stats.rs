//! A server's counters: plain integers owned by its data-plane core.

use std::fmt;

use crate::table::DeviceCounters;

/// Counters of a server. Plain integers: owned by the server's core.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    pub requests: u64,
    pub completions: u64,
    /// Accesses the device did not claim (completed as real hardware would).
    pub unclaimed: u64,
    pub nack_unknown_device: u64,
    /// Requests for a device that belongs to another VM.
    pub nack_other_vm: u64,
    /// Reset requests (i8042) sent to VMs' clients.
    pub vm_resets: u64,
    /// Reset requests for a device no VM has used yet: nobody to tell.
    pub vm_events_unbound: u64,
    pub nack_wrong_server: u64,
    /// Requests naming a VM the control panel does not know (or not on
    /// that client platform).
    pub nack_unknown_vm: u64,
    /// Requests naming a vCPU their VM does not have.
    pub nack_bad_vcpu: u64,
    /// Requests of a stream this server has no state for, outside a
    /// session it offered: the client opens one again.
    pub nack_no_session: u64,
    /// Nacks not sent: the client was sent too many (a replay flood).
    pub nacks_limited: u64,
    /// Frames dropped unanswered because their tag did not verify, by
    /// reason (no_tag, unknown_key, bad_tag → count, non-zero only).
    pub unauthenticated: Vec<(&'static str, u64)>,
    /// Authentic frames from neither the client's registered MAC nor a server's.
    pub wrong_source: u64,
    /// Hellos without their challenge.
    pub bad_hello: u64,
    /// Hellos not answered: the client asked too often (a replay flood).
    pub hellos_limited: u64,
    /// Sessions offered (Hello answers) and started (first used).
    pub sessions_offered: u64,
    pub sessions_started: u64,
    /// Clients forgotten after a long silence (or no longer registered).
    pub clients_forgotten: u64,
    /// Level lines sent again to a client that started a new session.
    pub levels_resent: u64,
    /// Requests for devices placed on another server, sent there.
    pub forwarded: u64,
    /// Requests that waited for their device's state to arrive.
    pub held: u64,
    /// Requests dropped because too many waited already (the client retransmits).
    pub held_dropped: u64,
    /// Devices taken over from another server with their saved state.
    pub devices_arrived: u64,
    /// Devices that moved away, their state saved for the next server.
    pub devices_left: u64,
    pub hellos: u64,
    /// Frames of another EtherType (ARP and the like on a shared link).
    pub foreign: u64,
    /// Unicast frames addressed to another MAC.
    pub not_for_us: u64,
    /// Valid frames of a kind a server does not accept.
    pub unexpected_kind: u64,
    /// Replies that did not fit the TX burst.
    pub tx_full: u64,
    /// Retransmitted requests answered again from the stream's cache,
    /// without running the device model twice.
    pub duplicates_answered: u64,
    /// Retransmitted requests still being executed (their answer follows).
    pub duplicates_in_flight: u64,
    /// Requests older than their stream's latest: dropped.
    pub stale: u64,
    /// Interrupt frames sent (first copies).
    pub interrupts: u64,
    pub interrupt_retransmits: u64,
    pub interrupt_acks: u64,
    /// Acks for interrupts not (or no longer) waiting for one.
    pub interrupt_acks_stale: u64,
    /// Interrupts of a device no VM has used yet: nobody to send them to.
    pub interrupts_unbound: u64,
    /// Interrupts never acknowledged within the retry limit: dropped.
    pub interrupts_given_up: u64,
    /// Edges lost because a queue on their way to the wire was full.
    pub interrupts_queue_full: u64,
    /// Level changes folded into one still queued for the same line (none lost).
    pub interrupts_coalesced: u64,
    /// Reset requests lost because their queue was full.
    pub vm_events_dropped: u64,
    /// Line changes of devices here that drove the pins of their VM's
    /// interrupt controller here, through the data-plane core.
    pub chip_pins: u64,
    /// Line changes sent to the server holding their VM's interrupt
    /// controller (first copies).
    pub chip_lines_sent: u64,
    /// Line changes from other servers that drove a controller's pins here.
    pub chip_lines_in: u64,
    /// The same again (a lost acknowledgement): acknowledged, not applied twice.
    pub chip_lines_again: u64,
    /// Line changes from other servers for a VM whose controller is not
    /// here: dropped unacknowledged.
    pub chip_lines_no_chip: u64,
    /// Completions held until the line changes their request made reached
    /// the VM's interrupt controller on another server.
    pub completions_fenced: u64,
    /// Malformed frames by reason (WireError::name → count, non-zero only).
    pub malformed: Vec<(&'static str, u64)>,
    /// Device DMA to and from the clients' VMs ([`crate::dma`]).
    pub dma: crate::dma::DmaStats,
    /// Per device (filled where the devices are: at once in the
    /// run-to-completion layout, after `finish` in the split one).
    pub devices: Vec<DeviceCounters>,
}

impl ServerStats {
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().map(|(_, n)| n).sum()
    }
}

impl ServerStats {
    /// Frames dropped because their tag did not verify.
    pub fn unauthenticated_total(&self) -> u64 {
        self.unauthenticated.iter().map(|(_, n)| n).sum()
    }
}

/// A counter of [`ServerStats`] as a metrics endpoint names it: (name
/// without the `_total` suffix, help, value).
pub type NamedCounter = (&'static str, &'static str, u64);

impl ServerStats {
    /// Every plain counter with a name and a help line, for a metrics
    /// endpoint (what is by reason is in [`ServerStats::nacks`] and
    /// [`ServerStats::drops`], what is per device in `devices`).
    pub fn counters(&self) -> Vec<NamedCounter> {
        vec![
            ("requests", "I/O requests received", self.requests),
            ("completions", "I/O completions sent", self.completions),
            ("unclaimed", "Accesses no device register claimed", self.unclaimed),
            ("forwarded", "Requests for devices on another server, sent there", self.forwarded),
            ("held", "Requests that waited for their device's state to arrive", self.held),
            ("duplicates_answered", "Retransmitted requests answered again from the cache", self.duplicates_answered),
            ("duplicates_in_flight", "Retransmitted requests still being executed", self.duplicates_in_flight),
            ("hellos", "Hellos received", self.hellos),
            ("sessions_offered", "Sessions offered (Hello answers)", self.sessions_offered),
            ("sessions_started", "Sessions started (first used)", self.sessions_started),
            ("clients_forgotten", "Clients forgotten after a long silence", self.clients_forgotten),
            ("devices_arrived", "Devices taken over with their saved state", self.devices_arrived),
            ("devices_left", "Devices that moved away", self.devices_left),
            ("vm_resets", "Reset requests sent to VMs' clients", self.vm_resets),
            ("interrupts", "Interrupt frames sent (first copies)", self.interrupts),
            ("interrupt_retransmits", "Interrupt frames sent again", self.interrupt_retransmits),
            ("interrupt_acks", "Interrupt acknowledgements received", self.interrupt_acks),
            ("interrupts_coalesced", "Level changes folded into one still queued", self.interrupts_coalesced),
            ("levels_resent", "Level lines sent again to a client with a new session", self.levels_resent),
            ("chip_pins", "Line changes that drove an interrupt controller here", self.chip_pins),
            (
                "chip_lines_sent",
                "Line changes sent to the server of their VM's interrupt controller",
                self.chip_lines_sent,
            ),
            (
                "chip_lines_in",
                "Line changes from other servers applied to an interrupt controller here",
                self.chip_lines_in,
            ),
            (
                "chip_lines_again",
                "Line changes from other servers received again (not applied twice)",
                self.chip_lines_again,
            ),
            (
                "chip_lines_no_chip",
                "Line changes from other servers for a VM whose controller is not here",
                self.chip_lines_no_chip,
            ),
            (
                "completions_fenced",
                "Completions held until their line changes reached the VM's controller",
                self.completions_fenced,
            ),
            ("dma_requests", "DMA requests of device models", self.dma.requests),
            ("dma_completed", "DMA requests done", self.dma.completed),
            ("dma_failed", "DMA requests failed (refused, or never answered)", self.dma.failed),
            ("dma_bytes_read", "Bytes device models read from guest memory", self.dma.bytes_read),
            ("dma_bytes_written", "Bytes device models wrote to guest memory", self.dma.bytes_written),
            ("dma_chunks_sent", "DMA chunk frames sent (first copies and again)", self.dma.chunks_sent),
            ("dma_retransmits", "DMA chunk frames sent again", self.dma.retransmits),
            ("dma_stale_answers", "DMA answers nobody waited for", self.dma.stale_answers),
            ("dma_bad_answers", "DMA answers that did not match their chunk", self.dma.bad_answers),
            ("dma_refused", "DMA chunks the client refused", self.dma.refused),
            ("dma_gave_up", "DMA chunks never answered", self.dma.gave_up),
        ]
    }

    /// Requests refused with a Nack, by reason (every reason, zeros too).
    pub fn nacks(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("unknown_device", self.nack_unknown_device),
            ("other_vm", self.nack_other_vm),
            ("wrong_server", self.nack_wrong_server),
            ("unknown_vm", self.nack_unknown_vm),
            ("bad_vcpu", self.nack_bad_vcpu),
            ("no_session", self.nack_no_session),
        ]
    }

    /// What was dropped (or not sent), by reason — every reason, zeros too,
    /// so that a rate is defined from the first scrape. Frames: of another
    /// EtherType, for another MAC, malformed (`malformed_<why>`), not
    /// authentic (`unauthenticated_<why>`), of the wrong source or kind;
    /// requests stale, over the hold limit; interrupts and events that
    /// could not be sent; Nacks and Hello answers rate-limited; replies
    /// that did not fit a burst.
    pub fn drops(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = vec![
            ("foreign".into(), self.foreign),
            ("not_for_us".into(), self.not_for_us),
            ("unexpected_kind".into(), self.unexpected_kind),
            ("wrong_source".into(), self.wrong_source),
            ("bad_hello".into(), self.bad_hello),
            ("stale".into(), self.stale),
            ("held_dropped".into(), self.held_dropped),
            ("tx_full".into(), self.tx_full),
            ("nacks_limited".into(), self.nacks_limited),
            ("hellos_limited".into(), self.hellos_limited),
            ("interrupts_unbound".into(), self.interrupts_unbound),
            ("interrupts_given_up".into(), self.interrupts_given_up),
            ("interrupts_queue_full".into(), self.interrupts_queue_full),
            ("interrupt_acks_stale".into(), self.interrupt_acks_stale),
            ("vm_events_unbound".into(), self.vm_events_unbound),
            ("vm_events_dropped".into(), self.vm_events_dropped),
        ];
        let of = |table: &[(&'static str, u64)], name: &str| table.iter().find(|(n, _)| *n == name).map_or(0, |t| t.1);
        for e in dmfabric_wire::auth::AuthError::ALL {
            out.push((format!("unauthenticated_{}", e.name()), of(&self.unauthenticated, e.name())));
        }
        for e in dmfabric_wire::WireError::ALL {
            out.push((format!("malformed_{}", e.name()), of(&self.malformed, e.name())));
        }
        out
    }
}

impl fmt::Display for ServerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests {} completions {} unclaimed {} nack(unknown device {}, wrong server {}, other VM {}, unknown VM {}, bad vCPU {}, no session {}, limited {}) forwarded {} held {} (dropped {}) devices arrived {} left {} resets {} duplicates {} (in flight {}) stale {} hellos {} (limited {}) sessions {}/{} interrupts {} (retransmits {}, acks {}, unbound {}, given up {}, levels resent {}) chip lines (pins {}, sent {}, in {}, again {}, no chip {}, fenced {}) foreign {} not-for-us {} unexpected-kind {} tx-full {} unauthenticated {} wrong-source {} malformed {}",
            self.requests,
            self.completions,
            self.unclaimed,
            self.nack_unknown_device,
            self.nack_wrong_server,
            self.nack_other_vm,
            self.nack_unknown_vm,
            self.nack_bad_vcpu,
            self.nack_no_session,
            self.nacks_limited,
            self.forwarded,
            self.held,
            self.held_dropped,
            self.devices_arrived,
            self.devices_left,
            self.vm_resets,
            self.duplicates_answered,
            self.duplicates_in_flight,
            self.stale,
            self.hellos,
            self.hellos_limited,
            self.sessions_started,
            self.sessions_offered,
            self.interrupts,
            self.interrupt_retransmits,
            self.interrupt_acks,
            self.interrupts_unbound,
            self.interrupts_given_up,
            self.levels_resent,
            self.chip_pins,
            self.chip_lines_sent,
            self.chip_lines_in,
            self.chip_lines_again,
            self.chip_lines_no_chip,
            self.completions_fenced,
            self.foreign,
            self.not_for_us,
            self.unexpected_kind,
            self.tx_full,
            self.unauthenticated_total(),
            self.wrong_source,
            self.malformed_total()
        )?;
        for (name, n) in self.unauthenticated.iter().chain(&self.malformed) {
            write!(f, " {name}={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter added to ServerStats must reach a metrics endpoint: every
    /// field is in `counters`, `nacks` (as `nack_<reason>`) or `drops`.
    #[test]
    fn every_counter_is_named_for_the_metrics() {
        let fields = serde_json::to_value(ServerStats::default()).unwrap();
        let s = ServerStats::default();
        let named: Vec<String> = s
            .counters()
            .iter()
            .map(|c| c.0.to_string())
            .chain(s.nacks().iter().map(|(r, _)| format!("nack_{r}")))
            .chain(s.drops().into_iter().map(|(r, _)| r))
            .collect();
        for (field, value) in fields.as_object().unwrap() {
            if field == "dma" {
                for (sub, _) in value.as_object().unwrap() {
                    assert!(named.contains(&format!("dma_{sub}")), "ServerStats::dma.{sub} is not exported");
                }
                continue;
            }
            let by_reason = matches!(field.as_str(), "unauthenticated" | "malformed" | "devices");
            assert!(by_reason || named.contains(field), "ServerStats::{field} is not exported");
        }
        let mut unique = named.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), named.len(), "a name twice: {named:?}");
    }
}
