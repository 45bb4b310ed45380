//! The control panel (DESIGN.md, `control-panel/`): the database of client
//! platforms, servers, VMs and device placement ([`model`], checked,
//! all-or-nothing change batches), where it is kept ([`store`]: a redb
//! file by default, [`etcd`] for clusters), the routing tables data planes
//! route by ([`routing`]) and the watch that keeps them current ([`watch`]).
//! The stores also keep secrets that are never records: client platforms'
//! keys ([`keys`]) and the cluster key that seals states in transit
//! ([`seal`]); with etcd, who may read which is etcd's users and grants
//! ([`etcd`]).

#![forbid(unsafe_code)]

pub mod etcd;
pub mod keys;
pub mod model;
pub mod routing;
pub mod seal;
pub mod store;
pub mod watch;
