//! The admin socket (being written).
