//! TC programs on the node's pod-facing interfaces (the host end of each pod's veth).
//!
//! - `tc_pod_ingress` sees what a pod sends: Service traffic gets a backend (internal scope).
//! - `tc_pod_egress` sees what is delivered to a pod: replies get the Service address back, and flows to a
//!   local backend that must be SNATed (external traffic, hairpin) get the node's address.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::service_path::{self, Origin, dropped};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    service_path::ingress(&ctx, Origin::Pod).unwrap_or_else(dropped)
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    service_path::egress(&ctx).unwrap_or_else(dropped)
}

/// IPv6 packets of `tc_pod_ingress`, by tail call (`service_path::ipv6`).
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_ingress6(ctx: TcContext) -> i32 {
    service_path::ingress6(&ctx, Origin::Pod).unwrap_or_else(dropped)
}

/// IPv6 packets of `tc_pod_egress`.
#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_egress6(ctx: TcContext) -> i32 {
    service_path::egress6(&ctx, false).unwrap_or_else(dropped)
}
