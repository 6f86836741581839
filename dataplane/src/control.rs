//! The control protocol: one JSON request per line on a local unix socket,
//! one JSON response line back. It carries the declarative interface
//! ([`DesiredState`]), statistics and packet traces, so the control plane can
//! drive a data plane in another process exactly as the JSON file does.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::ConfigHandle;
use crate::counters::{Stats, StatsSnapshot};
use crate::model::DesiredState;
use crate::packet::build;
use crate::packet::checksum::internet_checksum;
use crate::packet::headers::{parse_mac, Mac, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::pipeline::{process, Learned, RecordTrace, TraceStep, Verdict};
use crate::port::BUF_SIZE;

/// A control request.
// One per control-socket request, never in bulk: boxing the state buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Replace the whole desired state (validated; rejected states change nothing).
    Apply { state: DesiredState },
    /// The desired state currently applied.
    Get,
    /// Counters per interface and per outcome.
    Stats,
    /// Run a frame through the pipeline without sending it.
    Trace {
        /// Ingress interface.
        interface: String,
        /// The frame as hex, or
        #[serde(default)]
        frame_hex: Option<String>,
        /// a description to build it from.
        #[serde(default)]
        packet: Option<PacketSpec>,
    },
    /// Hit counters of every security-group and firewall rule.
    RuleStats,
    /// Conformed / dropped counters of every QoS meter.
    QosStats,
    /// Copies sent per mirror session.
    MirrorStats,
    /// Hit counters of the router policies.
    PolicyStats,
    /// New flows and packets per load-balancer member.
    LbStats,
    /// Drop the tracked connections of one port's (or router's) conntrack zone.
    CtFlush {
        #[serde(default)]
        port: Option<String>,
        #[serde(default)]
        router: Option<String>,
    },
}

/// One rule's hit counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    #[serde(flatten)]
    pub rule: crate::security::RuleName,
    pub hits: u64,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Applied {
        generation: u64,
    },
    State {
        state: DesiredState,
    },
    Stats {
        stats: StatsSnapshot,
    },
    Trace {
        steps: Vec<TraceStep>,
        verdict: String,
        output_hex: Option<String>,
    },
    RuleStats {
        rules: Vec<RuleHits>,
    },
    QosStats {
        meters: Vec<crate::qos::MeterStats>,
    },
    MirrorStats {
        sessions: Vec<crate::mirror::MirrorStats>,
    },
    PolicyStats {
        policies: Vec<crate::policy::PolicyStats>,
    },
    LbStats {
        members: Vec<crate::lb4::LbMemberStats>,
    },
    /// The flush was handed to the workers (they run it within one round).
    FlushRequested {
        zone: u32,
    },
    Error {
        message: String,
    },
}

/// Transport of a traced IPv4 packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Icmp,
    Udp,
    Tcp,
}

/// A packet described by its fields (like `ovn-trace`'s microflow).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacketSpec {
    pub eth_src: String,
    pub eth_dst: String,
    #[serde(default)]
    pub vlan: Option<u16>,
    /// An ARP request from `ip_src` for `ip_dst` (instead of IPv4).
    #[serde(default)]
    pub arp: bool,
    pub ip_src: Ipv4Addr,
    pub ip_dst: Ipv4Addr,
    #[serde(default = "default_ttl")]
    pub ttl: u8,
    #[serde(default)]
    pub protocol: Protocol,
}

fn default_ttl() -> u8 {
    64
}

