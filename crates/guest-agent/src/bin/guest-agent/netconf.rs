//! `configure_interface`, carried out with the `ip` tool (busybox in the guest).

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use guest_agent::protocol::{parse_cidr, ConfiguredInterface, InterfaceConfig};

use crate::interfaces;

/// The `ip` program; `PATH` is searched.
const IP: &str = "ip";

/// Finds the interface with `config.mac` and applies `config`: its new MAC, MTU, then
/// the addresses (replacing existing ones), link up, then routes. An interface that has
/// `set_mac` already (a repeated request) is the one.
pub fn configure(sys_root: &Path, config: &InterfaceConfig) -> Result<ConfiguredInterface, String> {
    let commands = plan_for_validated(config)?;
    let mut name = interfaces::find_by_mac(sys_root, &config.mac)?;
    if let (None, Some(new)) = (&name, &config.set_mac) {
        name = interfaces::find_by_mac(sys_root, new)?;
    }
    let name = name.ok_or_else(|| format!("No interface has MAC {}", config.mac))?;
    for args in commands(&name) {
        run_ip(&args)?;
    }
    Ok(ConfiguredInterface { name })
}

/// Checks `config` and returns the `ip` argument lists for an interface name.
fn plan_for_validated(
    config: &InterfaceConfig,
) -> Result<impl Fn(&str) -> Vec<Vec<String>> + '_, String> {
    if let Some(mac) = &config.set_mac {
        check_unicast_mac(mac)?;
    }
    for address in &config.addresses {
        parse_cidr(address)
            .ok_or_else(|| format!("Address {address:?} is not in CIDR notation"))?;
    }
    if let Some(mtu) = config.mtu {
        if !(68..=65535).contains(&mtu) {
            return Err(format!("MTU {mtu} is outside 68..=65535"));
        }
    }
    for route in &config.routes {
        if route.dest != "default" && parse_cidr(&route.dest).is_none() {
            return Err(format!(
                "Route destination {:?} is neither \"default\" nor CIDR",
                route.dest
            ));
        }
        if let Some(gateway) = &route.gateway {
            gateway
                .parse::<IpAddr>()
                .map_err(|_| format!("Route gateway {gateway:?} is not an IP address"))?;
        }
    }
    Ok(move |name: &str| plan(config, name))
}

/// The `ip` invocations that apply `config` to interface `name`, in order.
fn plan(config: &InterfaceConfig, name: &str) -> Vec<Vec<String>> {
    let words = |list: &[&str]| {
        list.iter()
            .map(|word| (*word).to_owned())
            .collect::<Vec<_>>()
    };
    let mut commands = Vec::new();
    if let Some(mac) = &config.set_mac {
        commands.push(words(&["link", "set", "dev", name, "address", mac]));
    }
    if let Some(mtu) = config.mtu {
        commands.push(words(&[
            "link",
            "set",
            "dev",
            name,
            "mtu",
            &mtu.to_string(),
        ]));
    }
    commands.push(words(&["addr", "flush", "dev", name]));
    for address in &config.addresses {
        commands.push(words(&["addr", "add", address, "dev", name]));
    }
    commands.push(words(&["link", "set", "dev", name, "up"]));
    for route in &config.routes {
        let mut command = words(&["route", "replace", &route.dest]);
        if let Some(gateway) = &route.gateway {
            command.extend(words(&["via", gateway]));
        }
        command.extend(words(&["dev", name]));
        commands.push(command);
    }
    commands
}

/// `mac` is six colon-separated hex octets naming one host (the group bit clear).
fn check_unicast_mac(mac: &str) -> Result<(), String> {
    let octets: Vec<Option<u8>> = mac
        .split(':')
        .map(|o| {
            (o.len() == 2)
                .then(|| u8::from_str_radix(o, 16).ok())
                .flatten()
        })
        .collect();
    match octets.as_slice() {
        [Some(first), rest @ ..] if rest.len() == 5 && rest.iter().all(Option::is_some) => {
            if first & 1 == 1 {
                return Err(format!(
                    "MAC {mac} is a multicast address; an interface needs a unicast one"
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "MAC {mac:?} is not six colon-separated hex octets (02:00:00:00:00:10)"
        )),
    }
}

fn run_ip(args: &[String]) -> Result<(), String> {
    let shown = format!("{IP} {}", args.join(" "));
    let output = Command::new(IP)
        .args(args)
        .output()
        .map_err(|e| format!("Running `{shown}`: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::RouteConfig;

    fn config() -> InterfaceConfig {
        InterfaceConfig {
            mac: "02:00:00:00:00:10".into(),
            set_mac: None,
            addresses: vec!["10.0.0.2/24".into(), "fd00::2/64".into()],
            mtu: Some(1400),
            routes: vec![
                RouteConfig {
                    dest: "default".into(),
                    gateway: Some("10.0.0.1".into()),
                },
                RouteConfig {
                    dest: "192.168.7.0/24".into(),
                    gateway: None,
                },
            ],
        }
    }

    fn joined(commands: Vec<Vec<String>>) -> Vec<String> {
        commands.into_iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn plan_sets_mtu_replaces_addresses_then_brings_up_and_routes() {
        assert_eq!(
            joined(plan(&config(), "eth0")),
            [
                "link set dev eth0 mtu 1400",
                "addr flush dev eth0",
                "addr add 10.0.0.2/24 dev eth0",
                "addr add fd00::2/64 dev eth0",
                "link set dev eth0 up",
                "route replace default via 10.0.0.1 dev eth0",
                "route replace 192.168.7.0/24 dev eth0",
            ]
        );
    }

    #[test]
    fn bad_input_is_rejected_before_anything_runs() {
        let mut bad = config();
        bad.addresses.push("10.0.0.3".into());
        assert!(plan_for_validated(&bad).err().unwrap().contains("CIDR"));
        let mut bad = config();
        bad.mtu = Some(20);
        assert!(plan_for_validated(&bad).err().unwrap().contains("MTU"));
        let mut bad = config();
        bad.routes[0].gateway = Some("gw; reboot".into());
        assert!(plan_for_validated(&bad).err().unwrap().contains("gateway"));
        for (mac, says) in [
            ("03:00:00:00:00:10", "multicast"),
            ("02:00:00:00:00", "six"),
            ("02:00:00:00:00:1g", "six"),
            ("02:00:00:00:00:100", "six"),
            ("02:00:00:00:00:10 up", "six"),
        ] {
            let mut bad = config();
            bad.set_mac = Some(mac.into());
            let e = plan_for_validated(&bad).err().unwrap();
            assert!(e.contains(says), "{mac}: {e}");
        }
        assert!(plan_for_validated(&config()).is_ok());
    }

    #[test]
    fn a_new_mac_is_set_before_anything_else() {
        let mut c = config();
        c.set_mac = Some("02:aa:00:00:00:01".into());
        let commands = joined(plan(&c, "eth0"));
        assert_eq!(commands[0], "link set dev eth0 address 02:aa:00:00:00:01");
        assert_eq!(commands[1], "link set dev eth0 mtu 1400");
    }

    #[test]
    fn unknown_mac_is_an_error() {
        let sys = tempfile::tempdir().unwrap();
        crate::interfaces::tests::fake_interface(
            sys.path(),
            "eth0",
            "02:00:00:00:00:11",
            "0x1003",
            1500,
            1,
        );
        let error = configure(sys.path(), &config()).unwrap_err();
        assert_eq!(error, "No interface has MAC 02:00:00:00:00:10");
    }
}
