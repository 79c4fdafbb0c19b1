//! meshcert-ca (being written).
