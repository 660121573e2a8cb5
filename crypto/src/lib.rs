//! hush-crypto (skeleton; filled in by later work).
