//! Everything that talks to the kernel: tc objects over rtnetlink (`tc`) and
//! the classifier program and maps (`bpf`); kernel struct layouts from BTF (`btf`).
pub mod bpf;
pub mod btf;
pub mod net;
#[cfg(test)]
mod stack_depth;
pub mod tc;
pub mod tc_encode;
