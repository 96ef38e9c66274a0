//! Where maps are pinned, and upgrades that keep every flow: layout-versioned pin names, the previous
//! maps set aside, and their entries copied into the new ones.
//!
//! A map is pinned as `<dir>/NAME_vN` (bpffs refuses dots in names), `N` its layout version (`proxy_common::maps::LAYOUTS`). At start
//! the agent moves every pin it cannot adopt (another version, an older unversioned name, or the same name
//! with another size or layout) to `<dir>/previous/NAME`, and creates this build's maps in their place.
//! The programs still attached keep using the previous maps, so traffic flows on untouched. When anything
//! was set aside the start is an *upgrade* (or a downgrade, or a resize): the agent copies what it can of
//! the service state at once, writes the first complete table into the new maps, then copies the flow
//! state (conntrack, SNAT, affinity, socket and fragment records, counters), unpins the previous maps and
//! swaps its programs in. A map whose key or value size changed has no copier: its entries are not
//! carried over, and the log says so.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::MapData;
use proxy_common::maps;

/// The directory previous maps are moved to during an upgrade.
const PREVIOUS: &str = "previous";

/// Test-only: map names whose layout version is taken as one higher, to exercise an upgrade (and, without
/// it, the downgrade back) with one build.
const BUMP_VAR: &str = "PROXY_AGENT_TEST_LAYOUT_BUMP";

/// The layout version of map `name` in this build.
#[must_use]
pub fn version(name: &str) -> u32 {
    let base = maps::LAYOUTS.iter().find(|(n, _)| *n == name).map_or(1, |(_, v)| *v);
    let bumped = std::env::var(BUMP_VAR).is_ok_and(|v| v.split(',').any(|n| n.trim() == name));
    base + u32::from(bumped)
}

/// This build's pin of map `name` under `dir`.
#[must_use]
pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}_v{}", version(name)))
}

/// Whether `file` (a pin's file name) is some version of map `name`: `NAME` or `NAME_vN`.
fn is_version_of(file: &str, name: &str) -> bool {
    file == name
        || file.strip_prefix(name).and_then(|rest| rest.strip_prefix("_v")).is_some_and(|n| n.parse::<u32>().is_ok())
}

/// The pin of map `name` set aside by an upgrade, if any.
#[must_use]
pub fn previous(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(PREVIOUS).join(name);
    p.exists().then_some(p)
}

/// Before loading: moves every pin of another version of a map to `previous/` (keeping one there per map:
/// one already there is the one the running programs use, from an upgrade that did not finish), and
/// returns the maps whose pin of this build's version already exists.
pub fn prepare(dir: &Path) -> anyhow::Result<BTreeSet<&'static str>> {
    let mut existing = BTreeSet::new();
    let files: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for (name, _) in maps::LAYOUTS {
        let wanted = path(dir, name);
        let wanted_file = wanted.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_owned();
        for file in files.iter().filter(|f| is_version_of(f, name) && **f != wanted_file) {
            retire(dir, name, &dir.join(file), "another layout version")?;
        }
        if wanted.exists() {
            existing.insert(name);
        }
    }
    Ok(existing)
}

/// Moves the pin `pin` of map `name` to `previous/` (or removes it if a previous one is already there).
pub fn retire(dir: &Path, name: &str, pin: &Path, why: &str) -> anyhow::Result<()> {
    let prev_dir = dir.join(PREVIOUS);
    std::fs::create_dir_all(&prev_dir).with_context(|| format!("creating {}", prev_dir.display()))?;
    let target = prev_dir.join(name);
    if target.exists() {
        std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    } else {
        std::fs::rename(pin, &target).with_context(|| format!("moving {} aside", pin.display()))?;
    }
    tracing::warn!(
        map = name,
        pin = %pin.display(),
        why,
        "a pinned map from another version has a different layout; a new map replaces it once it is filled, \
         and the running programs keep the old one until then"
    );
    Ok(())
}

