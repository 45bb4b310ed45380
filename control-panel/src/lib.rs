//! The control panel (DESIGN.md, `control-panel/`): the database of client
//! platforms, servers, VMs and device placement ([`model`], checked,
//! all-or-nothing change batches), where it is kept ([`store`]: a redb
//! file by default, [`etcd`] for clusters), the routing tables data planes
//! route by ([`routing`]) and the watch that keeps them current ([`watch`]).

#![forbid(unsafe_code)]

pub mod etcd;
pub mod model;
pub mod routing;
pub mod store;
pub mod watch;
