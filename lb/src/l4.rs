//! Load balancers whose VIP is on a VPC subnet. Those are not served by the
//! proxy (a host process cannot own an address inside a tenant's network)
//! but by the data plane's L4 balancer in the subnet's router
//! ([`keel_dataplane::lb4`]): Maglev consistent hashing, DNAT with the
//! client address preserved, conntrack affinity. This module checks an
//! Octavia document for what that balancer can do and compiles every
//! listener into one data-plane load balancer, so the API (which refuses
//! what cannot be served) and the host agent (which serves it) agree.
//!
//! What a VPC VIP supports: TCP and UDP listeners and pools,
//! `SOURCE_IP_PORT` (each connection hashed on its own) and `SOURCE_IP`
//! (a client's connections together; also `SOURCE_IP` persistence),
//! weights (0 drains), members disabled by `admin_state_up` (drained), TCP
//! health monitors on TCP pools, UDP-CONNECT on UDP pools and PING on any
//! (probed by the data plane, [`keel_dataplane::lb4_health`]). Refused with the reason:
//! HTTP/HTTPS/TERMINATED_HTTPS (L7 needs a host VIP), round robin and least
//! connections, other monitor types, backup members, connection limits,
//! IPv6. Timeouts are the data plane's connection-tracking ones.

use std::collections::HashSet;
use std::net::IpAddr;

use keel_dataplane::lb4::{
    LbHash, LbMemberSpec, LbMonitorSpec, LbProtocol, LoadBalancerSpec, ProbeKind,
};

use crate::model::{
    HealthMonitor, LbAlgorithm, Listener, ListenerProtocol, LoadBalancer, MonitorType,
    PersistenceType, Pool, PoolProtocol,
};
use crate::plan::{compile_monitor, range, ValidationError};

/// Why an L7 feature is refused on a VPC VIP.
const L7: &str = "on a VPC VIP (the data plane balances TCP and UDP; HTTP needs a host VIP)";

fn unsupported(at: &str, what: String) -> ValidationError {
    ValidationError::Unsupported {
        at: at.to_owned(),
        what,
    }
}

fn transport(l: ListenerProtocol) -> Option<LbProtocol> {
    match l {
        ListenerProtocol::Tcp => Some(LbProtocol::Tcp),
        ListenerProtocol::Udp => Some(LbProtocol::Udp),
        _ => None,
    }
}

/// A checked pool: how it hashes and its members (disabled ones drained).
struct L4Pool<'a> {
    pool: &'a Pool,
    hash: LbHash,
    monitor: Option<LbMonitorSpec>,
    members: Vec<LbMemberSpec>,
}

/// The data plane's probes for a TCP monitor (disabled: none).
fn check_monitor(
    hm: &HealthMonitor,
    protocol: PoolProtocol,
    at: &str,
) -> Result<Option<LbMonitorSpec>, ValidationError> {
    let kind = match (hm.kind, protocol) {
        (MonitorType::Tcp, PoolProtocol::Tcp) => ProbeKind::Tcp,
        (MonitorType::Ping, _) => ProbeKind::Ping,
        (MonitorType::UdpConnect, PoolProtocol::Udp) => ProbeKind::UdpConnect,
        _ => {
            return Err(unsupported(
                at,
                format!(
                    "a {} monitor on a {} pool of a VPC VIP (the data plane probes TCP \
                 connects to TCP members, UDP-CONNECT to UDP members, or pings)",
                    format!("{:?}", hm.kind).to_uppercase(),
                    format!("{protocol:?}").to_uppercase()
                ),
            ))
        }
    };
    // Ranges as the proxy checks them (its monitor types aside).
    compile_monitor(
        &HealthMonitor {
            kind: MonitorType::Tcp,
            ..hm.clone()
        },
        at,
    )?;
    if hm.delay > 3600 {
        return Err(range(
            format!("{at} healthmonitor"),
            "delay",
            i64::from(hm.delay),
            "1-3600 s",
        ));
    }
    let narrow = |v: u32| u8::try_from(v).unwrap_or(u8::MAX);
    Ok(hm.admin_state_up.then(|| LbMonitorSpec {
        kind,
        interval_ms: hm.delay * 1000,
        timeout_ms: hm.timeout * 1000,
        rise: narrow(hm.max_retries),
        fall: narrow(hm.max_retries_down),
    }))
}

