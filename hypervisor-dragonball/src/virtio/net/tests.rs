//! Unit tests of the virtio-net device.

use super::*;

fn dev(mtu: Option<u32>) -> NetDevice {
    mq_dev(mtu, 1)
}

fn mq_dev(mtu: Option<u32>, pairs: u16) -> NetDevice {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    NetDevice::new(
        "tap0",
        None,
        "02:00:00:00:00:01".parse().unwrap(),
        mtu,
        None,
        pairs,
        log,
    )
}

#[test]
fn config_space_has_the_mac_one_queue_pair_and_the_mtu() {
    let d = dev(Some(9000));
    let mut cfg = [0u8; 12];
    d.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    assert_ne!(d.features() & bit(VIRTIO_NET_F_MTU), 0);
    assert_eq!(dev(None).features() & bit(VIRTIO_NET_F_MTU), 0);
    assert_eq!(d.features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_eq!(d.features() & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(d.queue_max_sizes().len(), 2);
    assert_eq!(d.ctrl_queue(), None);
}

#[test]
fn several_pairs_offer_mq_with_a_control_queue_after_the_pairs() {
    let d = mq_dev(None, 3);
    let mut cfg = [0u8; 2];
    d.read_config(8, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 3, "max_virtqueue_pairs");
    let f = d.features();
    assert_ne!(f & bit(VIRTIO_NET_F_MQ), 0);
    assert_ne!(f & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(d.queue_max_sizes(), vec![256, 256, 256, 256, 256, 256, 64]);
    assert_eq!(d.ctrl_queue(), Some(6));
}

#[test]
fn vq_pairs_set_accepts_one_to_the_maximum_and_refuses_other_commands() {
    let mut d = mq_dev(None, 2);
    let set = |n: u16| {
        let [lo, hi] = n.to_le_bytes();
        [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, lo, hi]
    };
    assert_eq!(d.ctrl_command(&set(2)), VIRTIO_NET_OK);
    assert_eq!(d.enabled_pairs(), 2);
    assert_eq!(d.ctrl_command(&set(3)), VIRTIO_NET_ERR);
    assert_eq!(d.ctrl_command(&set(0)), VIRTIO_NET_ERR);
    assert_eq!(d.enabled_pairs(), 2);
    assert_eq!(d.ctrl_command(&set(1)), VIRTIO_NET_OK);
    assert_eq!(d.enabled_pairs(), 1);
    // Truncated data, and the RX-mode class (not offered).
    assert_eq!(
        d.ctrl_command(&[VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 2]),
        VIRTIO_NET_ERR
    );
    assert_eq!(d.ctrl_command(&[0, 0, 1]), VIRTIO_NET_ERR);
}

#[test]
fn mq_without_the_control_queue_is_refused_at_activation() {
    let mut d = mq_dev(None, 2);
    let err = d
        .activate(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MQ))
        .unwrap_err();
    assert!(
        matches!(
            err,
            crate::virtio::ActivateError::MissingFeature {
                needs: "VIRTIO_NET_F_CTRL_VQ",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn tap_offloads_follow_the_guest_features() {
    assert_eq!(tap_offloads(bit(VIRTIO_F_VERSION_1)), 0);
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)),
        0,
        "TSO needs CSUM"
    );
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4
    );
}

#[test]
fn a_missing_tap_is_an_error_and_nothing_is_created() {
    let mut d = dev(None);
    d.tap_name = "dbmissing0".into();
    let err = d.open_backend().unwrap_err().to_string();
    assert!(err.contains("\"dbmissing0\" does not exist"), "{err}");
    assert!(nix::net::if_::if_nametoindex("dbmissing0").is_err());
}
