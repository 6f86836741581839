//! `keel up --join URL --join-token TOKEN`: a new host joins a control plane
//! with an API token from its boot configuration (the appliance takes both
//! from the kernel command line). The control plane answers with the shared
//! database its hosts run on (`POST /api/v1/hosts/enroll`); from there the
//! host agent registers the host with its inventory and heartbeats like any
//! other host, and the host serves the API too.
//!
//! The answer is kept in the state directory (mode 0600): a host that boots
//! while the control plane's API is down still comes up on the database it
//! was given, instead of waiting for an API it does not need.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use keel_control::api::hosts::HostEnrollment;
use serde::{Deserialize, Serialize};

/// The last enrollment, in the state directory.
const FILE: &str = "join.json";
/// One enroll call; the control plane answers at once when it is up.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries while the control plane is unreachable back off to this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct Joined {
    api: String,
    database_url: String,
    instance_id: String,
}

/// The database URL this host runs on: asked of the control plane at `api`
/// (retried with progress on the log while it is unreachable, unless an
/// earlier answer from the same API is kept), refused with the control
/// plane's reason when it says no.
pub fn database_url(api: &str, token: &str, state_dir: &Path) -> anyhow::Result<String> {
    let api = api.trim_end_matches('/');
    let url = format!("{api}/api/v1/hosts/enroll");
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("--join {api}: give the control plane's API as http://host:port");
    }
    let cache = state_dir.join(FILE);
    let kept = read(&cache)?.filter(|joined| joined.api == api);
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let answer = ureq::post(&url)
            .timeout(CALL_TIMEOUT)
            .set("Authorization", &format!("Bearer {token}"))
            .call();
        match answer {
            Ok(response) => {
                let enrollment: HostEnrollment = response
                    .into_json()
                    .with_context(|| format!("The answer of {url} is not an enrollment"))?;
                if let Some(kept) = &kept {
                    if kept.instance_id != enrollment.instance_id {
                        tracing::warn!(
                            before = %kept.instance_id,
                            now = %enrollment.instance_id,
                            "the control plane at {api} is another cloud than at the last join"
                        );
                    }
                }
                write(
                    &cache,
                    &Joined {
                        api: api.to_owned(),
                        database_url: enrollment.database_url.clone(),
                        instance_id: enrollment.instance_id.clone(),
                    },
                )?;
                tracing::info!(
                    control_plane = %enrollment.instance_id,
                    attempt,
                    "joined the control plane at {api}"
                );
                return Ok(enrollment.database_url);
            }
            Err(ureq::Error::Status(code, response)) => {
                let detail = response
                    .into_json::<serde_json::Value>()
                    .ok()
                    .and_then(|p| {
                        p["detail"]
                            .as_str()
                            .or(p["title"].as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                bail!("The control plane at {api} refused this host (HTTP {code}): {detail}");
            }
            Err(ureq::Error::Transport(error)) => {
                if let Some(kept) = kept {
                    tracing::warn!(
                        %error,
                        "the control plane at {api} is unreachable: using the database of the last join"
                    );
                    return Ok(kept.database_url);
                }
                tracing::warn!(
                    attempt,
                    %error,
                    retry_in_ms = backoff.as_millis(),
                    "waiting for the control plane at {api}"
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Option<Joined>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is damaged: delete it to join again", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
    }
}

/// Readable by root only: it holds the database password.
fn write(path: &Path, joined: &Joined) -> anyhow::Result<()> {
    crate::private_file::write(path, &serde_json::to_vec_pretty(joined)?)
}