fn check_pool(pool: &Pool) -> Result<L4Pool<'_>, ValidationError> {
    let at = format!("pool {:?}", pool.id);
    if !matches!(pool.protocol, PoolProtocol::Tcp | PoolProtocol::Udp) {
        return Err(unsupported(&at, format!("a {:?} pool {L7}", pool.protocol)));
    }
    let mut hash = match pool.lb_algorithm {
        LbAlgorithm::SourceIpPort => LbHash::SourceIpPort,
        LbAlgorithm::SourceIp => LbHash::SourceIp,
        other => {
            return Err(unsupported(
                &at,
                format!(
                    "lb_algorithm {other:?} on a VPC VIP (the data plane hashes connections: \
                     SOURCE_IP_PORT or SOURCE_IP)"
                ),
            ))
        }
    };
    match &pool.session_persistence {
        None => {}
        Some(sp) if sp.kind == PersistenceType::SourceIp && sp.cookie_name.is_none() => {
            hash = LbHash::SourceIp;
        }
        Some(sp) => {
            return Err(unsupported(
                &at,
                format!("session_persistence {:?} {L7}", sp.kind),
            ))
        }
    }
    let monitor = match &pool.healthmonitor {
        Some(hm) => check_monitor(hm, pool.protocol, &at)?,
        None => None,
    };
    let mut ids = HashSet::new();
    let mut endpoints = HashSet::new();
    let mut members = Vec::with_capacity(pool.members.len());
    for m in &pool.members {
        let m_at = format!("{at} member {:?}", m.id);
        if !ids.insert(m.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at: m_at,
                id: m.id.clone(),
            });
        }
        if !m.address.is_ipv4() {
            return Err(unsupported(&m_at, "an IPv6 member on a VPC VIP".into()));
        }
        if m.protocol_port == 0 {
            return Err(range(m_at, "protocol_port", 0, "1-65535"));
        }
        if m.weight > 256 {
            return Err(range(m_at, "weight", i64::from(m.weight), "0-256"));
        }
        if m.backup {
            return Err(unsupported(&m_at, "a backup member on a VPC VIP".into()));
        }
        if !endpoints.insert((m.address, m.protocol_port)) {
            return Err(ValidationError::InvalidValue {
                at: m_at,
                field: "address",
                value: format!("{}:{}", m.address, m.protocol_port),
                why: "another member of the pool has the same address and port",
            });
        }
        members.push(LbMemberSpec {
            ip: m.address.to_string(),
            port: m.protocol_port,
            weight: if m.admin_state_up { m.weight } else { 0 },
        });
    }
    Ok(L4Pool {
        pool,
        hash,
        monitor,
        members,
    })
}

fn check_listener(l: &Listener) -> Result<LbProtocol, ValidationError> {
    let at = format!("listener {:?}", l.id);
    let Some(protocol) = transport(l.protocol) else {
        return Err(unsupported(
            &at,
            format!("a {:?} listener {L7}", l.protocol),
        ));
    };
    if l.protocol_port == 0 {
        return Err(range(at, "protocol_port", 0, "1-65535"));
    }
    if l.connection_limit != -1 {
        return Err(unsupported(
            &at,
            "a connection_limit on a VPC VIP (the data plane does not count connections per VIP)"
                .into(),
        ));
    }
    for (field, set) in [
        ("insert_headers", !l.insert_headers.is_empty()),
        ("l7policies", !l.l7policies.is_empty()),
        (
            "default_tls_certificate",
            l.default_tls_certificate.is_some(),
        ),
    ] {
        if set {
            return Err(ValidationError::NotAllowed {
                at,
                field,
                when: "on HTTP listeners of a host VIP",
            });
        }
    }
    Ok(protocol)
}

