//! The two C math functions the agent's dependencies call, from the pure-Rust `libm` crate.
//!
//! tokio's scheduler (`exp2`, in its poll-time average) and the signing-time histogram's
//! buckets (`pow`) are the only callers of glibc's `libm.so.6` in the agent. Loading that
//! library for them cost about 0.5 MB of the resident set (its symbol tables and code,
//! mapped by fault-around), a twentieth of the agent's budget at 100 entries. Defining the
//! two symbols here lets the linker resolve them inside the binary, and `--as-needed` then
//! leaves `libm.so.6` out (check with `readelf -d target/release/meshcert-agent`).
//!
//! Only the `meshcert-agent` binary defines them; the library and its tests use glibc's.

#![allow(unsafe_code)]

/// `pow(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// `exp2(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn exp2(x: f64) -> f64 {
    libm::exp2(x)
}

#[cfg(test)]
mod tests {
    #[test]
    fn agree_with_the_definitions() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert_eq!(super::pow(0.001 * 2.0, 1.0), 0.002);
        assert_eq!(super::exp2(-1.0), 0.5);
        assert!((super::pow(0.9, 3.5) - (3.5 * 0.9f64.ln()).exp()).abs() < 1e-15);
        assert!((super::exp2(0.3) - (0.3 * std::f64::consts::LN_2).exp()).abs() < 1e-15);
    }
}
