//! The SPIFFE Workload API (being written).
