use crate::config::{compile, ConfigError, ConfigHandle};
use crate::model::{RouterPortSpec, SwitchSpec};
use crate::testutil::{interfaces, topology};

fn err(state: &crate::model::DesiredState) -> ConfigError {
    compile(state, &interfaces(), 1).unwrap_err()
}

#[test]
fn topology_compiles() {
    let t = compile(&topology(), &interfaces(), 1).unwrap();
    assert_eq!(t.lports.len(), 5);
    assert_eq!(t.switches[2].vlan, 100);
    assert_eq!(t.routers[0].routes.len(), 4);
    // Bindings and gateway are both in the ARP responder's table.
    assert_eq!(t.switches[0].arp.len(), 3);
}

#[test]
fn every_invalid_reference_is_named() {
    let mut s = topology();
    s.ports[1].mac = Some("02:00:00:00:00:01".into());
    assert!(
        matches!(err(&s), ConfigError::DuplicateMac { ref first, ref second, .. } if first == "vm1" && second == "vm2")
    );

    let mut s = topology();
    s.ports[1].ips = vec!["10.0.1.10".into()];
    assert!(matches!(err(&s), ConfigError::DuplicateIp { ref first, .. } if first == "vm1"));

    let mut s = topology();
    s.ports[1].ips = vec!["10.0.1.1".into()]; // the gateway's address
    assert!(matches!(err(&s), ConfigError::DuplicateIp { .. }));

    let mut s = topology();
    s.switches.push(SwitchSpec {
        name: "c".into(),
        subnet: "10.0.0.0/16".into(),
        vlan: None,
        subnet6: None,
        dhcp: None,
    });
    s.routers[0].ports.push(RouterPortSpec {
        switch: "c".into(),
        mac: "02:00:00:00:ff:09".into(),
        ip: "10.0.9.1".into(),
        ip6: None,
    });
    assert!(matches!(err(&s), ConfigError::OverlappingSubnets { ref router, .. } if router == "r"));

    let mut s = topology();
    s.ports[0].switch = "nope".into();
    assert!(matches!(err(&s), ConfigError::UnknownSwitch { ref switch, .. } if switch == "nope"));

    let mut s = topology();
    s.ports[0].interface = "eth9".into();
    assert!(
        matches!(err(&s), ConfigError::UnknownInterface { ref interface, .. } if interface == "eth9")
    );

    for bad in ["10.0.1.0", "10.0.1.1/24", "10.0.1.0/33", "ten/8"] {
        let mut s = topology();
        s.switches[0].subnet = bad.into();
        assert!(matches!(err(&s), ConfigError::BadSubnet { .. }), "{bad}");
    }

    let mut s = topology();
    s.switches[2].vlan = Some(4095);
    assert!(matches!(err(&s), ConfigError::BadVlan { vlan: 4095, .. }));

    let mut s = topology();
    s.ports[0].ips = vec!["10.0.2.99".into()];
    assert!(matches!(err(&s), ConfigError::IpOutsideSubnet { .. }));

    let mut s = topology();
    s.ports[0].mac = Some("ff:ff:ff:ff:ff:ff".into());
    assert!(matches!(err(&s), ConfigError::BadMac { .. }));

    let mut s = topology();
    s.ports[0].mac = None;
    assert!(matches!(
        err(&s),
        ConfigError::PortSecurityWithoutMac { .. }
    ));

    let mut s = topology();
    s.ports[0].name = "vm2".into();
    assert!(matches!(
        err(&s),
        ConfigError::DuplicateName { kind: "port", .. }
    ));

    let mut s = topology();
    s.routers[0].static_routes[0].next_hop = "172.16.0.1".into();
    assert!(matches!(err(&s), ConfigError::UnreachableNextHop { .. }));

    let mut s = topology();
    s.ports[4].interface = "p0".into(); // learning port sharing vm1's interface
    assert!(matches!(err(&s), ConfigError::AmbiguousIngress { .. }));
}

#[test]
fn invalid_apply_leaves_running_tables_untouched() {
    let handle = ConfigHandle::new(interfaces());
    assert_eq!(handle.apply(topology()).unwrap(), 1);
    let before = handle.tables().load_full();
    let mut bad = topology();
    bad.ports[1].mac = Some("02:00:00:00:00:01".into());
    let e = handle.apply(bad).unwrap_err();
    assert!(e.to_string().contains("bound twice"), "{e}");
    let after = handle.tables().load_full();
    assert!(std::sync::Arc::ptr_eq(&before, &after));
    assert_eq!(handle.desired(), topology());
    assert_eq!(handle.apply(topology()).unwrap(), 2);
}

#[test]
fn desired_state_json_rejects_unknown_fields() {
    let json = serde_json::to_string(&topology()).unwrap();
    let back: crate::model::DesiredState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, topology());
    let e = serde_json::from_str::<crate::model::DesiredState>(r#"{"switches":[],"bogus":1}"#)
        .unwrap_err();
    assert!(e.to_string().contains("bogus"));
}

#[test]
fn ipv6_router_config_is_checked() {
    let mut s = topology();
    s.routers[0].ports[0].ip6 = Some("fd00:9::1".into());
    assert!(matches!(err(&s), ConfigError::BadIpv6 { .. }));
    let mut s = topology();
    s.switches[1].subnet6 = Some("fd00:1::/48".into());
    s.routers[0].ports[1].ip6 = Some("fd00:1:0:1::1".into());
    assert!(matches!(err(&s), ConfigError::OverlappingSubnets6 { .. }));
    let mut s = topology();
    s.switches[0].subnet6 = Some("fd00:1::1/64".into());
    assert!(matches!(err(&s), ConfigError::BadIpv6 { .. }));
    let mut s = topology();
    s.ports[0].ips.push("fd00:1::1".into()); // the gateway's
    assert!(matches!(err(&s), ConfigError::DuplicateIp { .. }));
}
