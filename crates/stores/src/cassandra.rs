//! The cassandra store (being written).
