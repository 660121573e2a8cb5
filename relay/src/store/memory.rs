//! In-memory [`super::Store`] (to be written).
