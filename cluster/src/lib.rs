//! tenax-cluster (being written)
