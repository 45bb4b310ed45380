//! The control panel (DESIGN.md, `control-panel/`): the database of client
//! platforms, servers, VMs and device placement ([`model`]) and where it is
//! kept ([`store`]). So far: the data model with its checks (ids unique,
//! references exist, no overlapping ranges within a VM, all-or-nothing
//! batches) and the embedded store. Still to come (its issue): etcd, the
//! watches that push routing tables to data planes, lifecycle, `dmfabric ctl`.

#![forbid(unsafe_code)]

pub mod model;
pub mod routing;
pub mod store;
