//! Network interfaces as sysfs and `getifaddrs` describe them.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::Path;

use guest_agent::protocol::InterfaceInfo;
use nix::ifaddrs::getifaddrs;
use nix::sys::socket::SockaddrStorage;

/// `IFF_UP` in `/sys/class/net/IF/flags`.
const IFF_UP: u32 = 0x1;

/// Addresses in CIDR notation, keyed by interface name.
pub type AddressMap = BTreeMap<String, Vec<String>>;

/// All interfaces of the running guest, sorted by name.
pub fn list(sys_root: &Path) -> Result<Vec<InterfaceInfo>, String> {
    read_interfaces(sys_root, &current_addresses()?)
}

/// Interfaces under `SYS_ROOT/class/net`, with addresses taken from `addresses`.
pub fn read_interfaces(
    sys_root: &Path,
    addresses: &AddressMap,
) -> Result<Vec<InterfaceInfo>, String> {
    let mut list = Vec::new();
    for name in interface_names(sys_root)? {
        let dir = sys_root.join("class/net").join(&name);
        let flags = read_trimmed(&dir.join("flags"))
            .and_then(|text| u32::from_str_radix(text.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        list.push(InterfaceInfo {
            mac: read_trimmed(&dir.join("address"))
                .map(|mac| mac.to_ascii_lowercase())
                .filter(|mac| !mac.is_empty()),
            addresses: addresses.get(&name).cloned().unwrap_or_default(),
            up: flags & IFF_UP != 0,
            operstate: read_trimmed(&dir.join("operstate")).unwrap_or_else(|| "unknown".to_owned()),
            mtu: read_trimmed(&dir.join("mtu"))
                .and_then(|mtu| mtu.parse().ok())
                .unwrap_or(0),
            rx_queues: count_prefixed(&dir.join("queues"), "rx-"),
            tx_queues: count_prefixed(&dir.join("queues"), "tx-"),
            name,
        });
    }
    Ok(list)
}

/// Name of the interface whose MAC is `mac` (compared case-insensitively).
pub fn find_by_mac(sys_root: &Path, mac: &str) -> Result<Option<String>, String> {
    let wanted = mac.trim().to_ascii_lowercase();
    for name in interface_names(sys_root)? {
        let address = read_trimmed(&sys_root.join("class/net").join(&name).join("address"));
        if address.is_some_and(|address| address.to_ascii_lowercase() == wanted) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

fn interface_names(sys_root: &Path) -> Result<Vec<String>, String> {
    let dir = sys_root.join("class/net");
    let entries = fs::read_dir(&dir).map_err(|e| format!("Reading {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

fn count_prefixed(dir: &Path, prefix: &str) -> u32 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let count = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(prefix))
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// IPv4 and IPv6 addresses of every interface, from `getifaddrs`.
fn current_addresses() -> Result<AddressMap, String> {
    let mut map = AddressMap::new();
    for entry in getifaddrs().map_err(|e| format!("Listing interface addresses: {e}"))? {
        let (Some(address), Some(netmask)) = (entry.address, entry.netmask) else {
            continue;
        };
        if let Some((ip, prefix)) = ip_and_prefix(&address, &netmask) {
            map.entry(entry.interface_name)
                .or_default()
                .push(format!("{ip}/{prefix}"));
        }
    }
    Ok(map)
}

fn ip_and_prefix(address: &SockaddrStorage, netmask: &SockaddrStorage) -> Option<(IpAddr, u32)> {
    if let (Some(address), Some(netmask)) = (address.as_sockaddr_in(), netmask.as_sockaddr_in()) {
        return Some((
            IpAddr::V4(address.ip()),
            netmask.ip().to_bits().count_ones(),
        ));
    }
    if let (Some(address), Some(netmask)) = (address.as_sockaddr_in6(), netmask.as_sockaddr_in6()) {
        return Some((
            IpAddr::V6(address.ip()),
            netmask.ip().to_bits().count_ones(),
        ));
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a fake `/sys/class/net/NAME` with the given attributes and queues.
    pub(crate) fn fake_interface(
        sys: &Path,
        name: &str,
        mac: &str,
        flags: &str,
        mtu: u32,
        queues: u32,
    ) {
        let dir = sys.join("class/net").join(name);
        fs::create_dir_all(dir.join("queues")).unwrap();
        fs::write(dir.join("address"), format!("{mac}\n")).unwrap();
        fs::write(dir.join("flags"), format!("{flags}\n")).unwrap();
        fs::write(dir.join("mtu"), format!("{mtu}\n")).unwrap();
        fs::write(
            dir.join("operstate"),
            if flags == "0x1003" { "up\n" } else { "down\n" },
        )
        .unwrap();
        for queue in 0..queues {
            fs::create_dir(dir.join("queues").join(format!("rx-{queue}"))).unwrap();
            fs::create_dir(dir.join("queues").join(format!("tx-{queue}"))).unwrap();
        }
    }

    #[test]
    fn interfaces_are_read_from_a_fake_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        fake_interface(sys.path(), "lo", "00:00:00:00:00:00", "0x9", 65536, 1);
        fake_interface(sys.path(), "eth0", "02:00:00:00:00:1A", "0x1003", 1500, 4);
        fake_interface(sys.path(), "eth1", "02:00:00:00:00:11", "0x1002", 9000, 1);
        let addresses = AddressMap::from([("eth0".to_owned(), vec!["10.0.0.2/24".to_owned()])]);

        let list = read_interfaces(sys.path(), &addresses).unwrap();

        let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1", "lo"]);
        let eth0 = &list[0];
        assert_eq!(eth0.mac.as_deref(), Some("02:00:00:00:00:1a"));
        assert_eq!(eth0.addresses, ["10.0.0.2/24"]);
        assert!(eth0.up);
        assert_eq!(eth0.operstate, "up");
        assert_eq!((eth0.mtu, eth0.rx_queues, eth0.tx_queues), (1500, 4, 4));
        let eth1 = &list[1];
        assert!(!eth1.up && eth1.addresses.is_empty());
        assert_eq!(
            (eth1.operstate.as_str(), eth1.mtu, eth1.rx_queues),
            ("down", 9000, 1)
        );
        assert!(list[2].up);
    }

    #[test]
    fn interface_is_found_by_mac_in_any_case() {
        let sys = tempfile::tempdir().unwrap();
        fake_interface(sys.path(), "eth0", "02:00:00:00:00:1a", "0x1003", 1500, 1);
        assert_eq!(
            find_by_mac(sys.path(), "02:00:00:00:00:1A")
                .unwrap()
                .as_deref(),
            Some("eth0")
        );
        assert_eq!(find_by_mac(sys.path(), "02:00:00:00:00:99").unwrap(), None);
    }

    #[test]
    fn missing_sysfs_is_an_error() {
        let sys = tempfile::tempdir().unwrap();
        assert!(read_interfaces(sys.path(), &AddressMap::new())
            .unwrap_err()
            .starts_with("Reading "));
    }

    #[test]
    fn netmasks_become_prefix_lengths() {
        use std::net::{SocketAddrV4, SocketAddrV6};
        let v4 = |ip: &str| SockaddrStorage::from(SocketAddrV4::new(ip.parse().unwrap(), 0));
        let v6 = |ip: &str| SockaddrStorage::from(SocketAddrV6::new(ip.parse().unwrap(), 0, 0, 0));
        assert_eq!(
            ip_and_prefix(&v4("10.0.0.2"), &v4("255.255.255.0")),
            Some(("10.0.0.2".parse().unwrap(), 24))
        );
        assert_eq!(
            ip_and_prefix(&v6("fd00::2"), &v6("ffff:ffff:ffff:ffff::")),
            Some(("fd00::2".parse().unwrap(), 64))
        );
        assert_eq!(ip_and_prefix(&v4("10.0.0.2"), &v6("ffff::")), None);
    }
}
