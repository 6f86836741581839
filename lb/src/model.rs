//! The declarative configuration: Octavia v2 resources, field names and enums
//! kept verbatim (`project_id` and the status fields are the control plane's
//! business and not part of the desired state), so Octavia users and tooling
//! map one to one.
//!
//! One [`LoadBalancer`] is the whole desired state handed to
//! [`crate::Proxy::apply`]. Children are nested (pools with their members and
//! monitor, listeners with their L7 policies) instead of referenced by id
//! lists; cross references (`default_pool_id`, `redirect_pool_id`) stay ids.
//!
//! Where Octavia names a secret store reference (`default_tls_container_ref`)
//! keel takes file paths: the control plane decrypts certificates into files
//! the proxy reads at apply time.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

fn yes() -> bool {
    true
}

/// The load balancer: one VIP and everything served on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Address every listener binds to (IPv4 or IPv6).
    pub vip_address: IpAddr,
    /// Disabled: every listener is closed (established connections finish).
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// Emit one log line per HTTP request / TCP connection (target
    /// `keel_lb::access`). HAProxy's `option httplog` equivalent.
    #[serde(default = "yes")]
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ListenerProtocol {
    Tcp,
    Udp,
    Http,
    /// TLS passthrough: proxied as TCP, the member terminates TLS.
    Https,
    TerminatedHttps,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    pub protocol: ListenerProtocol,
    pub protocol_port: u16,
    /// Maximum concurrent client connections; -1 is unlimited.
    #[serde(default = "unlimited")]
    pub connection_limit: i64,
    #[serde(default)]
    pub default_pool_id: Option<String>,
    /// Idle time allowed while reading a client request (ms).
    #[serde(default = "default_data_timeout")]
    pub timeout_client_data: u64,
    /// Connect timeout towards a member (ms).
    #[serde(default = "default_connect_timeout")]
    pub timeout_member_connect: u64,
    /// Time allowed for a member's response headers (ms).
    #[serde(default = "default_data_timeout")]
    pub timeout_member_data: u64,
    /// Octavia's string map, e.g. `{"X-Forwarded-For": "true"}`.
    #[serde(default)]
    pub insert_headers: BTreeMap<String, String>,
    /// TERMINATED_HTTPS: the certificate served (stands in for
    /// `default_tls_container_ref`).
    #[serde(default)]
    pub default_tls_certificate: Option<TlsCertificateFiles>,
    #[serde(default)]
    pub l7policies: Vec<L7Policy>,
}

fn unlimited() -> i64 {
    -1
}
fn default_data_timeout() -> u64 {
    50_000
}
fn default_connect_timeout() -> u64 {
    5_000
}

/// A PEM certificate chain (leaf first) and its PEM private key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificateFiles {
    pub certificate_file: PathBuf,
    pub private_key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PoolProtocol {
    Tcp,
    Udp,
    Http,
    Https,
    Proxy,
    Proxyv2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbAlgorithm {
    RoundRobin,
    LeastConnections,
    SourceIp,
    /// Consistent hash of client address and port: a connection keeps its
    /// member, a client's connections spread (Octavia's OVN algorithm; the
    /// one the data plane's L4 balancer runs).
    SourceIpPort,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    pub protocol: PoolProtocol,
    pub lb_algorithm: LbAlgorithm,
    #[serde(default)]
    pub session_persistence: Option<SessionPersistence>,
    #[serde(default)]
    pub healthmonitor: Option<HealthMonitor>,
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PersistenceType {
    SourceIp,
    HttpCookie,
    AppCookie,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPersistence {
    #[serde(rename = "type")]
    pub kind: PersistenceType,
    #[serde(default)]
    pub cookie_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    pub address: IpAddr,
    pub protocol_port: u16,
    /// 0–256; 0 drains the member (no new connections).
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// Used only while every non-backup member is unavailable.
    #[serde(default)]
    pub backup: bool,
    /// Where the health monitor connects instead of address/protocol_port.
    #[serde(default)]
    pub monitor_address: Option<IpAddr>,
    #[serde(default)]
    pub monitor_port: Option<u16>,
}

fn default_weight() -> u16 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MonitorType {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "PING")]
    Ping,
    #[serde(rename = "TLS-HELLO")]
    TlsHello,
    #[serde(rename = "UDP-CONNECT")]
    UdpConnect,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthMonitor {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type")]
    pub kind: MonitorType,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// Seconds between probes.
    pub delay: u32,
    /// Seconds a probe may take; must not exceed `delay`.
    pub timeout: u32,
    /// Consecutive successes that bring a member ONLINE (rise), 1–10.
    pub max_retries: u32,
    /// Consecutive failures that take a member to ERROR (fall), 1–10.
    #[serde(default = "default_retries_down")]
    pub max_retries_down: u32,
    #[serde(default = "default_method")]
    pub http_method: String,
    #[serde(default = "default_url_path")]
    pub url_path: String,
    /// `"200"`, `"200,202"` or `"200-204"`.
    #[serde(default = "default_expected_codes")]
    pub expected_codes: String,
    /// Host header sent with HTTP probes.
    #[serde(default)]
    pub domain_name: Option<String>,
}

fn default_retries_down() -> u32 {
    3
}
fn default_method() -> String {
    "GET".into()
}
fn default_url_path() -> String {
    "/".into()
}
fn default_expected_codes() -> String {
    "200".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum L7Action {
    Reject,
    RedirectToUrl,
    RedirectToPool,
    RedirectPrefix,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Policy {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// 1-based order within the listener.
    pub position: u32,
    pub action: L7Action,
    #[serde(default)]
    pub redirect_pool_id: Option<String>,
    #[serde(default)]
    pub redirect_url: Option<String>,
    #[serde(default)]
    pub redirect_prefix: Option<String>,
    /// 301, 302, 303, 307 or 308; default 302.
    #[serde(default)]
    pub redirect_http_code: Option<u16>,
    #[serde(default)]
    pub rules: Vec<L7Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum L7RuleType {
    HostName,
    Path,
    FileType,
    Header,
    Cookie,
    SslConnHasCert,
    SslVerifyResult,
    SslDnField,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompareType {
    Regex,
    StartsWith,
    EndsWith,
    Contains,
    EqualTo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Rule {
    #[serde(default)]
    pub id: String,
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    #[serde(rename = "type")]
    pub kind: L7RuleType,
    pub compare_type: CompareType,
    /// Header or cookie name (HEADER, COOKIE rules).
    #[serde(default)]
    pub key: Option<String>,
    pub value: String,
    #[serde(default)]
    pub invert: bool,
}
