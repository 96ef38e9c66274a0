//! TC programs on the node's pod-facing interfaces (the host end of each pod's veth).
//!
//! - `tc_pod_ingress` sees what a pod sends: Service traffic gets a backend (internal scope).
//! - `tc_pod_egress` sees what is delivered to a pod: replies get the Service address back, and flows to a
//!   local backend that must be SNATed (external traffic, hairpin) get the node's address.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::service_path::{self, DROP, Origin};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    // A packet chosen for translation that could not be translated is dropped, never passed on
    // half-rewritten or with a Service address to a network that does not know it.
    service_path::ingress(&ctx, Origin::Pod).unwrap_or(DROP)
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "#[classifier] fixes the signature")]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    service_path::egress(&ctx).unwrap_or(DROP)
}
