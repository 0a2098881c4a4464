//! ztunnel: the per-node tunnel of an eBPF-assisted ambient service mesh.
pub mod netns;
pub mod redirect;