/// Checks `lb` for the data plane and compiles what it forwards: one
/// data-plane load balancer per enabled listener with an enabled pool that
/// has a member of weight above 0, named by the listener's id, on `router`.
pub fn compile(lb: &LoadBalancer, router: &str) -> Result<Vec<LoadBalancerSpec>, ValidationError> {
    let IpAddr::V4(vip) = lb.vip_address else {
        return Err(unsupported(
            &format!("load balancer {:?}", lb.id),
            "an IPv6 VIP on a VPC subnet".into(),
        ));
    };
    let mut pool_ids = HashSet::new();
    let mut pools = Vec::with_capacity(lb.pools.len());
    for pool in &lb.pools {
        if !pool_ids.insert(pool.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at: format!("pool {:?}", pool.id),
                id: pool.id.clone(),
            });
        }
        pools.push(check_pool(pool)?);
    }
    let mut listener_ids = HashSet::new();
    let mut bound: Vec<(LbProtocol, u16, &str)> = Vec::new();
    let mut out = Vec::new();
    for l in &lb.listeners {
        let at = format!("listener {:?}", l.id);
        if !listener_ids.insert(l.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at,
                id: l.id.clone(),
            });
        }
        let protocol = check_listener(l)?;
        if let Some((_, _, other)) = bound
            .iter()
            .find(|(p, port, _)| *p == protocol && *port == l.protocol_port)
        {
            return Err(ValidationError::DuplicatePort {
                at,
                port: l.protocol_port,
                other: (*other).to_owned(),
            });
        }
        bound.push((protocol, l.protocol_port, l.id.as_str()));
        let Some(pool_id) = &l.default_pool_id else {
            continue;
        };
        let pool = pools
            .iter()
            .find(|p| &p.pool.id == pool_id)
            .ok_or_else(|| ValidationError::UnknownPool {
                at: at.clone(),
                pool_id: pool_id.clone(),
            })?;
        if transport_of(pool.pool.protocol) != Some(protocol) {
            return Err(ValidationError::ProtocolPair {
                at,
                listener: l.protocol,
                pool: pool.pool.protocol,
            });
        }
        let serving = lb.admin_state_up
            && l.admin_state_up
            && pool.pool.admin_state_up
            && pool.members.iter().any(|m| m.weight > 0);
        if serving {
            out.push(LoadBalancerSpec {
                name: l.id.clone(),
                router: router.to_owned(),
                vip: vip.to_string(),
                protocol,
                port: l.protocol_port,
                hash: pool.hash,
                monitor: pool.monitor,
                members: pool.members.clone(),
            });
        }
    }
    Ok(out)
}

