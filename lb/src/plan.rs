//! Validation: a [`LoadBalancer`] is checked and compiled in one pass into a
//! [`Plan`] the proxy runs (regexes compiled, policies sorted in Octavia's
//! evaluation order, timeouts as `Duration`s). Every error names the object
//! and field it is about.
//!
//! Features of the model keel-lb does not realize yet are rejected here with
//! [`ValidationError::Unsupported`] rather than accepted and ignored.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use regex::Regex;

use crate::model::{
    CompareType, HealthMonitor, L7Action, L7Policy, L7Rule, L7RuleType, LbAlgorithm, Listener,
    ListenerProtocol, LoadBalancer, Member, MonitorType, PersistenceType, Pool, PoolProtocol,
    TlsCertificateFiles,
};

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("{at}: duplicate id {id:?}")]
    DuplicateId { at: String, id: String },
    #[error("{at}: protocol_port {port} is already used by listener {other:?}")]
    DuplicatePort {
        at: String,
        port: u16,
        other: String,
    },
    #[error("{at}: {field} = {value} is out of range ({allowed})")]
    OutOfRange {
        at: String,
        field: &'static str,
        value: i64,
        allowed: &'static str,
    },
    #[error("{at}: {what} is not supported by keel-lb yet")]
    Unsupported { at: String, what: String },
    #[error("{at}: pool {pool_id:?} does not exist in this load balancer")]
    UnknownPool { at: String, pool_id: String },
    #[error("{at}: a {listener:?} listener cannot send to a {pool:?} pool")]
    ProtocolPair {
        at: String,
        listener: ListenerProtocol,
        pool: PoolProtocol,
    },
    #[error("{at}: {field} is required {when}")]
    Missing {
        at: String,
        field: &'static str,
        when: &'static str,
    },
    #[error("{at}: {field} is only allowed {when}")]
    NotAllowed {
        at: String,
        field: &'static str,
        when: &'static str,
    },
    #[error("{at}: invalid regex {value:?}")]
    InvalidRegex {
        at: String,
        value: String,
        #[source]
        source: regex::Error,
    },
    #[error("{at}: invalid {field} {value:?}: {why}")]
    InvalidValue {
        at: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The validated, compiled desired state.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub enabled: bool,
    pub access_log: bool,
    pub vip: IpAddr,
    pub listeners: Vec<ListenerPlan>,
    pub pools: Vec<PoolPlan>,
}

#[derive(Debug, Clone)]
pub struct ListenerPlan {
    pub id: String,
    pub protocol: ListenerProtocol,
    pub bind: SocketAddr,
    /// `None`: unlimited.
    pub connection_limit: Option<usize>,
    pub default_pool: Option<String>,
    pub client_data_timeout: Option<Duration>,
    pub member_connect_timeout: Duration,
    pub member_data_timeout: Option<Duration>,
    pub insert: InsertHeaders,
    pub tls: Option<TlsCertificateFiles>,
    /// In evaluation order: REJECT, then redirects to URL/prefix, then
    /// REDIRECT_TO_POOL; by position within each.
    pub policies: Vec<PolicyPlan>,
}

