//! `plan` and `detach_planned` in a real namespace the test creates (veths, a foreign
//! ingress qdisc, a TAP of the planned name): a plan names only what `attach` will add,
//! and `detach_planned` removes exactly that. Needs root (namespaces, tc).

use std::process::Command;

use endpoint::{AttachOptions, Error, NetnsHandle, TapHandoff};

/// Runs `program -n NS ARGS` (ip or tc) and returns its stdout.
fn in_ns(program: &str, ns: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} -n {ns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(ns: &str, args: &[&str]) {
    in_ns("ip", ns, args);
}

fn tc(ns: &str, args: &[&str]) -> String {
    in_ns("tc", ns, args)
}

fn links(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link"])
        .output()
        .unwrap();
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_plan_names_nothing_that_exists_and_detach_planned_removes_what_attach_added() {
    assert!(is_root(), "this test needs root (network namespaces, tc)");
    let ns = netdev::NetNs::create(&format!("epplan-{}", std::process::id())).unwrap();
    let name = ns.name().to_string();
    ip(
        &name,
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
    );
    ip(&name, &["link", "set", "v0", "up"]);
    ip(&name, &["link", "set", "v1", "up"]);
    let handle = NetnsHandle::connect(ns.path()).await.unwrap();
    let opts = AttachOptions::default();

    // Another tool's ingress on v1: refused before anything is planned, and left alone.
    tc(&name, &["qdisc", "add", "dev", "v1", "ingress"]);
    let snapshot = endpoint::scan(&handle).await.unwrap();
    let err = endpoint::plan(&handle, &snapshot, &opts).await.unwrap_err();
    assert!(matches!(&err, Error::IngressBusy(i) if i == "v1"), "{err}");
    assert!(tc(&name, &["qdisc", "show", "dev", "v1"]).contains("ingress"));
    tc(&name, &["qdisc", "del", "dev", "v1", "ingress"]);

    // A TAP of a planned name (another sandbox's): refused, naming it.
    ip(&name, &["tuntap", "add", "tap1_kata", "mode", "tap"]);
    let snapshot = endpoint::scan(&handle).await.unwrap();
    let err = endpoint::plan(&handle, &snapshot, &opts).await.unwrap_err();
    assert!(
        matches!(&err, Error::TapExists { tap, .. } if tap == "tap1_kata"),
        "{err}"
    );
    ip(&name, &["link", "del", "tap1_kata"]);

    let before = (links(&name), tc(&name, &["qdisc", "show"]));
    for handoff in [TapHandoff::Fds, TapHandoff::Name] {
        let opts = AttachOptions { queues: 1, handoff };
        let snapshot = endpoint::scan(&handle).await.unwrap();
        let plans = endpoint::plan(&handle, &snapshot, &opts).await.unwrap();
        let taps: Vec<&str> = plans.iter().map(|p| p.tap.as_str()).collect();
        assert_eq!(taps, ["tap0_kata", "tap1_kata"]);
        let endpoints = endpoint::attach(&handle, &snapshot, &opts).await.unwrap();
        let attached: Vec<&str> = endpoints.iter().map(|e| e.tap_name.as_str()).collect();
        assert_eq!(attached, taps, "attach added other TAPs than planned");
        assert!(tc(&name, &["qdisc", "show", "dev", "v0"]).contains("ingress"));
        // The owner dies: TAPs handed over as fds go with them, persistent ones stay.
        drop(endpoints);

        for plan in &plans {
            let removed = endpoint::detach_planned(&handle, plan).await.unwrap();
            let mut expected = vec![format!("ingress qdisc of {}", plan.interface)];
            if handoff == TapHandoff::Name {
                expected.push(format!("ingress qdisc of {}", plan.tap));
                expected.push(format!("TAP {}", plan.tap));
            }
            assert_eq!(removed, expected, "{handoff:?}");
            // Done twice, it finds nothing.
            let again = endpoint::detach_planned(&handle, plan).await.unwrap();
            assert_eq!(again, Vec::<String>::new());
        }
        assert_eq!(
            (links(&name), tc(&name, &["qdisc", "show"])),
            before,
            "{handoff:?}"
        );
    }
    drop(handle);
    ns.delete().unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
