use crate::config::{compile, ConfigError};
use crate::counters::DropReason;
use crate::packet::build::icmp_echo;
use crate::packet::checksum::internet_checksum;
use crate::packet::headers::Mac;
use crate::pipeline::{process, Learned, NoTrace, RecordTrace, Verdict};
use crate::qos::{MeterSpec, QosError, QosSpec};
use crate::tables::Tables;
use crate::testutil::{interfaces, topology};

const VM1: Mac = [2, 0, 0, 0, 0, 1];
const VM2: Mac = [2, 0, 0, 0, 0, 2];
const GW_A: Mac = [2, 0, 0, 0, 0xff, 1];

fn qos(port: &str, ingress: Option<(u64, u64)>, egress: Option<(u64, u64)>) -> QosSpec {
    let m = |(rate_kbps, burst_bytes)| MeterSpec {
        rate_kbps,
        burst_bytes,
    };
    QosSpec {
        port: Some(port.into()),
        ingress: ingress.map(m),
        egress: egress.map(m),
        ..QosSpec::default()
    }
}

fn tables(q: Vec<QosSpec>, generation: u64) -> Result<Tables, ConfigError> {
    let mut s = topology();
    s.qos = q;
    compile(&s, &interfaces(), generation)
}

/// vm1 → vm2 on switch a, `n` bytes of payload.
fn frame(payload: usize) -> Vec<u8> {
    icmp_echo(
        VM2,
        VM1,
        "10.0.1.10".parse().unwrap(),
        "10.0.1.11".parse().unwrap(),
        64,
        &vec![0u8; payload],
    )
}

fn run(t: &Tables, l: &mut Learned, f: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..f.len()].copy_from_slice(f);
    let mut len = f.len();
    let d = process(t, l, 0, &mut buf, &mut len, &mut NoTrace);
    buf.truncate(len);
    (d.verdict, buf)
}

#[test]
fn bad_meters_are_rejected_precisely() {
    let e = tables(vec![qos("vm1", None, Some((0, 10_000)))], 1).unwrap_err();
    assert_eq!(
        e,
        ConfigError::Qos(QosError::ZeroRate {
            port: "vm1".into(),
            direction: "egress"
        })
    );
    let e = tables(vec![qos("vm1", Some((1000, 1000)), None)], 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "QoS of port \"vm1\": ingress burst 1000 bytes is smaller than one maximum-size frame (1518 bytes)"
    );
    let e = tables(vec![qos("nope", Some((1000, 2000)), None)], 1).unwrap_err();
    assert!(matches!(e, ConfigError::Qos(QosError::UnknownPort { .. })));
    let e = tables(
        vec![
            qos("vm1", Some((1000, 2000)), None),
            qos("vm1", None, Some((1000, 2000))),
        ],
        1,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        ConfigError::Qos(QosError::DuplicatePort { .. })
    ));
    let mut d = qos("vm1", None, None);
    d.dscp = Some(64);
    assert!(matches!(
        tables(vec![d], 1).unwrap_err(),
        ConfigError::Qos(QosError::BadDscp { dscp: 64, .. })
    ));
    assert!(matches!(
        tables(vec![qos("vm1", None, None)], 1).unwrap_err(),
        ConfigError::Qos(QosError::Empty { .. })
    ));
    // A JSON state with the field missing still parses (serde default).
    let s: crate::model::DesiredState = serde_json::from_str("{}").unwrap();
    assert!(s.qos.is_empty());
}

