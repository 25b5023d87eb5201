//! Builds the kernel-side classifier (`shaper-ebpf`) for bpfel-unknown-none
//! with the nightly toolchain and bpf-linker (installed by `cargo xtask setup`).
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../shaper-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "shaper-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
