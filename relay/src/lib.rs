//! hush-relay (skeleton; filled in by later work).
