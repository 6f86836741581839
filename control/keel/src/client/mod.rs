//! The operator's command line for the REST API: `keel login`, then
//! `keel list|show|create|delete|action <resource> ...`, `keel task wait`.
//! Human tables by default, the API's JSON with `--json`; calls that start
//! a task can `--wait` for it with a progress bar fed by the task's
//! WebSocket.

mod resources;
mod session;
mod watch;

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::Value;

pub use session::Session;

/// Options every client command takes.
#[derive(clap::Args, Debug)]
pub struct ClientOpts {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the login is kept (default: $XDG_CONFIG_HOME/keel or ~/.config/keel).
    #[arg(long, env = "KEEL_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// The API's base URL.
    #[arg(long, env = "KEEL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long, default_value = "admin")]
    pub username: String,
    /// Read the password from this file (e.g. the state dir's admin-password).
    #[arg(long, conflicts_with = "password_stdin")]
    pub password_file: Option<PathBuf>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// The authenticator's current code, for users with TOTP on.
    #[arg(long)]
    pub totp: Option<String>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Resource kind (`keel list kinds` shows them).
    pub kind: String,
    /// Filters and paging as `key=value` query parameters (e.g. `q=web`, `parent_id=...`).
    pub query: Vec<String>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    pub kind: String,
    pub id: String,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    pub kind: String,
    /// Body fields as `key=value`; a value that parses as JSON is taken as
    /// JSON (`size_gib=1`, `volume_ids=["..."]`), else as a string.
    pub fields: Vec<String>,
    /// Start from this JSON body (fields given as arguments override it).
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// The resource a backup is made of (a volume for `backups`, a VM for
    /// `vm-backups`).
    #[arg(long)]
    pub of: Option<String>,
    /// Wait for the task a 202 answer started.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    pub kind: String,
    pub id: String,
    /// Query parameters as `key=value` (e.g. `delete_volumes=true` for VMs).
    pub query: Vec<String>,
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Args, Debug)]
pub struct ActionArgs {
    pub kind: String,
    pub id: String,
    /// `start`, `stop`, `resize`, `restore`, ...
    pub action: String,
    /// Body fields as `key=value`, as for `create`.
    pub fields: Vec<String>,
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(clap::Subcommand, Debug)]
pub enum TaskCommand {
    /// Follow a task until it ends; fails if it FAILED.
    Wait {
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub fn login(args: LoginArgs) -> anyhow::Result<()> {
    let password = if let Some(path) = &args.password_file {
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
    } else if args.password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read the password from stdin")?;
        s
    } else {
        bail!("give the password with --password-file or --password-stdin");
    };
    let session = Session::login(
        &args.url,
        &args.username,
        password.trim(),
        args.totp.as_deref(),
        args.opts.config_dir.as_deref(),
    )?;
    println!("logged in to {} as {}", session.url(), args.username);
    Ok(())
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    if args.kind == "kinds" {
        for r in resources::ALL {
            println!("{:<16} {}", r.name, r.path);
        }
        return Ok(());
    }
    let kind = resources::find(&args.kind)?;
    let session = Session::load(args.opts.config_dir.as_deref())?;
    let query = query_string(&args.query)?;
    let page = session
        .call("GET", &format!("{}{query}", kind.path), None)?
        .body;
    if args.opts.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    let items = page["items"].as_array().cloned().unwrap_or_default();
    print!("{}", resources::table(kind, &items));
    if let Some(next) = page["next_cursor"].as_str() {
        println!("(more: add cursor={next})");
    }
    Ok(())
}

pub fn show(args: ShowArgs) -> anyhow::Result<()> {
    let kind = resources::find(&args.kind)?;
    let session = Session::load(args.opts.config_dir.as_deref())?;
    let body = session
        .call("GET", &format!("{}/{}", kind.path, args.id), None)?
        .body;
    print_one(&body, args.opts.json)
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    let kind = resources::find(&args.kind)?;
    let session = Session::load(args.opts.config_dir.as_deref())?;
    let mut body = match &args.body_file {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?,
        None => Value::Object(Default::default()),
    };
    merge_fields(&mut body, &args.fields)?;
    let path = resources::create_path(kind, args.of.as_deref())?;
    let reply = session.call("POST", &path, Some(body))?;
    finish(&session, reply.body, args.wait, &args.opts)
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let kind = resources::find(&args.kind)?;
    let session = Session::load(args.opts.config_dir.as_deref())?;
    let path = format!("{}/{}", kind.path, args.id);
    // Deletes are guarded by If-Match: delete what was just read.
    let current = session.call("GET", &path, None)?;
    let query = query_string(&args.query)?;
    let reply =
        session.call_if_match("DELETE", &format!("{path}{query}"), current.etag.as_deref())?;
    if reply.status == 204 {
        if !args.opts.json {
            println!("deleted {} {}", kind.name, args.id);
        }
        return Ok(());
    }
    finish(&session, reply.body, args.wait, &args.opts)
}

pub fn action(args: ActionArgs) -> anyhow::Result<()> {
    let kind = resources::find(&args.kind)?;
    let session = Session::load(args.opts.config_dir.as_deref())?;
    let mut body = Value::Object(Default::default());
    merge_fields(&mut body, &args.fields)?;
    let path = format!("{}/{}/actions/{}", kind.path, args.id, args.action);
    let reply = session.call("POST", &path, Some(body))?;
    finish(&session, reply.body, args.wait, &args.opts)
}

pub fn task(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Wait { id, opts } => {
            let session = Session::load(opts.config_dir.as_deref())?;
            let task = watch::wait(&session, &id, !opts.json)?;
            print_one(&task, opts.json)?;
            ensure_succeeded(&task)
        }
    }
}

