//! The `hush` command-line client.

fn main() {}
