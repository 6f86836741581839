//! Following a task to its end over `GET /tasks/{id}/watch` (a WebSocket
//! pushing the task on every change), drawn as a progress bar on a
//! terminal. Where the WebSocket cannot be opened, polls instead.

use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;

use super::Session;

fn ended(task: &Value) -> bool {
    task["state"] == "SUCCEEDED" || task["state"] == "FAILED"
}

/// Returns the task once it SUCCEEDED or FAILED.
pub fn wait(session: &Session, id: &str, show: bool) -> anyhow::Result<Value> {
    let bar = if show {
        ProgressBar::new(100)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let update = |task: &Value| {
        bar.set_position(task["progress"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{} {} {}",
            task["action"].as_str().unwrap_or(""),
            task["state"].as_str().unwrap_or(""),
            task["message"].as_str().unwrap_or("")
        ));
    };
    let result = match watch_socket(session, id, &update) {
        Ok(Some(task)) => Ok(task),
        Ok(None) | Err(_) => poll(session, id, &update),
    };
    bar.finish_and_clear();
    result
}

fn watch_socket(
    session: &Session,
    id: &str,
    update: &dyn Fn(&Value),
) -> anyhow::Result<Option<Value>> {
    let url = format!(
        "{}/api/v1/tasks/{id}/watch",
        session.url().replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", session.token()).parse()?,
    );
    let (mut ws, _) = tungstenite::connect(req).context("open the task's WebSocket")?;
    let mut last = None;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let task: Value = serde_json::from_str(&text)?;
                update(&task);
                if ended(&task) {
                    return Ok(Some(task));
                }
                last = Some(task);
            }
            Ok(tungstenite::Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {
                return Ok(last.filter(ended));
            }
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn poll(session: &Session, id: &str, update: &dyn Fn(&Value)) -> anyhow::Result<Value> {
    loop {
        let task = session
            .call("GET", &format!("/api/v1/tasks/{id}"), None)?
            .body;
        update(&task);
        if ended(&task) {
            return Ok(task);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
