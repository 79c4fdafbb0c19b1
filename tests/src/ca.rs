//! Harness for a running CA holder (being written).
