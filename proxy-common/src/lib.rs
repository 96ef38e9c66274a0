//! Keys and values of the eBPF maps, shared by `proxy-ebpf` (kernel) and `proxy-agent` (userspace).
//!
//! Every type is `#[repr(C)]`, `Copy`, and has no implicit padding: aya requires a `Pod` type to have none,
//! and the kernel compares keys byte by byte, so a padding byte with garbage in it would make a lookup miss.
//! Addresses and ports are stored in network byte order, exactly as they sit in the packet, so the data path
//! never swaps bytes. The layout tests at the bottom pin sizes and offsets.
#![no_std]

/// IP protocol numbers, as in the IPv4 header's protocol field.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Names of the maps, as the agent finds them in the object and pins them.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const REVNAT: &str = "REVNAT";
}

/// Sizes of the maps. The agent refuses a desired table that would not fit, rather than half-write it.
pub mod capacity {
    pub const SERVICES: u32 = 1 << 20;
    pub const BACKENDS: u32 = 1 << 20;
    pub const CONNTRACK: u32 = 1 << 18;
    pub const REVNAT: u32 = 1 << 18;
}

/// The service map: a frontend (service address, port, protocol) and a slot.
///
/// Slot 0 is the service itself and holds the number of backends; slots `1..=count` each hold one backend
/// id. The agent writes backends and slots before slot 0, and slot 0 last, so the data path never sees a
/// count that points past the written slots (the layout follows Cilium's `lb4_key`/`lb4_service`).
pub mod service {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct ServiceKey {
        /// IPv4 address, network byte order.
        pub addr: u32,
        /// Port, network byte order.
        pub port: u16,
        pub proto: u8,
        pub pad: u8,
        pub slot: u16,
        pub pad2: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct ServiceValue {
        /// In slots `1..=count`: the backend this slot points at. Zero in slot 0.
        pub backend_id: u32,
        /// Index into the reverse-NAT map, so replies get this frontend's address back.
        pub rev_nat_id: u32,
        /// In slot 0: how many backend slots follow. Zero means "no usable backend".
        pub count: u16,
        /// `flags::*` bits, in slot 0.
        pub flags: u16,
    }

    impl ServiceKey {
        #[must_use]
        pub const fn new(addr: u32, port: u16, proto: u8, slot: u16) -> Self {
            Self { addr, port, proto, pad: 0, slot, pad2: 0 }
        }
    }
}

/// The backend map: backend id → the endpoint's address and port.
pub mod backend {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Backend {
        /// IPv4 address, network byte order.
        pub addr: u32,
        /// Port, network byte order.
        pub port: u16,
        pub proto: u8,
        pub flags: u8,
    }
}

/// The reverse-NAT map: id → the frontend address a reply must appear to come from.
pub mod revnat {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RevNat {
        /// IPv4 address, network byte order.
        pub addr: u32,
        /// Port, network byte order.
        pub port: u16,
        pub pad: u16,
    }
}

/// The connection-tracking map (LRU), keyed by the full 5-tuple and a direction.
///
/// A new flow to a frontend writes two entries: the original tuple (client → frontend), which pins the flow
/// to its backend, and the reply tuple (backend → client), which tells the egress program to restore the
/// frontend's address. The forward entry names the backend by id, and the data path checks the id is still
/// in the backend map on every packet, so a flow whose backend is gone moves on instead of black-holing.
pub mod conntrack {
    pub const DIR_FORWARD: u8 = 0;
    pub const DIR_REPLY: u8 = 1;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CtKey {
        pub src_addr: u32,
        pub dst_addr: u32,
        pub src_port: u16,
        pub dst_port: u16,
        pub proto: u8,
        pub dir: u8,
        pub pad: u16,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CtValue {
        pub backend_id: u32,
        pub rev_nat_id: u32,
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{backend::Backend, conntrack, revnat::RevNat, service};

    // SAFETY: each type is repr(C), Copy, made of integers only, and has no padding (see the layout tests),
    // so every bit pattern is valid and no uninitialised byte is ever read.
    unsafe impl aya::Pod for service::ServiceKey {}
    unsafe impl aya::Pod for service::ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for conntrack::CtKey {}
    unsafe impl aya::Pod for conntrack::CtValue {}
}

#[cfg(test)]
mod layout_tests {
    use super::{backend::Backend, conntrack::*, revnat::RevNat, service::*};
    use core::mem::{offset_of, size_of};

    #[test]
    fn service_key_has_no_padding() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(offset_of!(ServiceKey, pad), 7);
        assert_eq!(offset_of!(ServiceKey, slot), 8);
        assert_eq!(offset_of!(ServiceKey, pad2), 10);
    }

    #[test]
    fn service_value_has_no_padding() {
        assert_eq!(size_of::<ServiceValue>(), 12);
        assert_eq!(offset_of!(ServiceValue, backend_id), 0);
        assert_eq!(offset_of!(ServiceValue, rev_nat_id), 4);
        assert_eq!(offset_of!(ServiceValue, count), 8);
        assert_eq!(offset_of!(ServiceValue, flags), 10);
    }

    #[test]
    fn backend_has_no_padding() {
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(offset_of!(Backend, addr), 0);
        assert_eq!(offset_of!(Backend, port), 4);
        assert_eq!(offset_of!(Backend, proto), 6);
        assert_eq!(offset_of!(Backend, flags), 7);
    }

    #[test]
    fn revnat_has_no_padding() {
        assert_eq!(size_of::<RevNat>(), 8);
        assert_eq!(offset_of!(RevNat, port), 4);
        assert_eq!(offset_of!(RevNat, pad), 6);
    }

    #[test]
    fn conntrack_has_no_padding() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(offset_of!(CtKey, dst_addr), 4);
        assert_eq!(offset_of!(CtKey, src_port), 8);
        assert_eq!(offset_of!(CtKey, dst_port), 10);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, dir), 13);
        assert_eq!(offset_of!(CtKey, pad), 14);
        assert_eq!(size_of::<CtValue>(), 8);
        assert_eq!(offset_of!(CtValue, rev_nat_id), 4);
    }
}
