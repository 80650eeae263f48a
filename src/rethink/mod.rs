//! The reTHINK protocol as clients really speak it: messages (parsed once, with clear
//! errors, and their responses) and addresses (URL parts, the node's component addresses,
//! runtime URL rules). Shared by the bus and the connectors; no I/O.

pub mod address;
pub mod message;

pub use message::{BusError, Message};