impl ListenerPlan {
    /// Whether requests are parsed as HTTP (else bytes are proxied as TCP).
    pub fn is_http(&self) -> bool {
        matches!(
            self.protocol,
            ListenerProtocol::Http | ListenerProtocol::TerminatedHttps
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertHeaders {
    pub forwarded_for: bool,
    pub forwarded_port: bool,
    pub forwarded_proto: bool,
}

#[derive(Debug, Clone)]
pub struct PolicyPlan {
    pub id: String,
    pub action: PolicyAction,
    pub rules: Vec<RulePlan>,
}

#[derive(Debug, Clone)]
pub enum PolicyAction {
    Reject,
    RedirectToUrl { url: String, code: u16 },
    RedirectPrefix { prefix: String, code: u16 },
    ToPool(String),
}

#[derive(Debug, Clone)]
pub struct RulePlan {
    pub kind: L7RuleType,
    pub key: Option<String>,
    pub matcher: Matcher,
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub enum Matcher {
    Regex(Regex),
    StartsWith(String),
    EndsWith(String),
    Contains(String),
    EqualTo(String),
}

impl Matcher {
    pub fn matches(&self, subject: &str) -> bool {
        match self {
            Matcher::Regex(re) => re.is_match(subject),
            Matcher::StartsWith(v) => subject.starts_with(v.as_str()),
            Matcher::EndsWith(v) => subject.ends_with(v.as_str()),
            Matcher::Contains(v) => subject.contains(v.as_str()),
            Matcher::EqualTo(v) => subject == v,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolPlan {
    pub id: String,
    pub enabled: bool,
    pub protocol: PoolProtocol,
    pub algorithm: LbAlgorithm,
    /// SOURCE_IP session persistence: pick by Maglev on the client address
    /// whatever the algorithm.
    pub sticky_source_ip: bool,
    pub monitor: Option<MonitorPlan>,
    pub members: Vec<MemberPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    Http,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MonitorPlan {
    pub kind: ProbeKind,
    pub delay: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub method: String,
    pub url_path: String,
    pub host: Option<String>,
    /// Inclusive ranges of accepted status codes.
    pub expected: Vec<(u16, u16)>,
}

impl MonitorPlan {
    pub fn accepts(&self, status: u16) -> bool {
        self.expected
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemberPlan {
    pub id: String,
    pub enabled: bool,
    pub addr: SocketAddr,
    pub monitor_addr: SocketAddr,
    pub weight: u16,
    pub backup: bool,
}

/// Validates `lb` and compiles it.
pub fn compile(lb: &LoadBalancer) -> Result<Plan, ValidationError> {
    let mut pool_ids = HashSet::new();
    let mut pools = Vec::with_capacity(lb.pools.len());
    for pool in &lb.pools {
        let at = format!("pool {:?}", pool.id);
        if !pool_ids.insert(pool.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at,
                id: pool.id.clone(),
            });
        }
        pools.push(compile_pool(pool, at)?);
    }
    let mut listener_ids = HashSet::new();
    let mut ports: Vec<(u16, &str)> = Vec::new();
    let mut listeners = Vec::with_capacity(lb.listeners.len());
    for l in &lb.listeners {
        let at = format!("listener {:?}", l.id);
        if !listener_ids.insert(l.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at,
                id: l.id.clone(),
            });
        }
        if let Some((_, other)) = ports.iter().find(|(p, _)| *p == l.protocol_port) {
            return Err(ValidationError::DuplicatePort {
                at,
                port: l.protocol_port,
                other: (*other).to_owned(),
            });
        }
        ports.push((l.protocol_port, &l.id));
        if !l.admin_state_up {
            continue;
        }
        listeners.push(compile_listener(l, lb.vip_address, &pools, at)?);
    }
    Ok(Plan {
        id: lb.id.clone(),
        enabled: lb.admin_state_up,
        access_log: lb.access_log,
        vip: lb.vip_address,
        listeners,
        pools,
    })
}

fn compile_listener(
    l: &Listener,
    vip: IpAddr,
    pools: &[PoolPlan],
    at: String,
) -> Result<ListenerPlan, ValidationError> {
    if l.protocol == ListenerProtocol::Udp {
        return Err(ValidationError::Unsupported {
            at,
            what: "a UDP listener (UDP belongs to the data-plane L4 LB)".into(),
        });
    }
    if l.protocol_port == 0 {
        return Err(range(at, "protocol_port", 0, "1-65535"));
    }
    let connection_limit = match l.connection_limit {
        -1 => None,
        n if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        n => return Err(range(at, "connection_limit", n, "-1 or at least 1")),
    };
    const MAX_TIMEOUT_MS: u64 = 86_400_000;
    for (field, v) in [
        ("timeout_client_data", l.timeout_client_data),
        ("timeout_member_connect", l.timeout_member_connect),
        ("timeout_member_data", l.timeout_member_data),
    ] {
        if v > MAX_TIMEOUT_MS {
            return Err(range(
                at,
                field,
                i64::try_from(v).unwrap_or(i64::MAX),
                "0-86400000 ms",
            ));
        }
    }
    if l.timeout_member_connect == 0 {
        return Err(range(at, "timeout_member_connect", 0, "1-86400000 ms"));
    }
    let optional = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let is_http = matches!(
        l.protocol,
        ListenerProtocol::Http | ListenerProtocol::TerminatedHttps
    );
    let mut insert = InsertHeaders::default();
    for (name, value) in &l.insert_headers {
        let on = match value.to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(ValidationError::InvalidValue {
                    at,
                    field: "insert_headers",
                    value: format!("{name}: {value}"),
                    why: "values are \"true\" or \"false\"",
                })
            }
        };
        let flag = match name.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => &mut insert.forwarded_for,
            "x-forwarded-port" => &mut insert.forwarded_port,
            "x-forwarded-proto" => &mut insert.forwarded_proto,
            _ => {
                return Err(ValidationError::Unsupported {
                    at,
                    what: format!("insert_headers {name:?}"),
                })
            }
        };
        *flag = on;
    }
    if insert != InsertHeaders::default() && !is_http {
        return Err(ValidationError::NotAllowed {
            at,
            field: "insert_headers",
            when: "on HTTP and TERMINATED_HTTPS listeners",
        });
    }
    let tls = match (l.protocol, &l.default_tls_certificate) {
        (ListenerProtocol::TerminatedHttps, Some(files)) => Some(files.clone()),
        (ListenerProtocol::TerminatedHttps, None) => {
            return Err(ValidationError::Missing {
                at,
                field: "default_tls_certificate",
                when: "for a TERMINATED_HTTPS listener",
            })
        }
        (_, Some(_)) => {
            return Err(ValidationError::NotAllowed {
                at,
                field: "default_tls_certificate",
                when: "on TERMINATED_HTTPS listeners",
            })
        }
        (_, None) => None,
    };
    if let Some(pool_id) = &l.default_pool_id {
        check_pool_ref(&at, l.protocol, pool_id, pools)?;
    }
    if !l.l7policies.is_empty() && !is_http {
        return Err(ValidationError::NotAllowed {
            at,
            field: "l7policies",
            when: "on HTTP and TERMINATED_HTTPS listeners",
        });
    }
    let mut policy_ids = HashSet::new();
    let mut policies = Vec::new();
    for p in &l.l7policies {
        let p_at = format!("{at} l7policy {:?}", p.id);
        if !policy_ids.insert(p.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at: p_at,
                id: p.id.clone(),
            });
        }
        if let Some(policy) = compile_policy(p, l.protocol, pools, p_at)? {
            policies.push((rank(p.action), p.position, policy));
        }
    }
    // Octavia: REJECT beats redirects to URL, which beat REDIRECT_TO_POOL;
    // position orders policies within one action.
    policies.sort_by_key(|(rank, position, _)| (*rank, *position));
    Ok(ListenerPlan {
        id: l.id.clone(),
        protocol: l.protocol,
        bind: SocketAddr::new(vip, l.protocol_port),
        connection_limit,
        default_pool: l.default_pool_id.clone(),
        client_data_timeout: optional(l.timeout_client_data),
        member_connect_timeout: Duration::from_millis(l.timeout_member_connect),
        member_data_timeout: optional(l.timeout_member_data),
        insert,
        tls,
        policies: policies.into_iter().map(|(_, _, p)| p).collect(),
    })
}

fn rank(action: L7Action) -> u8 {
    match action {
        L7Action::Reject => 0,
        L7Action::RedirectToUrl | L7Action::RedirectPrefix => 1,
        L7Action::RedirectToPool => 2,
    }
}

fn check_pool_ref(
    at: &str,
    listener: ListenerProtocol,
    pool_id: &str,
    pools: &[PoolPlan],
) -> Result<(), ValidationError> {
    let pool =
        pools
            .iter()
            .find(|p| p.id == pool_id)
            .ok_or_else(|| ValidationError::UnknownPool {
                at: at.to_owned(),
                pool_id: pool_id.to_owned(),
            })?;
    use ListenerProtocol as L;
    use PoolProtocol as P;
    // Octavia's VALID_LISTENER_POOL_PROTOCOL_MAP (minus PROXY pools, which
    // compile_pool already rejected).
    let ok = match listener {
        L::Http | L::TerminatedHttps => pool.protocol == P::Http,
        L::Https => matches!(pool.protocol, P::Https | P::Tcp),
        L::Tcp => matches!(pool.protocol, P::Http | P::Https | P::Tcp),
        L::Udp => pool.protocol == P::Udp,
    };
    if ok {
        Ok(())
    } else {
        Err(ValidationError::ProtocolPair {
            at: at.to_owned(),
            listener,
            pool: pool.protocol,
        })
    }
}

fn compile_policy(
    p: &L7Policy,
    listener: ListenerProtocol,
    pools: &[PoolPlan],
    at: String,
) -> Result<Option<PolicyPlan>, ValidationError> {
    if p.position == 0 {
        return Err(range(at, "position", 0, "at least 1"));
    }
    let code = p.redirect_http_code.unwrap_or(302);
    let redirect = matches!(p.action, L7Action::RedirectToUrl | L7Action::RedirectPrefix);
    if redirect && ![301, 302, 303, 307, 308].contains(&code) {
        return Err(range(
            at,
            "redirect_http_code",
            i64::from(code),
            "301, 302, 303, 307 or 308",
        ));
    }
    let absolute_url = |field: &'static str, v: &Option<String>| match v {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Ok(u.clone()),
        Some(u) => Err(ValidationError::InvalidValue {
            at: at.clone(),
            field,
            value: u.clone(),
            why: "must be an absolute http:// or https:// URL",
        }),
        None => Err(ValidationError::Missing {
            at: at.clone(),
            field,
            when: "for this action",
        }),
    };
    let action = match p.action {
        L7Action::Reject => PolicyAction::Reject,
        L7Action::RedirectToUrl => PolicyAction::RedirectToUrl {
            url: absolute_url("redirect_url", &p.redirect_url)?,
            code,
        },
        L7Action::RedirectPrefix => PolicyAction::RedirectPrefix {
            prefix: absolute_url("redirect_prefix", &p.redirect_prefix)?
                .trim_end_matches('/')
                .to_owned(),
            code,
        },
        L7Action::RedirectToPool => {
            let Some(pool_id) = &p.redirect_pool_id else {
                return Err(ValidationError::Missing {
                    at,
                    field: "redirect_pool_id",
                    when: "for REDIRECT_TO_POOL",
                });
            };
            check_pool_ref(&at, listener, pool_id, pools)?;
            PolicyAction::ToPool(pool_id.clone())
        }
    };
    let mut rules = Vec::new();
    for (i, r) in p.rules.iter().enumerate() {
        let r_at = format!("{at} rule {i}");
        if let Some(rule) = compile_rule(r, r_at)? {
            rules.push(rule);
        }
    }
    Ok(p.admin_state_up.then_some(PolicyPlan {
        id: p.id.clone(),
        action,
        rules,
    }))
}