#[test]
fn egress_meter_passes_the_rate_and_drops_the_rest() {
    // 8 Mbit/s = 1 MB/s, burst 10 000 bytes.
    let t = tables(vec![qos("vm1", None, Some((8_000, 10_000)))], 1).unwrap();
    let mut l = Learned::new(16);
    let f = frame(958); // 1000-byte frame
    assert_eq!(f.len(), 1000);
    l.qos.set_now_ns(0);
    // The burst: 10 frames pass, the 11th is dropped.
    for _ in 0..10 {
        assert_eq!(run(&t, &mut l, &f).0, Verdict::Unicast { port: 1 });
    }
    assert_eq!(
        run(&t, &mut l, &f).0,
        Verdict::Drop(DropReason::QosMeterDropped)
    );
    // Over one simulated second at 10 000 frames/s offered, 1 MB passes.
    let mut passed = 0u64;
    for i in 1..=10_000u64 {
        l.qos.set_now_ns(i * 100_000);
        if run(&t, &mut l, &f).0 != Verdict::Drop(DropReason::QosMeterDropped) {
            passed += 1;
        }
    }
    assert_eq!(passed, 1000, "exactly rate × time frames conform");
    l.qos.fold(&t.qos);
    let s = t.qos.stats();
    assert_eq!(s[0].meter, "vm1/egress");
    assert_eq!(s[0].conformed_packets, 1010);
    assert_eq!(s[0].dropped_packets, 10_001 - 1000);
    assert_eq!(s[0].conformed_bytes, 1_010_000);
}

#[test]
fn ingress_meter_applies_to_routed_and_switched_delivery() {
    let t = tables(vec![qos("vm2", Some((8_000, 2_000)), None)], 1).unwrap();
    let mut l = Learned::new(16);
    let f = frame(958);
    assert_eq!(run(&t, &mut l, &f).0, Verdict::Unicast { port: 1 });
    assert_eq!(run(&t, &mut l, &f).0, Verdict::Unicast { port: 1 });
    let mut tr = RecordTrace::default();
    let mut buf = vec![0u8; 2048];
    buf[..f.len()].copy_from_slice(&f);
    let mut len = f.len();
    let d = process(&t, &mut l, 0, &mut buf, &mut len, &mut tr);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::QosMeterDropped));
    let last = tr.steps.last().unwrap();
    assert_eq!(last.stage, "qos_in");
    assert!(last.decision.contains("vm2/ingress"), "{last:?}");
    // Routed to vm2 from vm3 (switch b): the same meter.
    let routed = icmp_echo(
        [2, 0, 0, 0, 0xff, 2],
        [2, 0, 0, 0, 0, 3],
        "10.0.2.10".parse().unwrap(),
        "10.0.1.11".parse().unwrap(),
        64,
        b"x",
    );
    let mut buf = vec![0u8; 2048];
    buf[..routed.len()].copy_from_slice(&routed);
    let mut len = routed.len();
    let d = process(&t, &mut l, 2, &mut buf, &mut len, &mut NoTrace);
    assert_eq!(d.verdict, Verdict::Drop(DropReason::QosMeterDropped));
}

#[test]
fn bucket_survives_an_apply_with_the_same_rate() {
    let q = vec![qos("vm1", None, Some((8_000, 2_000)))];
    let t1 = tables(q.clone(), 1).unwrap();
    let mut l = Learned::new(16);
    let f = frame(958);
    l.qos.set_now_ns(0);
    assert_eq!(run(&t1, &mut l, &f).0, Verdict::Unicast { port: 1 });
    assert_eq!(run(&t1, &mut l, &f).0, Verdict::Unicast { port: 1 });
    // Same rate in a new generation (another port added): still empty.
    let mut q2 = q.clone();
    q2.push(qos("vm2", Some((1000, 2000)), None));
    let t2 = tables(q2, 2).unwrap();
    assert_eq!(
        run(&t2, &mut l, &f).0,
        Verdict::Drop(DropReason::QosMeterDropped)
    );
    // A new rate starts a full bucket.
    let t3 = tables(vec![qos("vm1", None, Some((16_000, 2_000)))], 3).unwrap();
    assert_eq!(run(&t3, &mut l, &f).0, Verdict::Unicast { port: 1 });
}

