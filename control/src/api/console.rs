//! VM consoles over WebSocket. `POST /vms/{id}/console` gives a one-time
//! ticket (valid for [`TICKET_TTL`]); `GET /console/{ticket}` upgrades to a
//! WebSocket that carries the VM's VNC (RFB, what noVNC speaks) or its
//! serial console as binary frames. The ticket is the credential because
//! browsers cannot set an `Authorization` header on a WebSocket.
//!
//! The VNC port and the serial socket are what the host agent recorded on
//! the VM; the API never asks the hypervisor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::ValidJson;
use super::problem::{ApiError, Problem};
use super::respond::load;
use super::vms::{self, VmSpec};
use super::AppState;

pub const TICKET_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    Vnc,
    Serial,
}

#[derive(Debug, Clone)]
enum Target {
    Vnc(u16),
    Serial(std::path::PathBuf),
}

/// Outstanding tickets: each is used at most once, and only until it expires.
#[derive(Debug, Default, Clone)]
pub struct Tickets(Arc<Mutex<HashMap<String, (Target, Instant)>>>);

impl Tickets {
    fn issue(&self, target: Target) -> String {
        let ticket = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (_, at)| at.elapsed() < TICKET_TTL);
        map.insert(ticket.clone(), (target, Instant::now()));
        ticket
    }

    fn redeem(&self, ticket: &str) -> Option<Target> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (target, at) = map.remove(ticket)?;
        (at.elapsed() < TICKET_TTL).then_some(target)
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleRequest {
    /// `vnc` (default) or `serial`.
    #[serde(default = "default_kind")]
    pub kind: ConsoleKind,
}

fn default_kind() -> ConsoleKind {
    ConsoleKind::Vnc
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsoleTicket {
    pub kind: ConsoleKind,
    /// Open a WebSocket here (binary frames) within `expires_in_seconds`.
    pub url: String,
    pub expires_in_seconds: u64,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(console_ticket))
        .routes(routes!(console_socket))
}

#[utoipa::path(post, path = "/vms/{id}/console", tag = "compute", request_body = ConsoleRequest,
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "A one-time ticket URL for the WebSocket", body = ConsoleTicket),
        (status = 409, description = "The VM is not running (or its console is not known yet)", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn console_ticket(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<ConsoleRequest>,
) -> Result<Json<ConsoleTicket>, ApiError> {
    let mut conn = state.store.pool().acquire().await?;
    let vm = load(
        &mut conn,
        &principal,
        Family::Compute,
        Action::Update,
        vms::KIND,
        &id,
    )
    .await?;
    if vm.meta.status != vms::RUNNING && vm.meta.status != vms::PAUSED {
        return Err(ApiError::Conflict(format!(
            "the VM is {}; its console exists while RUNNING or PAUSED",
            vm.meta.status
        )));
    }
    let spec: VmSpec = vm.spec()?;
    let target = match body.kind {
        ConsoleKind::Vnc => Target::Vnc(spec.vnc_port.ok_or_else(|| {
            ApiError::Conflict("the VM's VNC port is not known yet; retry in a second".into())
        })?),
        ConsoleKind::Serial => Target::Serial(
            state
                .state_dir
                .as_path()
                .join("vms")
                .join(&id)
                .join("console.sock"),
        ),
    };
    let ticket = state.consoles.issue(target);
    Ok(Json(ConsoleTicket {
        kind: body.kind,
        url: format!("/api/v1/console/{ticket}"),
        expires_in_seconds: TICKET_TTL.as_secs(),
    }))
}

#[utoipa::path(get, path = "/console/{ticket}", tag = "compute", params(("ticket" = String, Path)),
    responses(
        (status = 101, description = "WebSocket carrying the console's bytes"),
        (status = 404, description = "Unknown, used or expired ticket", body = Problem, content_type = "application/problem+json"),
    ))]
async fn console_socket(
    State(state): State<AppState>,
    Path(ticket): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let target = state.consoles.redeem(&ticket).ok_or(ApiError::NotFound)?;
    Ok(upgrade
        .protocols(["binary"])
        .on_upgrade(move |socket| async move {
            let result = match target {
                Target::Vnc(port) => {
                    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        Ok(s) => pump(socket, s).await,
                        Err(e) => Err(e),
                    }
                }
                Target::Serial(path) => match tokio::net::UnixStream::connect(&path).await {
                    Ok(s) => pump(socket, s).await,
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "console session ended");
            }
        }))
}

/// Copies bytes between the WebSocket and the console until either side closes.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocket,
    stream: S,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    let _ = ws.send(Message::Close(None)).await;
                    return Ok(());
                }
                if ws.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                    return Ok(());
                }
            }
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(data))) => wr.write_all(&data).await?,
                Some(Ok(Message::Text(text))) => wr.write_all(text.as_bytes()).await?,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
        }
    }
}
