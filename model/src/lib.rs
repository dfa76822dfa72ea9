//! tenax-model (being written)
