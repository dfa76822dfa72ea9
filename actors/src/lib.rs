//! tenax-actors (being written)
