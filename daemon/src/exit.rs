//! Process exit codes (sysexits.h), the same for both programs.

/// A runtime failure.
pub const RUNTIME: u8 = 1;
/// Bad command-line arguments (`EX_USAGE`).
pub const USAGE: u8 = 64;
/// A bad configuration (`EX_CONFIG`).
pub const CONFIG: u8 = 78;
