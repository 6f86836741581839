//! The login the CLI keeps between runs (URL and tokens, in a file only
//! its owner can read) and authenticated calls that refresh an expired
//! access token once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    url: String,
    access_token: String,
    refresh_token: String,
}

pub struct Session {
    stored: std::cell::RefCell<Stored>,
    file: PathBuf,
}

pub struct Reply {
    pub status: u16,
    pub etag: Option<String>,
    pub body: Value,
}

fn config_file(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_owned(),
        None => match std::env::var_os("XDG_CONFIG_HOME") {
            Some(x) => PathBuf::from(x).join("keel"),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".config")
                .join("keel"),
        },
    };
    Ok(dir.join("login.json"))
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

/// The error an API answer carries (RFC 9457 problem), as one line.
fn problem(method: &str, path: &str, status: u16, body: &Value) -> anyhow::Error {
    let title = body["title"].as_str().unwrap_or("error");
    let detail = body["detail"].as_str().unwrap_or("");
    let field = body["field"]
        .as_str()
        .map(|f| format!(" (field {f})"))
        .unwrap_or_default();
    anyhow::anyhow!("{method} {path}: {status} {title}: {detail}{field}")
}

impl Session {
    pub fn login(
        url: &str,
        username: &str,
        password: &str,
        totp: Option<&str>,
        dir: Option<&Path>,
    ) -> anyhow::Result<Session> {
        let url = url.trim_end_matches('/').to_owned();
        let body: Value = match agent().post(&format!("{url}/api/v1/auth/login")).send_json(
            serde_json::json!({"username": username, "password": password, "totp": totp}),
        ) {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(status, r)) => {
                let body = r.into_json().unwrap_or(Value::Null);
                return Err(problem("POST", "/api/v1/auth/login", status, &body));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot reach {url}")),
        };
        let session = Session {
            stored: std::cell::RefCell::new(Stored {
                url,
                access_token: body["access_token"]
                    .as_str()
                    .context("no access_token")?
                    .to_owned(),
                refresh_token: body["refresh_token"]
                    .as_str()
                    .context("no refresh_token")?
                    .to_owned(),
            }),
            file: config_file(dir)?,
        };
        session.save()?;
        Ok(session)
    }

    pub fn load(dir: Option<&Path>) -> anyhow::Result<Session> {
        let file = config_file(dir)?;
        let text = std::fs::read_to_string(&file).map_err(|_| {
            anyhow::anyhow!(
                "not logged in: run `keel login` first ({} missing)",
                file.display()
            )
        })?;
        let stored: Stored = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged; log in again", file.display()))?;
        Ok(Session {
            stored: std::cell::RefCell::new(stored),
            file,
        })
    }

    fn save(&self) -> anyhow::Result<()> {
        let stored = serde_json::to_string(&*self.stored.borrow())?;
        crate::private_file::write(&self.file, stored.as_bytes())
    }

    pub fn url(&self) -> String {
        self.stored.borrow().url.clone()
    }

    pub fn token(&self) -> String {
        self.stored.borrow().access_token.clone()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Reply> {
        self.send(method, path, None, body, true)
    }

    pub fn call_if_match(
        &self,
        method: &str,
        path: &str,
        etag: Option<&str>,
    ) -> anyhow::Result<Reply> {
        self.send(method, path, etag, None, true)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        etag: Option<&str>,
        body: Option<Value>,
        retry: bool,
    ) -> anyhow::Result<Reply> {
        let url = format!("{}{path}", self.url());
        let mut req = agent()
            .request(method, &url)
            .set("authorization", &format!("Bearer {}", self.token()));
        if let Some(tag) = etag {
            req = req.set("if-match", tag);
        }
        let result = match &body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        match result {
            Ok(r) => Ok(Reply {
                status: r.status(),
                etag: r.header("etag").map(str::to_owned),
                body: if r.status() == 204 {
                    Value::Null
                } else {
                    r.into_json().unwrap_or(Value::Null)
                },
            }),
            Err(ureq::Error::Status(401, _)) if retry => {
                self.refresh()?;
                self.send(method, path, etag, body, false)
            }
            Err(ureq::Error::Status(status, r)) => {
                let body = r.into_json().unwrap_or(Value::Null);
                Err(problem(method, path, status, &body))
            }
            Err(e) => Err(e).with_context(|| format!("cannot reach {}", self.url())),
        }
    }

    /// Trades the refresh token for a new pair and keeps it.
    fn refresh(&self) -> anyhow::Result<()> {
        let url = format!("{}/api/v1/auth/refresh", self.url());
        let refresh = self.stored.borrow().refresh_token.clone();
        let body: Value = match agent()
            .post(&url)
            .send_json(serde_json::json!({"refresh_token": refresh}))
        {
            Ok(r) => r.into_json()?,
            Err(_) => bail!("the login expired: run `keel login` again"),
        };
        {
            let mut s = self.stored.borrow_mut();
            s.access_token = body["access_token"]
                .as_str()
                .context("no access_token")?
                .to_owned();
            s.refresh_token = body["refresh_token"]
                .as_str()
                .context("no refresh_token")?
                .to_owned();
        }
        self.save()
    }
}