/// Prints the answer; a task is followed to its end with `--wait`.
fn finish(session: &Session, body: Value, wait: bool, opts: &ClientOpts) -> anyhow::Result<()> {
    let is_task = body["state"].is_string() && body["resource_type"].is_string();
    if is_task && wait {
        let id = body["id"].as_str().context("task without id")?;
        let task = watch::wait(session, id, !opts.json)?;
        print_one(&task, opts.json)?;
        return ensure_succeeded(&task);
    }
    print_one(&body, opts.json)
}

fn ensure_succeeded(task: &Value) -> anyhow::Result<()> {
    if task["state"] == "SUCCEEDED" {
        Ok(())
    } else {
        bail!(
            "task {} ({}) {}: {}",
            task["id"].as_str().unwrap_or("?"),
            task["action"].as_str().unwrap_or("?"),
            task["state"].as_str().unwrap_or("?"),
            task["message"].as_str().unwrap_or("")
        )
    }
}

fn print_one(body: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(body)?);
    } else {
        print!("{}", resources::fields_table(body));
    }
    Ok(())
}

/// `key=value` pairs into the body; values that parse as JSON stay JSON.
fn merge_fields(body: &mut Value, fields: &[String]) -> anyhow::Result<()> {
    let Some(map) = body.as_object_mut() else {
        bail!("the body must be a JSON object");
    };
    for field in fields {
        let (key, value) = field
            .split_once('=')
            .with_context(|| format!("{field:?} is not key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        map.insert(key.to_owned(), value);
    }
    Ok(())
}

fn query_string(pairs: &[String]) -> anyhow::Result<String> {
    if pairs.is_empty() {
        return Ok(String::new());
    }
    let mut out = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("{pair:?} is not key=value"))?;
        out.push(format!("{}={}", encode(k), encode(v)));
    }
    Ok(format!("?{}", out.join("&")))
}

/// Percent-encodes a query component.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_json_or_strings() {
        let mut body = serde_json::json!({});
        merge_fields(
            &mut body,
            &["name=web".into(), "size_gib=2".into(), "ids=[\"a\"]".into()],
        )
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"name": "web", "size_gib": 2, "ids": ["a"]})
        );
        assert!(merge_fields(&mut body, &["novalue".into()]).is_err());
        assert_eq!(query_string(&["q=a b".into()]).unwrap(), "?q=a%20b");
    }
}