/// The previous conntrack and SNAT maps the new programs may fall back to during an upgrade: (name of the
/// fallback map in the object, previous pin, its size), for those whose key and value are this build's.
#[must_use]
pub fn previous_for_fallback(dir: &Path) -> Vec<(&'static str, PathBuf, u32)> {
    use proxy_common::conntrack::{CtKey, CtKey6, CtValue, CtValue6, SnatValue, SnatValue6};
    let wanted = [
        (maps::PREV_CONNTRACK, maps::CONNTRACK, size_of::<CtKey>(), size_of::<CtValue>()),
        (maps::PREV_SNAT, maps::SNAT, size_of::<CtKey>(), size_of::<SnatValue>()),
        (maps::PREV_CONNTRACK6, maps::CONNTRACK6, size_of::<CtKey6>(), size_of::<CtValue6>()),
        (maps::PREV_SNAT6, maps::SNAT6, size_of::<CtKey6>(), size_of::<SnatValue6>()),
    ];
    wanted
        .into_iter()
        .filter_map(|(fallback, name, key_size, value_size)| {
            let pin = previous(dir, name)?;
            let info = MapData::from_pin(&pin).ok()?.info().ok()?;
            let fits = info.key_size() as usize == key_size && info.value_size() as usize == value_size;
            fits.then(|| (fallback, pin, info.max_entries()))
        })
        .collect()
}

/// Whether an upgrade is under way: maps were set aside and the programs not yet swapped.
#[must_use]
pub fn upgrade_pending(dir: &Path) -> bool {
    std::fs::read_dir(dir.join(PREVIOUS)).is_ok_and(|mut d| d.next().is_some())
}

/// Unpins every previous map. The maps live on while the old programs hold them, and go with them.
pub fn drop_previous(dir: &Path) -> anyhow::Result<()> {
    let prev_dir = dir.join(PREVIOUS);
    if prev_dir.exists() {
        std::fs::remove_dir_all(&prev_dir).with_context(|| format!("removing {}", prev_dir.display()))?;
    }
    Ok(())
}

mod raw {
    //! `bpf(2)` element commands on byte buffers, for copying maps whose types the agent does not name.

    use std::os::fd::{AsRawFd as _, BorrowedFd};

    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    const LOOKUP: libc::c_long = 1;
    const UPDATE: libc::c_long = 2;
    const NEXT_KEY: libc::c_long = 4;

