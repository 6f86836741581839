//! `keel cdp replica`: accepts one source connection at a time, says where
//! it is (`Hello`), then verifies, applies and acknowledges each segment.
//! A refused segment (garbage, replay, gap, broken chain, wrong group or
//! site) is logged and answered with `Refuse`; the connection is closed
//! and nothing of it is applied.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::store::{Replica, StoreError};
use crate::journal::now_ms;
use crate::transport::tls::{server_config, TlsError, TlsFiles};
use crate::transport::wire::{Frame, WireError, FLAG_ZSTD, MAX_FRAME};

/// Errors that end the replica server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listen address failed.
    #[error("Cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// TLS material unusable.
    #[error("TLS setup failed")]
    Tls(#[from] TlsError),
    /// Opening the replica directory failed.
    #[error("Cannot open replica")]
    Open(#[source] StoreError),
}

/// Errors of one connection (logged, the server goes on).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("TLS failed")]
    Tls(#[source] rustls::Error),
    #[error("Connection failed")]
    Wire(#[from] WireError),
    #[error("Socket setup failed")]
    Io(#[from] std::io::Error),
    #[error("Unexpected frame from source")]
    Protocol,
    #[error("Segment refused: {0}")]
    Refused(String),
    #[error("Cannot apply segment")]
    Apply(#[source] StoreError),
}

/// A source that sent nothing (not even a heartbeat segment) for this
/// long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600 + 600);
/// A TLS handshake takes at most this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket read timeout: how often a waiting read checks for a stop.
const POLL_STOP: Duration = Duration::from_millis(200);

/// A reader that retries socket timeouts without losing the bytes of a
/// partly read frame (rustls keeps partial TLS records), until stopped or
/// idle for [`IDLE_TIMEOUT`].
struct Patient<'a, R> {
    inner: &'a mut R,
    stop: &'a AtomicBool,
    idle: Duration,
}

impl<R: std::io::Read> std::io::Read for Patient<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.idle += POLL_STOP;
                    if self.stop.load(Ordering::Acquire) {
                        // Not `Interrupted`: `read_exact` would retry it.
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "stopped",
                        ));
                    }
                    if self.idle >= IDLE_TIMEOUT {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "source idle",
                        ));
                    }
                }
                other => {
                    self.idle = Duration::ZERO;
                    return other;
                }
            }
        }
    }
}

/// What the replica serves.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Replica directory.
    pub dir: PathBuf,
    /// Consistency group.
    pub group_id: u64,
    /// Source site whose segments are accepted.
    pub source_site: u64,
    /// Recovery points (undo logs) kept.
    pub keep: usize,
    /// TLS material.
    pub tls: TlsFiles,
}

/// `status.json` of the replica directory.
#[derive(Debug, Serialize)]
struct ReplicaStatus {
    last_seq: u64,
    last_cut_ms: u64,
    lag_seconds: f64,
    consistent: bool,
    recovery_points: Vec<u64>,
    segments_applied: u64,
    refused: u64,
    bytes_applied: u64,
}

