//! The s3 store (being written).