#[test]
fn dscp_is_written_with_a_valid_header_checksum() {
    let mut q = qos("vm1", None, None);
    q.dscp = Some(46);
    let t = tables(vec![q], 1).unwrap();
    let mut l = Learned::new(16);
    // Routed (the TTL decrement updates the checksum after the marking).
    let f = icmp_echo(
        GW_A,
        VM1,
        "10.0.1.10".parse().unwrap(),
        "10.0.2.10".parse().unwrap(),
        64,
        b"x",
    );
    let (v, out) = run(&t, &mut l, &f);
    assert_eq!(v, Verdict::Unicast { port: 2 });
    assert_eq!(out[15], 46 << 2);
    assert_eq!(internet_checksum(&out[14..34]), 0);
    let (_, out) = run(&t, &mut l, &frame(10));
    assert_eq!(out[15], 46 << 2);
    assert_eq!(internet_checksum(&out[14..34]), 0);
}

#[test]
fn floating_ip_meters_are_validated() {
    let mut s = topology();
    s.nat = vec![crate::model::NatRuleSpec {
        router: "r".into(),
        kind: crate::model::NatKind::DnatAndSnat,
        external_ip: "10.0.2.50".into(),
        logical_ip: "10.0.1.10".into(),
        protocol: None,
        external_port: None,
        logical_port: None,
        port_min: None,
        port_max: None,
    }];
    let meter = Some(MeterSpec {
        rate_kbps: 1000,
        burst_bytes: 2000,
    });
    let with = |q: QosSpec| {
        let mut s = s.clone();
        s.qos = vec![q];
        compile(&s, &interfaces(), 1)
    };
    let ok = with(QosSpec {
        floating_ip: Some("10.0.2.50".into()),
        egress: meter,
        ..QosSpec::default()
    })
    .unwrap();
    assert_eq!(ok.qos.meters[0].name, "10.0.2.50/egress");
    let e = with(QosSpec {
        port: Some("vm1".into()),
        floating_ip: Some("10.0.2.50".into()),
        egress: meter,
        ..QosSpec::default()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "QoS entry 0: give exactly one of port and floating_ip"
    );
    let e = with(QosSpec {
        floating_ip: Some("10.0.2.50".into()),
        dscp: Some(10),
        ..QosSpec::default()
    })
    .unwrap_err();
    assert!(matches!(
        e,
        ConfigError::Qos(QosError::DscpOnFloatingIp { .. })
    ));
    let e = with(QosSpec {
        floating_ip: Some("fd00::50".into()),
        ingress: meter,
        ..QosSpec::default()
    })
    .unwrap_err();
    assert!(matches!(
        e,
        ConfigError::Qos(QosError::NotAFloatingIp { .. })
    ));
}

#[test]
fn bucket_survives_an_apply_through_the_handle_when_meters_move() {
    let handle = crate::config::ConfigHandle::new(interfaces());
    let mut s = topology();
    s.qos = vec![qos("vm1", None, Some((8_000, 2_000)))];
    handle.apply(s.clone()).unwrap();
    let mut l = Learned::new(16);
    let f = frame(958);
    let t1 = handle.tables().load_full();
    assert_eq!(run(&t1, &mut l, &f).0, Verdict::Unicast { port: 1 });
    assert_eq!(run(&t1, &mut l, &f).0, Verdict::Unicast { port: 1 });
    // A meter inserted before vm1's: vm1's moves to index 1, linked at apply.
    s.qos.insert(0, qos("vm2", Some((1000, 2000)), None));
    handle.apply(s).unwrap();
    let t2 = handle.tables().load_full();
    assert_eq!(t2.qos.meters[1].prev, Some(0));
    assert_eq!(t2.qos.meters[0].prev, None);
    assert_eq!(
        run(&t2, &mut l, &f).0,
        Verdict::Drop(DropReason::QosMeterDropped),
        "the emptied bucket was kept"
    );
}