fn compile_rule(r: &L7Rule, at: String) -> Result<Option<RulePlan>, ValidationError> {
    if matches!(
        r.kind,
        L7RuleType::SslConnHasCert | L7RuleType::SslVerifyResult | L7RuleType::SslDnField
    ) {
        return Err(ValidationError::Unsupported {
            at,
            what: format!("rule type {:?} (client certificates)", r.kind),
        });
    }
    let needs_key = matches!(r.kind, L7RuleType::Header | L7RuleType::Cookie);
    match (needs_key, &r.key) {
        (true, None) => {
            return Err(ValidationError::Missing {
                at,
                field: "key",
                when: "for HEADER and COOKIE rules",
            })
        }
        (false, Some(_)) => {
            return Err(ValidationError::NotAllowed {
                at,
                field: "key",
                when: "for HEADER and COOKIE rules",
            })
        }
        _ => {}
    }
    if r.value.is_empty() {
        return Err(ValidationError::InvalidValue {
            at,
            field: "value",
            value: String::new(),
            why: "must not be empty",
        });
    }
    let v = r.value.clone();
    let matcher = match r.compare_type {
        CompareType::Regex => match Regex::new(&v) {
            Ok(re) => Matcher::Regex(re),
            Err(source) => {
                return Err(ValidationError::InvalidRegex {
                    at,
                    value: v,
                    source,
                })
            }
        },
        CompareType::StartsWith => Matcher::StartsWith(v),
        CompareType::EndsWith => Matcher::EndsWith(v),
        CompareType::Contains => Matcher::Contains(v),
        CompareType::EqualTo => Matcher::EqualTo(v),
    };
    Ok(r.admin_state_up.then_some(RulePlan {
        kind: r.kind,
        // Header names compare case-insensitively; hyper stores them lower case.
        key: r.key.as_ref().map(|k| match r.kind {
            L7RuleType::Header => k.to_ascii_lowercase(),
            _ => k.clone(),
        }),
        matcher,
        invert: r.invert,
    }))
}

