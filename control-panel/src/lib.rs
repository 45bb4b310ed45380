//! The control panel (DESIGN.md, `control-panel/`): the database of client
//! platforms, VMs, servers and device placement, routing updates and VM
//! lifecycle. Empty until the control-panel issue lands; nothing here
//! pretends to work yet.

#![forbid(unsafe_code)]