impl PacketSpec {
    /// The frame this describes.
    pub fn to_frame(&self) -> Result<Vec<u8>, String> {
        let mac = |s: &str| parse_mac(s).ok_or_else(|| format!("bad MAC {s:?}"));
        let (src, dst): (Mac, Mac) = (mac(&self.eth_src)?, mac(&self.eth_dst)?);
        if self.arp {
            return Ok(build::arp(
                1,
                dst,
                src,
                self.ip_src,
                [0; 6],
                self.ip_dst,
                self.vlan,
            ));
        }
        let (proto, l4) = match self.protocol {
            Protocol::Icmp => {
                let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
                let c = internet_checksum(&icmp);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                (IPPROTO_ICMP, icmp)
            }
            Protocol::Udp => (IPPROTO_UDP, vec![0x30, 0x39, 0, 53, 0, 8, 0, 0]),
            Protocol::Tcp => {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
                tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
                tcp[12] = 0x50;
                tcp[13] = 0x02;
                (IPPROTO_TCP, tcp)
            }
        };
        Ok(build::ipv4(
            dst,
            src,
            self.vlan,
            self.ip_src,
            self.ip_dst,
            self.ttl,
            proto,
            &l4,
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

/// Serves requests against a running data plane.
#[derive(Clone)]
pub struct Controller {
    pub config: ConfigHandle,
    pub stats: Arc<Stats>,
}

impl Controller {
    /// Answers one request.
    pub fn handle(&self, req: Request) -> Response {
        match req {
            Request::Apply { state } => match self.config.apply(state) {
                Ok(generation) => {
                    tracing::info!(generation, "desired state applied");
                    Response::Applied { generation }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "desired state rejected");
                    Response::Error {
                        message: e.to_string(),
                    }
                }
            },
            Request::Get => Response::State {
                state: self.config.desired(),
            },
            Request::Stats => Response::Stats {
                stats: self.stats.snapshot(),
            },
            Request::Trace {
                interface,
                frame_hex,
                packet,
            } => self.trace(&interface, frame_hex, packet),
            Request::RuleStats => {
                let tables = self.config.tables().load_full();
                let c = &tables.stateful.counters;
                Response::RuleStats {
                    rules: c
                        .names
                        .iter()
                        .zip(c.hits.iter())
                        .map(|(n, h)| RuleHits {
                            rule: n.clone(),
                            hits: h.load(std::sync::atomic::Ordering::Relaxed),
                        })
                        .collect(),
                }
            }
            Request::QosStats => Response::QosStats {
                meters: self.config.tables().load().qos.stats(),
            },
            Request::MirrorStats => Response::MirrorStats {
                sessions: self.config.tables().load().mirror.stats(),
            },
            Request::PolicyStats => Response::PolicyStats {
                policies: self.config.tables().load().policies.stats(),
            },
            Request::LbStats => Response::LbStats {
                members: self.config.tables().load().stateful.lb.stats(),
            },
            Request::CtFlush { port, router } => {
                let zone = match (port, router) {
                    (Some(p), None) => crate::security::zone_id("port", &p),
                    (None, Some(r)) => crate::security::zone_id("router", &r),
                    _ => {
                        return Response::Error {
                            message: "give exactly one of port and router".into(),
                        }
                    }
                };
                self.stats.request_ct_flush(zone);
                Response::FlushRequested { zone }
            }
        }
    }

    fn trace(
        &self,
        interface: &str,
        frame_hex: Option<String>,
        packet: Option<PacketSpec>,
    ) -> Response {
        let frame = match (frame_hex, packet) {
            (Some(h), None) => unhex(&h).ok_or_else(|| "frame_hex is not hex".to_string()),
            (None, Some(p)) => p.to_frame(),
            _ => Err("give exactly one of frame_hex and packet".to_string()),
        };
        let frame = match frame {
            Ok(f) if f.len() <= BUF_SIZE => f,
            Ok(_) => {
                return Response::Error {
                    message: "frame larger than a buffer".into(),
                }
            }
            Err(message) => return Response::Error { message },
        };
        let tables = self.config.tables().load_full();
        let Some(in_port) = tables.interface_index(interface) else {
            return Response::Error {
                message: format!("unknown interface {interface:?}"),
            };
        };
        let mut buf = vec![0u8; BUF_SIZE];
        buf[..frame.len()].copy_from_slice(&frame);
        let mut len = frame.len();
        let mut tr = RecordTrace::default();
        // Mirror copies are taken by the engine around the pipeline: the
        // received frame first, the delivered one after.
        let mirrors = |frame: &[u8], port: u16, out: bool, tr: &mut RecordTrace| {
            let taps = if out {
                tables.mirror.rx.get(usize::from(port))
            } else {
                tables.mirror.tx.get(usize::from(port))
            };
            for tap in taps.into_iter().flatten() {
                if let Some(s) = tables.mirror.selects(tap, frame, out) {
                    tr.steps.push(TraceStep {
                        stage: "mirror".into(),
                        decision: format!(
                            "session {:?}: copy of the frame {} to {:?}",
                            s.name,
                            if out { "the port sent" } else { "delivered" },
                            s.target
                        ),
                    });
                }
            }
        };
        mirrors(&frame, in_port, true, &mut tr);
        // Learning off: a trace must not change forwarding state.
        let d = process(
            &tables,
            &mut Learned::new(0),
            in_port,
            &mut buf,
            &mut len,
            &mut tr,
        );
        tr.steps.push(TraceStep {
            stage: "flow_cache".into(),
            decision: crate::flowcache::trace_note(&tables, &frame, &d, len),
        });
        match d.verdict {
            Verdict::Unicast { port } => {
                mirrors(buf.get(..len).unwrap_or(&[]), port, false, &mut tr)
            }
            Verdict::Reply => mirrors(buf.get(..len).unwrap_or(&[]), in_port, false, &mut tr),
            _ => {}
        }
        let name = |p: u16| {
            tables
                .interfaces
                .get(usize::from(p))
                .cloned()
                .unwrap_or_default()
        };
        let (verdict, out) = match d.verdict {
            Verdict::Drop(r) => (format!("drop: {}", r.name()), None),
            Verdict::Unicast { port } => (format!("output to {}", name(port)), Some(&buf[..len])),
            Verdict::Reply => (format!("reply out {interface}"), Some(&buf[..len])),
            Verdict::Consumed => ("taken by the data plane".to_string(), None),
            Verdict::Tunnel { endpoint, vni, .. } => {
                let o = tables.overlay.as_ref();
                let ep = o
                    .and_then(|o| o.endpoints.get(usize::from(endpoint)))
                    .map_or_else(|| "?".to_string(), |e| e.ip.to_string());
                let out = o.map(|o| name(o.port)).unwrap_or_default();
                (
                    format!("encapsulate VNI {vni} to remote endpoint {ep}, output to {out}"),
                    Some(&buf[..len]),
                )
            }
            Verdict::Flood { switch, .. } => {
                let sw = tables
                    .switches
                    .get(switch as usize)
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                (
                    format!("flood on switch {sw} (not back to {interface})"),
                    Some(&buf[..len]),
                )
            }
        };
        Response::Trace {
            steps: tr.steps,
            verdict,
            output_hex: out.map(hex),
        }
    }

    /// Serves one connection until the peer closes it.
    pub fn serve(&self, stream: UnixStream) -> std::io::Result<()> {
        let mut writer = stream.try_clone()?;
        for line in BufReader::new(stream).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => Response::Error {
                    message: format!("Bad request: {e}"),
                },
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            writer.write_all(&out)?;
        }
        Ok(())
    }
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Exchange request")]
    Exchange(#[source] std::io::Error),
    #[error("Decode response")]
    Decode(#[source] serde_json::Error),
}

/// Sends one request to a data plane's socket and waits for the answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::Decode)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(ClientError::Exchange)?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .map_err(ClientError::Exchange)?;
    serde_json::from_str(&resp).map_err(ClientError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{interfaces, topology};

    fn controller() -> Controller {
        let config = ConfigHandle::new(interfaces());
        Controller {
            stats: Arc::new(Stats::new(config.interfaces())),
            config,
        }
    }

    #[test]
    fn apply_get_and_reject_over_the_protocol() {
        let c = controller();
        assert_eq!(
            c.handle(Request::Apply { state: topology() }),
            Response::Applied { generation: 1 }
        );
        let mut bad = topology();
        bad.switches[0].subnet = "10.0.1.0/40".into();
        let Response::Error { message } = c.handle(Request::Apply { state: bad }) else {
            panic!()
        };
        assert!(message.contains("bad subnet"), "{message}");
        assert_eq!(
            c.handle(Request::Get),
            Response::State { state: topology() }
        );
    }

    #[test]
    fn trace_from_description_and_hex() {
        let c = controller();
        c.handle(Request::Apply { state: topology() });
        let json = r#"{"op":"trace","interface":"p0","packet":{"eth_src":"02:00:00:00:00:01","eth_dst":"02:00:00:00:ff:01","ip_src":"10.0.1.10","ip_dst":"10.0.2.10","ttl":5}}"#;
        let Response::Trace {
            steps,
            verdict,
            output_hex,
        } = c.handle(serde_json::from_str(json).unwrap())
        else {
            panic!()
        };
        assert_eq!(verdict, "output to p2");
        assert!(
            steps.iter().any(|s| s.decision.contains("TTL 5 → 4")),
            "{steps:?}"
        );
        assert!(
            steps.iter().any(|s| s.stage == "flow_cache"
                && s.decision
                    .contains("caches this flow after its first packet")),
            "{steps:?}"
        );
        let out = unhex(&output_hex.unwrap()).unwrap();
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 3]);

        let arp = PacketSpec {
            eth_src: "02:00:00:00:00:01".into(),
            eth_dst: "ff:ff:ff:ff:ff:ff".into(),
            vlan: None,
            arp: true,
            ip_src: "10.0.1.10".parse().unwrap(),
            ip_dst: "10.0.1.11".parse().unwrap(),
            ttl: 64,
            protocol: Protocol::Icmp,
        };
        let frame_hex = hex(&arp.to_frame().unwrap());
        let Response::Trace { verdict, steps, .. } = c.handle(Request::Trace {
            interface: "p0".into(),
            frame_hex: Some(frame_hex),
            packet: None,
        }) else {
            panic!()
        };
        assert_eq!(verdict, "reply out p0");
        assert!(
            steps
                .iter()
                .any(|s| s.stage == "flow_cache" && s.decision.contains("never caches")),
            "{steps:?}"
        );
        let Response::Error { .. } = c.handle(Request::Trace {
            interface: "nope".into(),
            frame_hex: Some("00".into()),
            packet: None,
        }) else {
            panic!()
        };
        let Response::Trace { verdict, .. } = c.handle(Request::Trace {
            interface: "p0".into(),
            frame_hex: Some("0102".into()),
            packet: None,
        }) else {
            panic!()
        };
        assert_eq!(verdict, "drop: malformed_ethernet");
    }

    #[test]
    fn trace_shows_mirror_copies_and_qos() {
        let c = controller();
        let mut state = topology();
        state.mirrors = vec![crate::mirror::MirrorSpec {
            name: "tap".into(),
            ports: vec!["vm1".into()],
            direction: crate::mirror::MirrorDirection::Both,
            filter: None,
            target: crate::mirror::MirrorTarget::Port {
                port: "uplink".into(),
            },
        }];
        state.qos = vec![crate::qos::QosSpec {
            port: Some("vm1".into()),
            dscp: Some(10),
            ..Default::default()
        }];
        assert!(matches!(
            c.handle(Request::Apply { state }),
            Response::Applied { .. }
        ));
        let json = r#"{"op":"trace","interface":"p0","packet":{"eth_src":"02:00:00:00:00:01","eth_dst":"02:00:00:00:00:02","ip_src":"10.0.1.10","ip_dst":"10.0.1.11"}}"#;
        let Response::Trace { steps, .. } = c.handle(serde_json::from_str(json).unwrap()) else {
            panic!()
        };
        let mirror = steps.iter().find(|s| s.stage == "mirror").unwrap();
        assert!(mirror.decision.contains("\"tap\""), "{mirror:?}");
        assert!(steps
            .iter()
            .any(|s| s.stage == "qos_out" && s.decision == "DSCP set to 10"));
    }

    #[test]
    fn rule_stats_and_ct_flush_over_the_protocol() {
        let c = controller();
        let mut state = topology();
        state.security_groups = vec![crate::model::SecurityGroupSpec {
            name: "g".into(),
            ports: vec!["vm2".into()],
            rules: vec![crate::model::SecurityRuleSpec {
                direction: crate::model::RuleDirection::Ingress,
                ethertype: Default::default(),
                protocol: Some("tcp".into()),
                port_min: Some(80),
                port_max: None,
                icmp_type: None,
                icmp_code: None,
                remote_cidr: None,
                remote_group: None,
                remote_address_group: None,
                port_set: None,
                priority: 1,
                action: Default::default(),
            }],
        }];
        c.handle(Request::Apply { state });
        let req: Request = serde_json::from_str(r#"{"op":"rule_stats"}"#).unwrap();
        let Response::RuleStats { rules } = c.handle(req) else {
            panic!()
        };
        assert_eq!(rules.len(), 1);
        assert_eq!((rules[0].rule.owner.as_str(), rules[0].hits), ("g", 0));
        let req: Request = serde_json::from_str(r#"{"op":"ct_flush","port":"vm2"}"#).unwrap();
        let Response::FlushRequested { zone } = c.handle(req) else {
            panic!()
        };
        assert_eq!(zone, crate::security::zone_id("port", "vm2"));
        assert_eq!(
            c.stats.workers[0]
                .ct_flush
                .load(std::sync::atomic::Ordering::Relaxed),
            zone
        );
        let Response::Error { .. } = c.handle(Request::CtFlush {
            port: None,
            router: None,
        }) else {
            panic!()
        };
    }
}