fn compile_pool(pool: &Pool, at: String) -> Result<PoolPlan, ValidationError> {
    match pool.protocol {
        PoolProtocol::Udp => {
            return Err(ValidationError::Unsupported {
                at,
                what: "a UDP pool (UDP belongs to the data-plane L4 LB)".into(),
            })
        }
        PoolProtocol::Proxy | PoolProtocol::Proxyv2 => {
            return Err(ValidationError::Unsupported {
                at,
                what: "PROXY protocol towards members".into(),
            })
        }
        _ => {}
    }
    let sticky_source_ip = match &pool.session_persistence {
        None => false,
        Some(sp) if sp.kind == PersistenceType::SourceIp => {
            if sp.cookie_name.is_some() {
                return Err(ValidationError::NotAllowed {
                    at,
                    field: "session_persistence.cookie_name",
                    when: "with APP_COOKIE persistence",
                });
            }
            true
        }
        Some(sp) => {
            return Err(ValidationError::Unsupported {
                at,
                what: format!("session_persistence {:?}", sp.kind),
            })
        }
    };
    let monitor = match &pool.healthmonitor {
        Some(hm) if hm.admin_state_up => Some(compile_monitor(hm, &at)?),
        Some(hm) => {
            compile_monitor(hm, &at)?;
            None
        }
        None => None,
    };
    let mut ids = HashSet::new();
    let mut members = Vec::with_capacity(pool.members.len());
    for m in &pool.members {
        let m_at = format!("{at} member {:?}", m.id);
        if !ids.insert(m.id.as_str()) {
            return Err(ValidationError::DuplicateId {
                at: m_at,
                id: m.id.clone(),
            });
        }
        members.push(compile_member(m, m_at)?);
    }
    Ok(PoolPlan {
        id: pool.id.clone(),
        enabled: pool.admin_state_up,
        protocol: pool.protocol,
        algorithm: pool.lb_algorithm,
        sticky_source_ip,
        monitor,
        members,
    })
}

