//! hush-tests (skeleton; filled in by later work).