    fn call(cmd: libc::c_long, fd: BorrowedFd<'_>, key: u64, value: u64, flags: u64) -> std::io::Result<()> {
        let attr = ElemAttr { map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or_default(), pad: 0, key, value, flags };
        // SAFETY: `attr` is a valid bpf_attr prefix for the element commands; the caller's buffers are as
        // large as the map's key and value and outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(&attr), size_of::<ElemAttr>()) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }

    /// The key after `key` (the first with `None`) into `out`; false at the end.
    pub fn next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, out: &mut [u8]) -> std::io::Result<bool> {
        let k = key.map_or(0, |k| k.as_ptr() as u64);
        match call(NEXT_KEY, fd, k, out.as_mut_ptr() as u64, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value of `key` into `out`; false if there is none.
    pub fn lookup(fd: BorrowedFd<'_>, key: &[u8], out: &mut [u8]) -> std::io::Result<bool> {
        match call(LOOKUP, fd, key.as_ptr() as u64, out.as_mut_ptr() as u64, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `BPF_NOEXIST`: only where the key is not there yet.
    pub const NOEXIST: u64 = 1;

    pub fn update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<()> {
        call(UPDATE, fd, key.as_ptr() as u64, value.as_ptr() as u64, flags)
    }
}

/// `BPF_MAP_TYPE_*` numbers whose values are per CPU.
const PER_CPU_TYPES: [u32; 3] = [5, 6, 10];
/// `BPF_MAP_TYPE_*` numbers of arrays, whose every key always exists.
const ARRAY_TYPES: [u32; 2] = [2, 6];

/// How a copy treats keys the new map already has.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Replace them (service state copied into maps nothing uses yet).
    Yes,
    /// Keep them: the new programs may already have written newer entries (arrays are copied whole only
    /// with `Yes`).
    No,
}

/// Copies every entry of the map pinned at `from` into the map pinned at `to`, when both have the same
/// type, key size and value size. Returns the entries copied, or `None` if the layouts differ. Entries
/// that do not fit (a smaller table) end the copy with a warning; a map the data path changes meanwhile is
/// copied as it is met.
pub fn copy(from: &Path, to: &Path, overwrite: Overwrite) -> anyhow::Result<Option<usize>> {
    let src = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = MapData::from_pin(to).with_context(|| format!("opening {}", to.display()))?;
    let (si, di) = (src.info()?, dst.info()?);
    let same = si.key_size() == di.key_size()
        && si.value_size() == di.value_size()
        && si.map_type().ok().map(|t| t as u32) == di.map_type().ok().map(|t| t as u32);
    if !same {
        return Ok(None);
    }
    let type_number = si.map_type().ok().map_or(0, |t| t as u32);
    let flags = match overwrite {
        Overwrite::Yes => 0,
        Overwrite::No if ARRAY_TYPES.contains(&type_number) => return Ok(Some(0)),
        Overwrite::No => raw::NOEXIST,
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
    let value_len = if PER_CPU_TYPES.contains(&type_number) {
        (si.value_size() as usize).div_ceil(8) * 8 * cpus.get() as usize
    } else {
        si.value_size() as usize
    };
    // A walk restarts from the first key if the key it stands on is deleted meanwhile: bound it.
    let limit = 2 * si.max_entries() as usize + 16;
    copy_fds((src.fd().as_fd(), dst.fd().as_fd()), (si.key_size() as usize, value_len), (limit, flags), to).map(Some)
}

fn copy_fds(
    (src, dst): (BorrowedFd<'_>, BorrowedFd<'_>),
    (key_len, value_len): (usize, usize),
    (limit, flags): (usize, u64),
    to: &Path,
) -> anyhow::Result<usize> {
    let mut key = vec![0u8; key_len];
    let mut next = vec![0u8; key_len];
    let mut value = vec![0u8; value_len];
    let (mut copied, mut seen) = (0, 0);
    let mut first = true;
    while seen < limit && raw::next_key(src, (!first).then_some(&key[..]), &mut next)? {
        seen += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
        if !raw::lookup(src, &key, &mut value)? {
            continue;
        }
        match raw::update(dst, &key, &value, flags) {
            Ok(()) => copied += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                tracing::warn!(to = %to.display(), copied, error = %e, "the new map is full; the rest of the old one is not carried over");
                break;
            }
        }
    }
    Ok(copied)
}

/// Copies each of `names` from its previous pin into this build's, logging what was carried over.
pub fn migrate(dir: &Path, names: &[&str], overwrite: Overwrite) -> anyhow::Result<usize> {
    let mut total = 0;
    for name in names {
        let Some(prev) = previous(dir, name) else { continue };
        if let Some(n) = copy(&prev, &path(dir, name), overwrite)? {
            tracing::info!(map = name, entries = n, "upgrade: entries carried over from the previous map");
            total += n;
        } else if *name == maps::CONNTRACK
            && let Some(n) = legacy::convert(dir, &prev)?
        {
            tracing::info!(map = name, entries = n, "upgrade: entries converted from the previous layout");
            total += n;
        } else {
            tracing::warn!(
                map = *name,
                "upgrade: the previous map's layout differs and has no converter; its entries are not carried over"
            );
        }
    }
    Ok(total)
}

/// Whether the previous conntrack table can be read by the new programs during the swap (same layout); if
/// not, its entries are converted before the swap as well as after.
#[must_use]
pub fn conntrack_fallback_available(dir: &Path) -> bool {
    previous_for_fallback(dir).iter().any(|(name, _, _)| *name == maps::PREV_CONNTRACK)
}

mod legacy {
    //! The conntrack layout of the builds before layout versions (pins without `_vN`): the same keys, and a
    //! 12-byte value — backend id, reverse-NAT id, flags (bit 0: SNAT). Converted into this build's entries,
    //! with backends and frontends named from the previous `BACKENDS` and `REVNAT`, the flow taken as
    //! established (those builds kept no state).

    use std::path::Path;

    use anyhow::Context as _;
    use aya::maps::{HashMap, Map, MapData};
    use proxy_common::{
        backend::{Backend, FLAG_LOCAL},
        conntrack::{CtKey, CtValue, DIR_FORWARD, DIR_REPLY, FLAG_LOCAL_BACKEND, FLAG_SNAT, state},
        maps, proto,
        revnat::RevNat,
    };

    /// The legacy value: backend id, reverse-NAT id, flags.
    pub type Legacy = [u32; 3];

    /// This build's entry for a legacy one keyed `key`, if the backend or frontend it names is known.
    pub fn entry(
        key: &CtKey,
        old: Legacy,
        backend: impl Fn(u32) -> Option<Backend>,
        frontend: impl Fn(u32) -> Option<RevNat>,
        now: u32,
    ) -> Option<CtValue> {
        let [backend_id, rev_nat_id, old_flags] = old;
        let snat = if old_flags & 1 != 0 { FLAG_SNAT } else { 0 };
        let established = if key.proto == proto::TCP {
            state::SYN | state::SYN_ACK | state::ESTABLISHED | state::REPLIED
        } else {
            state::REPLIED
        };
        let base = CtValue {
            nat_addr: 0,
            nat_port: 0,
            client_port: 0,
            backend_id,
            rev_nat_id,
            flags: snat,
            state: 0,
            created: now,
            last_seen: now,
        };
        match key.dir {
            DIR_FORWARD => {
                let b = backend(backend_id)?;
                let local = if b.flags & FLAG_LOCAL != 0 { FLAG_LOCAL_BACKEND } else { 0 };
                Some(CtValue {
                    nat_addr: b.addr,
                    nat_port: b.port,
                    client_port: key.src_port,
                    flags: snat | local,
                    state: established,
                    ..base
                })
            }
            DIR_REPLY => {
                let f = frontend(rev_nat_id)?;
                Some(CtValue { nat_addr: f.addr, nat_port: f.port, client_port: key.dst_port, ..base })
            }
            _ => None,
        }
    }

    /// Converts the legacy table pinned at `prev` into this build's `CONNTRACK`, adding only entries it does
    /// not have. `None` if `prev` is not of the legacy layout.
    pub fn convert(dir: &Path, prev: &Path) -> anyhow::Result<Option<usize>> {
        let data = MapData::from_pin(prev).with_context(|| format!("opening {}", prev.display()))?;
        let info = data.info()?;
        if info.key_size() as usize != size_of::<CtKey>() || info.value_size() as usize != size_of::<Legacy>() {
            return Ok(None);
        }
        let old: HashMap<_, CtKey, Legacy> = HashMap::try_from(Map::from_map_data(data)?)?;
        let open = |name: &str| -> Option<Map> {
            let p = super::previous(dir, name)?;
            Map::from_map_data(MapData::from_pin(p).ok()?).ok()
        };
        let backends: Option<HashMap<_, u32, Backend>> = open(maps::BACKENDS).and_then(|m| HashMap::try_from(m).ok());
        let revnat: Option<HashMap<_, u32, RevNat>> = open(maps::REVNAT).and_then(|m| HashMap::try_from(m).ok());
        let new_pin = super::path(dir, maps::CONNTRACK);
        let new = MapData::from_pin(&new_pin).with_context(|| format!("opening {}", new_pin.display()))?;
        let mut new: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::from_map_data(new)?)?;
        let now = super::super::flow_table::now_secs();
        let mut converted = 0;
        for item in old.iter().take(2 * info.max_entries() as usize) {
            let Ok((key, value)) = item else { continue };
            let backend = |id| backends.as_ref()?.get(&id, 0).ok();
            let frontend = |id| revnat.as_ref()?.get(&id, 0).ok();
            let Some(entry) = entry(&key, value, backend, frontend, now) else { continue };
            // BPF_NOEXIST: what the new programs wrote since stays.
            if new.insert(&key, &entry, 1).is_ok() {
                converted += 1;
            }
        }
        Ok(Some(converted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy forward entry names its backend; its reply entry its frontend; both name each other as
    /// this build's entries must (the data path checks it).
    #[test]
    fn legacy_conntrack_entries_convert_into_a_consistent_pair() {
        use proxy_common::{
            backend::{Backend, FLAG_LOCAL},
            conntrack::{CtKey, DIR_FORWARD, DIR_REPLY, FLAG_LOCAL_BACKEND, FLAG_SNAT, state},
            proto,
            revnat::RevNat,
        };
        let (client, frontend, backend) = (0x0b01_c80a_u32, 0x0a00_200a_u32, 0x0c02_c80a_u32);
        let (cport, fport, bport) = (40_000u16.to_be(), 80u16.to_be(), 8080u16.to_be());
        let key = |src, dst, sp, dp, dir| CtKey {
            src_addr: src,
            dst_addr: dst,
            src_port: sp,
            dst_port: dp,
            proto: proto::TCP,
            dir,
            pad: 0,
        };
        let b = |id| (id == 7).then_some(Backend { addr: backend, port: bport, proto: proto::TCP, flags: FLAG_LOCAL });
        let f = |id| (id == 3).then_some(RevNat { addr: frontend, port: fport, pad: 0 });
        let fkey = key(client, frontend, cport, fport, DIR_FORWARD);
        let rkey = key(backend, client, bport, cport, DIR_REPLY);
        let fwd = legacy::entry(&fkey, [7, 3, 1], b, f, 100).unwrap();
        let rep = legacy::entry(&rkey, [7, 3, 1], b, f, 100).unwrap();
        assert_eq!((fwd.nat_addr, fwd.nat_port, fwd.client_port), (backend, bport, cport));
        assert_eq!(fwd.flags, FLAG_SNAT | FLAG_LOCAL_BACKEND);
        assert!(fwd.state & state::ESTABLISHED != 0, "taken as established");
        assert_eq!((rep.nat_addr, rep.nat_port, rep.client_port), (frontend, fport, cport));
        // The reply entry names the forward key, and the forward entry names the reply key.
        assert_eq!(
            (rkey.dst_addr, rep.nat_addr, rep.client_port, rep.nat_port),
            (fkey.src_addr, fkey.dst_addr, fkey.src_port, fkey.dst_port)
        );
        assert_eq!(
            (fwd.nat_addr, fkey.src_addr, fwd.nat_port, fwd.client_port),
            (rkey.src_addr, rkey.dst_addr, rkey.src_port, rkey.dst_port)
        );
        assert!(legacy::entry(&fkey, [8, 3, 0], b, f, 100).is_none(), "an unknown backend: no entry");
    }

    #[test]
    fn pin_names_carry_the_layout_version() {
        assert_eq!(path(Path::new("/p"), maps::CONNTRACK), Path::new("/p/CONNTRACK_v1"));
        assert!(is_version_of("CONNTRACK", "CONNTRACK") && is_version_of("CONNTRACK_v7", "CONNTRACK"));
        assert!(!is_version_of("CONNTRACK_OLD", "CONNTRACK") && !is_version_of("SNAT_v1", "CONNTRACK"));
        assert!(!is_version_of("CONNTRACK_vx", "CONNTRACK"));
        for (name, _) in maps::LAYOUTS {
            assert_eq!(maps::LAYOUTS.iter().filter(|(n, _)| *n == name).count(), 1, "{name} listed twice");
        }
    }
}
