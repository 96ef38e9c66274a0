//! TC programs on the node's host interfaces (towards other nodes and the outside).
//!
//! - `tc_host_ingress`: NodePort, external IPs, load-balancer IPs and ClusterIPs reached from outside get a
//!   backend (external scope: externalTrafficPolicy applies), and replies to SNATed flows go back to their
//!   client.
//! - `tc_host_egress`: replies leaving for external clients get the frontend address back, and flows to
//!   backends on other nodes that must be SNATed get the node's address.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::service_path::{self, Origin, dropped};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_host_ingress(ctx: TcContext) -> i32 {
    service_path::ingress(&ctx, Origin::Host).unwrap_or_else(dropped)
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_host_egress(ctx: TcContext) -> i32 {
    service_path::host_egress(&ctx).unwrap_or_else(dropped)
}

/// IPv6 packets of `tc_host_ingress`, by tail call (`service_path::ipv6`).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_host_ingress6(ctx: TcContext) -> i32 {
    service_path::ingress6(&ctx, Origin::Host).unwrap_or_else(dropped)
}

/// IPv6 packets of `tc_host_egress`.
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_host_egress6(ctx: TcContext) -> i32 {
    service_path::egress6(&ctx, true).unwrap_or_else(dropped)
}
