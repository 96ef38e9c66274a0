//! The kernel half of the service proxy.
//!
//! One file per attach point (`tc_pod`, `tc_host`, `xdp_host`, `sock_lb`), one module per concern (`packet`,
//! `lb`, `conntrack`, `nat`, `snat`, `frag`, `icmp`, `reject`, `drop`, `stats`; `service_path` ties them
//! together), each
//! map defined beside the logic that uses it, as Cilium's bpf/ is laid out.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "the data path is inlined into each entry point: no BPF-to-BPF calls carrying the context"
)]

mod conntrack;
mod drop;
mod family;
mod frag;
mod icmp;
mod lb;
mod nat;
mod packet;
mod reject;
mod service_path;
mod skb;
mod snat;
mod sock_lb;
mod stats;
mod tc_host;
mod tc_pod;
mod upgrade;
mod xdp_host;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a real panic, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