/// Serves until `stop` is set.
pub fn serve(config: &ReplicaConfig, stop: &AtomicBool) -> Result<(), ServeError> {
    let tls = server_config(&config.tls)?;
    let mut replica = Replica::open(
        &config.dir,
        config.group_id,
        config.source_site,
        config.keep,
    )
    .map_err(ServeError::Open)?;
    let listener =
        TcpListener::bind(config.listen).map_err(|e| ServeError::Listen(config.listen, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ServeError::Listen(config.listen, e))?;
    tracing::info!(listen = %config.listen, last_seq = replica.state().last_seq, "replica listening");
    let mut stats = Stats::default();
    write_status(config, &replica, &stats);
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                match connection(&tls, tcp, config, &mut replica, &mut stats, stop) {
                    Ok(()) => tracing::info!(%peer, "source disconnected"),
                    Err(e) => {
                        tracing::warn!(%peer, error = %format!("{e:#}"), "source connection ended")
                    }
                }
                write_status(config, &replica, &stats);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                write_status(config, &replica, &stats);
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    applied: u64,
    refused: u64,
    bytes: u64,
}

fn connection(
    tls: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    config: &ReplicaConfig,
    replica: &mut Replica,
    stats: &mut Stats,
    stop: &AtomicBool,
) -> Result<(), ConnError> {
    tcp.set_nonblocking(false)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(POLL_STOP))?;
    let conn = rustls::ServerConnection::new(tls.clone()).map_err(ConnError::Tls)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Handshake first, retrying the short socket timeouts.
    let mut waited = Duration::ZERO;
    while s.conn.is_handshaking() {
        match s.conn.complete_io(&mut s.sock) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                waited += POLL_STOP;
                if stop.load(Ordering::Acquire) || waited > HANDSHAKE_TIMEOUT {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let st = replica.state();
    Frame::Hello {
        group_id: config.group_id,
        site_id: config.source_site,
        last_seq: st.last_seq,
        last_checksum: st.last_checksum,
    }
    .write_to(&mut s)?;
    loop {
        let frame = match Frame::read_from(&mut Patient {
            inner: &mut s,
            stop,
            idle: Duration::ZERO,
        }) {
            Ok(f) => f,
            Err(WireError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        };
        let (seq, flags, bytes) = match frame {
            Frame::Segment { seq, flags, bytes } => (seq, flags, bytes),
            // Between segments: the disks are at the applied state.
            req @ Frame::DigestRequest { .. } => {
                let reason = if replica.state().promoted {
                    "replica promoted".to_owned()
                } else {
                    match crate::transport::digest::answer(&config.dir, &req) {
                        Ok(answer) => {
                            answer.write_to(&mut s)?;
                            continue;
                        }
                        Err(r) => r,
                    }
                };
                stats.refused += 1;
                tracing::error!(reason, "digest request refused");
                let _ = Frame::Refuse {
                    reason: reason.clone(),
                }
                .write_to(&mut s);
                return Err(ConnError::Refused(reason));
            }
            _ => return Err(ConnError::Protocol),
        };
        let bytes = if flags & FLAG_ZSTD != 0 {
            match zstd::bulk::decompress(&bytes, MAX_FRAME as usize) {
                Ok(b) => b,
                Err(e) => return refuse(&mut s, stats, seq, &format!("bad zstd payload: {e}")),
            }
        } else {
            bytes
        };
        if let Ok(seg) = crate::journal::format::Segment::verify(&bytes) {
            if seg.header.seq != seq {
                return refuse(&mut s, stats, seq, "frame and segment sequence differ");
            }
        }
        match replica.receive(&bytes) {
            Ok(applied) => {
                stats.applied += 1;
                stats.bytes += bytes.len() as u64;
                Frame::Ack { seq: applied }.write_to(&mut s)?;
                write_status(config, replica, stats);
                tracing::debug!(seq = applied, "segment applied");
            }
            Err(StoreError::Refused(r)) => return refuse(&mut s, stats, seq, &r.to_string()),
            Err(e) => return Err(ConnError::Apply(e)),
        }
    }
}

fn refuse(
    s: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    stats: &mut Stats,
    seq: u64,
    reason: &str,
) -> Result<(), ConnError> {
    stats.refused += 1;
    tracing::error!(seq, reason, "segment refused; nothing applied");
    let _ = Frame::Refuse {
        reason: reason.to_owned(),
    }
    .write_to(s);
    Err(ConnError::Refused(reason.to_owned()))
}

fn write_status(config: &ReplicaConfig, replica: &Replica, stats: &Stats) {
    let st = replica.state();
    let last_cut_ms = st.history.last().map_or(0, |p| p.cut_ms);
    let status = ReplicaStatus {
        last_seq: st.last_seq,
        last_cut_ms,
        lag_seconds: if last_cut_ms > 0 {
            now_ms().saturating_sub(last_cut_ms) as f64 / 1000.0
        } else {
            -1.0
        },
        consistent: !st.in_resync,
        recovery_points: replica.points().iter().map(|p| p.seq).collect(),
        segments_applied: stats.applied,
        refused: stats.refused,
        bytes_applied: stats.bytes,
    };
    let path = config.dir.join("status.json");
    if let Ok(b) = serde_json::to_vec_pretty(&status) {
        let tmp = config.dir.join("status.json.tmp");
        if std::fs::write(&tmp, b).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}
