//! redb-backed [`super::Store`] (to be written).