fn compile_member(m: &Member, at: String) -> Result<MemberPlan, ValidationError> {
    if m.protocol_port == 0 {
        return Err(range(at, "protocol_port", 0, "1-65535"));
    }
    if m.weight > 256 {
        return Err(range(at, "weight", i64::from(m.weight), "0-256"));
    }
    if m.monitor_port == Some(0) {
        return Err(range(at, "monitor_port", 0, "1-65535"));
    }
    Ok(MemberPlan {
        id: m.id.clone(),
        enabled: m.admin_state_up,
        addr: SocketAddr::new(m.address, m.protocol_port),
        monitor_addr: SocketAddr::new(
            m.monitor_address.unwrap_or(m.address),
            m.monitor_port.unwrap_or(m.protocol_port),
        ),
        weight: m.weight,
        backup: m.backup,
    })
}

pub(crate) fn compile_monitor(
    hm: &HealthMonitor,
    pool_at: &str,
) -> Result<MonitorPlan, ValidationError> {
    let at = format!("{pool_at} healthmonitor");
    let kind = match hm.kind {
        MonitorType::Http => ProbeKind::Http,
        MonitorType::Tcp => ProbeKind::Tcp,
        other => {
            return Err(ValidationError::Unsupported {
                at,
                what: format!("monitor type {other:?}"),
            })
        }
    };
    if hm.delay == 0 {
        return Err(range(at, "delay", 0, "at least 1 s"));
    }
    if hm.timeout == 0 || hm.timeout > hm.delay {
        return Err(range(
            at,
            "timeout",
            i64::from(hm.timeout),
            "1 s up to delay",
        ));
    }
    for (field, v) in [
        ("max_retries", hm.max_retries),
        ("max_retries_down", hm.max_retries_down),
    ] {
        if !(1..=10).contains(&v) {
            return Err(range(at, field, i64::from(v), "1-10"));
        }
    }
    const METHODS: [&str; 9] = [
        "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE",
    ];
    if !METHODS.contains(&hm.http_method.as_str()) {
        return Err(ValidationError::InvalidValue {
            at,
            field: "http_method",
            value: hm.http_method.clone(),
            why: "one of CONNECT DELETE GET HEAD OPTIONS PATCH POST PUT TRACE",
        });
    }
    if !hm.url_path.starts_with('/') || hm.url_path.chars().any(|c| c.is_ascii_whitespace()) {
        return Err(ValidationError::InvalidValue {
            at,
            field: "url_path",
            value: hm.url_path.clone(),
            why: "must start with / and contain no whitespace",
        });
    }
    let expected =
        parse_expected_codes(&hm.expected_codes).ok_or_else(|| ValidationError::InvalidValue {
            at: at.clone(),
            field: "expected_codes",
            value: hm.expected_codes.clone(),
            why: "a code, a list (200,202) or a range (200-204) within 100-599",
        })?;
    Ok(MonitorPlan {
        kind,
        delay: Duration::from_secs(u64::from(hm.delay)),
        timeout: Duration::from_secs(u64::from(hm.timeout)),
        rise: hm.max_retries,
        fall: hm.max_retries_down,
        method: hm.http_method.clone(),
        url_path: hm.url_path.clone(),
        host: hm.domain_name.clone(),
        expected,
    })
}

