//! Checkpoint planning (being written).
