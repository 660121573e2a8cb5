//! hush-client (skeleton; filled in by later work).
