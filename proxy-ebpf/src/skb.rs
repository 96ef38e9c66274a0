//! The `__sk_buff` fields aya's `TcContext` does not expose.

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};

#[inline(always)]
fn raw(ctx: &TcContext) -> *mut __sk_buff {
    ctx.as_ptr().cast()
}

#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context points at the kernel's __sk_buff for the whole program run; `mark` is readable.
    unsafe { (*raw(ctx)).mark }
}

/// The interface the packet is on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in `mark`; `ifindex` is readable from TC programs.
    unsafe { (*raw(ctx)).ifindex }
}
