// `sqlx::migrate!` embeds migrations/ at compile time but cannot tell cargo
// to watch the folder on stable Rust: a new migration would otherwise not
// reach the binaries until something else in this crate changed.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