fn transport_of(p: PoolProtocol) -> Option<LbProtocol> {
    match p {
        PoolProtocol::Tcp => Some(LbProtocol::Tcp),
        PoolProtocol::Udp => Some(LbProtocol::Udp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(v: serde_json::Value) -> LoadBalancer {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "id": "lb", "vip_address": "10.0.1.100",
            "listeners": [
                {"id": "dns", "protocol": "UDP", "protocol_port": 53, "default_pool_id": "u"},
                {"id": "tcp53", "protocol": "TCP", "protocol_port": 53, "default_pool_id": "t"},
                {"id": "idle", "protocol": "TCP", "protocol_port": 80}
            ],
            "pools": [
                {"id": "u", "protocol": "UDP", "lb_algorithm": "SOURCE_IP", "members": [
                    {"id": "a", "address": "10.0.2.10", "protocol_port": 5353}]},
                {"id": "t", "protocol": "TCP", "lb_algorithm": "SOURCE_IP_PORT", "members": [
                    {"id": "b", "address": "10.0.2.10", "protocol_port": 8053, "weight": 3},
                    {"id": "c", "address": "10.0.2.11", "protocol_port": 8053, "admin_state_up": false}]}
            ]
        })
    }

    #[test]
    fn listeners_compile_to_data_plane_load_balancers() {
        let lbs = compile(&doc(base()), "r1").unwrap();
        assert_eq!(lbs.len(), 2, "the listener without a pool forwards nothing");
        assert_eq!(lbs[0].name, "dns");
        assert_eq!(
            (lbs[0].protocol, lbs[0].port, lbs[0].hash),
            (LbProtocol::Udp, 53, LbHash::SourceIp)
        );
        assert_eq!(lbs[1].router, "r1");
        assert_eq!(lbs[1].vip, "10.0.1.100");
        assert_eq!(lbs[1].hash, LbHash::SourceIpPort);
        let weights: Vec<u16> = lbs[1].members.iter().map(|m| m.weight).collect();
        assert_eq!(weights, [3, 0], "a disabled member is drained");
        let mut off = base();
        off["admin_state_up"] = false.into();
        assert!(compile(&doc(off), "r1").unwrap().is_empty());
    }

    #[test]
    fn a_tcp_monitor_becomes_data_plane_probes() {
        let mut d = base();
        d["pools"][1]["healthmonitor"] =
            serde_json::json!({"type": "TCP", "delay": 2, "timeout": 1, "max_retries": 2});
        let lbs = compile(&doc(d.clone()), "r").unwrap();
        assert_eq!(
            lbs[1].monitor,
            Some(LbMonitorSpec {
                kind: ProbeKind::Tcp,
                interval_ms: 2000,
                timeout_ms: 1000,
                rise: 2,
                fall: 3
            })
        );
        d["pools"][1]["healthmonitor"]["delay"] = 7200.into();
        let e = compile(&doc(d.clone()), "r").unwrap_err().to_string();
        assert!(e.contains("delay"), "{e}");
        d["pools"][0]["healthmonitor"] =
            serde_json::json!({"type": "TCP", "delay": 2, "timeout": 1, "max_retries": 2});
        d["pools"][1]["healthmonitor"]["delay"] = 2.into();
        let e = compile(&doc(d.clone()), "r").unwrap_err().to_string();
        assert!(e.contains("UDP pool"), "{e}");
        // UDP members are pinged.
        d["pools"][0]["healthmonitor"]["type"] = "PING".into();
        let lbs = compile(&doc(d.clone()), "r").unwrap();
        assert_eq!(lbs[0].monitor.map(|m| m.kind), Some(ProbeKind::Ping));
        d["pools"][0]["healthmonitor"]["type"] = "UDP-CONNECT".into();
        let lbs = compile(&doc(d), "r").unwrap();
        assert_eq!(lbs[0].monitor.map(|m| m.kind), Some(ProbeKind::UdpConnect));
    }

    #[test]
    fn what_the_data_plane_cannot_do_is_refused_with_the_reason() {
        let cases: [(&str, serde_json::Value, &str); 8] = [
            (
                "/listeners/0/protocol",
                "HTTP".into(),
                "HTTP needs a host VIP",
            ),
            (
                "/pools/1/lb_algorithm",
                "ROUND_ROBIN".into(),
                "SOURCE_IP_PORT or SOURCE_IP",
            ),
            (
                "/pools/1/healthmonitor",
                serde_json::json!({"type": "HTTP", "delay": 5, "timeout": 5, "max_retries": 3}),
                "probes TCP connects",
            ),
            ("/pools/1/members/0/backup", true.into(), "backup member"),
            (
                "/listeners/1/connection_limit",
                10.into(),
                "connection_limit",
            ),
            ("/vip_address", "fd00::1".into(), "IPv6 VIP"),
            ("/listeners/1/protocol_port", 53.into(), "unused"),
            ("/listeners/2/protocol_port", 53.into(), "already used"),
        ];
        for (path, value, why) in cases {
            let mut d = base();
            let (parent, key) = path.rsplit_once('/').unwrap();
            d.pointer_mut(parent).unwrap()[key] = value;
            let result = compile(&doc(d), "r");
            if why == "unused" {
                assert!(result.is_ok(), "TCP and UDP may share a port: {result:?}");
                continue;
            }
            let e = result.expect_err(path).to_string();
            assert!(e.contains(why), "{path}: {e}");
        }
        let mut d = base();
        d["pools"][0]["protocol"] = "TCP".into();
        let e = compile(&doc(d), "r").unwrap_err().to_string();
        assert!(e.contains("cannot send to"), "{e}");
    }
}