/// Octavia's `expected_codes`: `200`, `200,202` or `200-204`.
pub fn parse_expected_codes(s: &str) -> Option<Vec<(u16, u16)>> {
    let code = |t: &str| {
        t.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (code(lo)?, code(hi)?);
                if lo > hi {
                    return None;
                }
                out.push((lo, hi));
            }
            None => {
                let c = code(part)?;
                out.push((c, c));
            }
        }
    }
    Some(out)
}

pub(crate) fn range(
    at: String,
    field: &'static str,
    value: i64,
    allowed: &'static str,
) -> ValidationError {
    ValidationError::OutOfRange {
        at,
        field,
        value,
        allowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(json: serde_json::Value) -> LoadBalancer {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "id": "lb1", "vip_address": "127.0.0.1",
            "pools": [{"id": "web", "protocol": "HTTP", "lb_algorithm": "ROUND_ROBIN",
                       "members": [{"id": "m1", "address": "127.0.0.1", "protocol_port": 8001}]},
                      {"id": "api", "protocol": "HTTP", "lb_algorithm": "SOURCE_IP", "members": []}],
            "listeners": [{"id": "http", "protocol": "HTTP", "protocol_port": 8080,
                           "default_pool_id": "web",
                           "insert_headers": {"X-Forwarded-For": "true"},
                           "l7policies": [
                             {"id": "to-api", "position": 1, "action": "REDIRECT_TO_POOL",
                              "redirect_pool_id": "api",
                              "rules": [{"type": "PATH", "compare_type": "STARTS_WITH", "value": "/api"}]},
                             {"id": "deny", "position": 2, "action": "REJECT",
                              "rules": [{"type": "HEADER", "key": "X-Evil", "compare_type": "EQUAL_TO", "value": "1"}]}
                           ]}]
        })
    }

    fn err(v: serde_json::Value) -> String {
        compile(&lb(v)).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_config_compiles_with_policies_in_octavia_order() {
        let plan = compile(&lb(base())).unwrap();
        let l = &plan.listeners[0];
        assert!(l.insert.forwarded_for && !l.insert.forwarded_port);
        // REJECT sorts before REDIRECT_TO_POOL despite its larger position.
        assert_eq!(l.policies[0].id, "deny");
        assert_eq!(l.policies[1].id, "to-api");
        assert_eq!(l.policies[0].rules[0].key.as_deref(), Some("x-evil"));
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let mut v = base();
        v["listeners"][0]["l7policies"][0]["rules"][0]["compare_type"] = "REGEX".into();
        v["listeners"][0]["l7policies"][0]["rules"][0]["value"] = "(".into();
        let e = err(v);
        assert!(
            e.contains("listener \"http\" l7policy \"to-api\" rule 0: invalid regex"),
            "{e}"
        );

        let mut v = base();
        v["listeners"][0]["default_pool_id"] = "nope".into();
        assert_eq!(
            err(v),
            "listener \"http\": pool \"nope\" does not exist in this load balancer"
        );

        let mut v = base();
        v["pools"][0]["members"][0]["weight"] = 300.into();
        assert_eq!(
            err(v),
            "pool \"web\" member \"m1\": weight = 300 is out of range (0-256)"
        );

        let mut v = base();
        v["pools"][0]["healthmonitor"] =
            serde_json::json!({"type": "HTTP", "delay": 2, "timeout": 3, "max_retries": 1});
        assert_eq!(
            err(v),
            "pool \"web\" healthmonitor: timeout = 3 is out of range (1 s up to delay)"
        );

        let mut v = base();
        v["listeners"][0]["protocol"] = "TERMINATED_HTTPS".into();
        assert!(err(v).contains("default_tls_certificate is required"));

        let mut v = base();
        v["pools"][0]["protocol"] = "TCP".into();
        assert_eq!(
            err(v),
            "listener \"http\": a Http listener cannot send to a Tcp pool"
        );

        let mut v = base();
        v["pools"][1]["session_persistence"] = serde_json::json!({"type": "HTTP_COOKIE"});
        assert!(err(v).contains("not supported by keel-lb yet"));

        let mut v = base();
        v["listeners"][0]["insert_headers"] = serde_json::json!({"X-Forwarded-For": "yes"});
        assert!(err(v).contains("invalid insert_headers"));

        let mut v = base();
        let second = serde_json::json!({"id": "again", "protocol": "TCP", "protocol_port": 8080});
        v["listeners"].as_array_mut().unwrap().push(second);
        assert!(err(v).contains("already used by listener \"http\""));
    }

    #[test]
    fn unknown_fields_are_rejected_at_parse_time() {
        let mut v = base();
        v["listeners"][0]["protocl_port"] = 1.into();
        assert!(serde_json::from_value::<LoadBalancer>(v).is_err());
    }

    #[test]
    fn expected_codes_forms() {
        assert_eq!(parse_expected_codes("200"), Some(vec![(200, 200)]));
        assert_eq!(
            parse_expected_codes("200,202"),
            Some(vec![(200, 200), (202, 202)])
        );
        assert_eq!(parse_expected_codes("200-204"), Some(vec![(200, 204)]));
        assert_eq!(parse_expected_codes("204-200"), None);
        assert_eq!(parse_expected_codes("abc"), None);
        assert_eq!(parse_expected_codes("700"), None);
    }
}
