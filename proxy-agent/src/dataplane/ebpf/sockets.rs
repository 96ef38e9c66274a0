//! The socket programs for the node's own traffic: attached to a cgroup (v2), scoped to this network
//! namespace by its cookie.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr,
    cgroup_sock_addr::CgroupSockAddrLink,
    links::{FdLink, PinnedLink},
};

pub const PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie() -> anyhow::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("opening a socket to read the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits");
    // SAFETY: the fd is a valid socket for this call, and `cookie`/`len` are valid for writes of their size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// The cgroup `--cgroup` names: `none` for none, a path, or (unset) the root of the cgroup v2 mount.
#[must_use]
pub fn cgroup_for(flag: Option<&str>) -> Option<PathBuf> {
    match flag {
        Some("none") => None,
        Some(path) => Some(path.into()),
        None => cgroup2_mount(),
    }
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Loads the socket programs and attaches them to `cgroup` through links pinned under `links_dir`: a
/// restarted agent swaps its programs into the same links, and links to a cgroup no longer used are dropped.
pub fn attach(ebpf: &mut aya::Ebpf, cgroup: &Path, links_dir: &Path) -> anyhow::Result<()> {
    let dir = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    // The cgroup's inode names its pins, so a change of --cgroup leaves no program behind on the old one.
    let ino = dir.metadata()?.ino();
    std::fs::create_dir_all(links_dir)?;
    for entry in std::fs::read_dir(links_dir)?.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with("cgroup-") && !file.starts_with(&format!("cgroup-{ino}-")) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
        prog.load().with_context(|| format!("loading {name}"))?;
        let pin = links_dir.join(format!("cgroup-{ino}-{name}"));
        if let Ok(old) = PinnedLink::from_pin(&pin)
            && let Ok(link) = CgroupSockAddrLink::try_from(FdLink::from(old))
            && prog.attach_to_link(link).is_ok()
        {
            continue;
        }
        let _ = std::fs::remove_file(&pin);
        // A bpf_link attachment (kernel >= 5.7) coexists with other links on the cgroup by nature; the kernel
        // refuses the ALLOW_MULTI flag on links, so the default mode is the right one here.
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let fd: FdLink = prog.take_link(id)?.try_into().context("cgroup link is not a bpf_link")?;
        let pinned = fd.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        prog.attach_to_link(CgroupSockAddrLink::try_from(FdLink::from(pinned))?)?;
    }
    Ok(())
}
