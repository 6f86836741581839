//! `keel lb --config FILE`: runs the proxy from a JSON [`LoadBalancer`] file,
//! re-reads and applies it on SIGHUP (a bad file is logged and the running
//! configuration kept), stops on SIGTERM/SIGINT. With `--status-listen`,
//! `GET /status` answers the Octavia-style status tree with counters.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{signal, SignalKind};

use crate::{ApplyError, LoadBalancer, Proxy, ProxyOptions, StartError};

#[derive(clap::Args, Debug)]
pub struct LbArgs {
    /// Load balancer configuration (JSON, Octavia field names).
    #[arg(long)]
    pub config: PathBuf,
    /// Core threads serving connections (default: all CPUs).
    #[arg(long)]
    pub cores: Option<usize>,
    /// Pin core thread i to CPU i.
    #[arg(long)]
    pub pin_cores: bool,
    /// Serve `GET /status` (JSON) on this address.
    #[arg(long)]
    pub status_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("Cannot read {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot parse {path}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cannot apply {path}")]
    Apply {
        path: PathBuf,
        #[source]
        source: ApplyError,
    },
    #[error("Cannot start the proxy")]
    Start(#[from] StartError),
    #[error("Cannot start the control runtime")]
    Runtime(#[source] std::io::Error),
    #[error("Cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("Cannot listen for status requests on {addr}")]
    StatusListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub fn load(path: &Path) -> Result<LoadBalancer, DaemonError> {
    let text = std::fs::read_to_string(path).map_err(|source| DaemonError::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| DaemonError::ParseConfig {
        path: path.to_owned(),
        source,
    })
}

fn load_and_apply(proxy: &Proxy, path: &Path) -> Result<(), DaemonError> {
    let desired = load(path)?;
    proxy.apply(&desired).map_err(|source| DaemonError::Apply {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

pub fn run(args: LbArgs) -> Result<(), DaemonError> {
    let mut options = ProxyOptions::default();
    if let Some(n) = args.cores {
        options.cores = n;
    }
    options.pin_cores = args.pin_cores;
    let proxy = Arc::new(Proxy::start(options)?);
    load_and_apply(&proxy, &args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(async {
        let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
        if let Some(addr) = args.status_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::StatusListen { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, "status endpoint listening");
            tokio::spawn(serve_status(listener, proxy.clone()));
        }
        tracing::info!(config = %args.config.display(), cores = proxy.cores(), "keel lb is up");
        loop {
            tokio::select! {
                _ = hup.recv() => match load_and_apply(&proxy, &args.config) {
                    Ok(()) => tracing::info!(config = %args.config.display(), "reloaded"),
                    Err(e) => tracing::error!(error = %error_chain(&e), "reload failed; keeping the running configuration"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("keel lb stopping");
        Ok(())
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

async fn serve_status(listener: tokio::net::TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move {
                    let resp = if req.uri().path() == "/status" {
                        let body = serde_json::to_vec_pretty(&proxy.status()).unwrap_or_default();
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        r
                    } else {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
