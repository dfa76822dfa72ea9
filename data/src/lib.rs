//! tenax-data (being written)
