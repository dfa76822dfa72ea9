//! tenax-storage (being written)
