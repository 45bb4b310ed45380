//! The client platform's KVM shim (DESIGN.md, `vmm-shim/`): VM and vCPU
//! set-up, guest loading, the exit loop and routing exits to local or
//! remote devices. Empty until the KVM shim issue lands; nothing here
//! pretends to work yet.

#![forbid(unsafe_code)]
