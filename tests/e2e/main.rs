//! End-to-end tests: real CA holder and agents, real files, real sockets.
//! One test binary; one module per area.

mod agent;
mod ca;
mod faults;
mod ha;
mod http2;
mod kubernetes;
mod operations;
mod outage;
mod rotation;
mod virtualmesh;
mod workload;
