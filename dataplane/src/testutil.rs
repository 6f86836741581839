//! A shared test topology (unit tests and benches).

use crate::model::{
    DesiredState, PortSpec, RouterPortSpec, RouterSpec, StaticRouteSpec, SwitchSpec,
};

/// Interfaces of [`topology`].
pub fn interfaces() -> Vec<String> {
    ["p0", "p1", "p2", "p3", "up"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn port(name: &str, switch: &str, interface: &str, mac: Option<&str>, ips: &[&str]) -> PortSpec {
    PortSpec {
        name: name.into(),
        switch: switch.into(),
        interface: interface.into(),
        mac: mac.map(Into::into),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        port_security: mac.is_some(),
    }
}

/// Switches a (10.0.1.0/24), b (10.0.2.0/24), v (10.0.3.0/24, VLAN 100);
/// vm1/vm2 on a, vm3 on b, vm4 on v, a learning uplink on a; router r joins
/// all three and routes 192.0.2.0/24 via vm3.
pub fn topology() -> DesiredState {
    DesiredState {
        switches: vec![
            SwitchSpec {
                name: "a".into(),
                subnet: "10.0.1.0/24".into(),
                vlan: None,
                subnet6: Some("fd00:1::/64".into()),
                dhcp: None,
            },
            SwitchSpec {
                name: "b".into(),
                subnet: "10.0.2.0/24".into(),
                vlan: None,
                subnet6: Some("fd00:2::/64".into()),
                dhcp: None,
            },
            SwitchSpec {
                name: "v".into(),
                subnet: "10.0.3.0/24".into(),
                vlan: Some(100),
                subnet6: None,
                dhcp: None,
            },
        ],
        ports: vec![
            port("vm1", "a", "p0", Some("02:00:00:00:00:01"), &["10.0.1.10"]),
            port(
                "vm2",
                "a",
                "p1",
                Some("02:00:00:00:00:02"),
                &["10.0.1.11", "fd00:1::11"],
            ),
            port(
                "vm3",
                "b",
                "p2",
                Some("02:00:00:00:00:03"),
                &["10.0.2.10", "fd00:2::10"],
            ),
            port("vm4", "v", "p3", Some("02:00:00:00:00:04"), &["10.0.3.10"]),
            port("uplink", "a", "up", None, &[]),
        ],
        routers: vec![RouterSpec {
            name: "r".into(),
            ports: vec![
                RouterPortSpec {
                    switch: "a".into(),
                    mac: "02:00:00:00:ff:01".into(),
                    ip: "10.0.1.1".into(),
                    ip6: Some("fd00:1::1".into()),
                },
                RouterPortSpec {
                    switch: "b".into(),
                    mac: "02:00:00:00:ff:02".into(),
                    ip: "10.0.2.1".into(),
                    ip6: Some("fd00:2::1".into()),
                },
                RouterPortSpec {
                    switch: "v".into(),
                    mac: "02:00:00:00:ff:03".into(),
                    ip: "10.0.3.1".into(),
                    ip6: None,
                },
            ],
            static_routes: vec![StaticRouteSpec {
                prefix: "192.0.2.0/24".into(),
                next_hop: "10.0.2.10".into(),
            }],
        }],
        ..DesiredState::default()
    }
}

/// Interfaces of [`overlay_topology`]: [`interfaces`] plus the underlay `ul`.
pub fn overlay_interfaces() -> Vec<String> {
    let mut i = interfaces();
    i.push("ul".into());
    i
}

/// [`topology`] on host 198.18.0.1 (underlay `ul`): switches a (VNI 100)
/// and b (VNI 200) span hosts; `rvm_a` (10.0.1.50) and `rvm_b`
/// (10.0.2.50) are on the host at 198.18.0.2.
pub fn overlay_topology(encapsulation: crate::overlay::Encapsulation) -> DesiredState {
    use crate::overlay::{EndpointSpec, OverlaySpec, OverlaySwitchSpec, RemotePortSpec};
    let remote = |name: &str, switch: &str, mac: &str, ips: &[&str]| RemotePortSpec {
        name: name.into(),
        switch: switch.into(),
        endpoint: "198.18.0.2".into(),
        mac: mac.into(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
    };
    DesiredState {
        overlay: Some(Box::new(OverlaySpec {
            interface: "ul".into(),
            local_ip: "198.18.0.1".into(),
            local_mac: "02:00:00:00:aa:01".into(),
            encapsulation,
            mtu: 1500,
            switches: vec![
                OverlaySwitchSpec {
                    switch: "a".into(),
                    vni: 100,
                },
                OverlaySwitchSpec {
                    switch: "b".into(),
                    vni: 200,
                },
            ],
            endpoints: vec![EndpointSpec {
                ip: "198.18.0.2".into(),
                mac: "02:00:00:00:aa:02".into(),
            }],
            remote_ports: vec![
                remote(
                    "rvm_a",
                    "a",
                    "02:00:00:00:00:50",
                    &["10.0.1.50", "fd00:1::50"],
                ),
                remote(
                    "rvm_b",
                    "b",
                    "02:00:00:00:00:51",
                    &["10.0.2.50", "fd00:2::50"],
                ),
            ],
        })),
        ..topology()
    }
}
