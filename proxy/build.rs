//! Rebuilds the crate when `migrations/` changes. `sqlx::migrate!` embeds the files
//! with `include_str!`, so edits to existing files are tracked anyway, but a newly
//! added migration would otherwise be missed until something else changes (see the
//! `sqlx::migrate!` documentation).

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
