//! The disk server's control channel: a unix stream socket beside the
//! vhost-user socket over which the host agent manages the live
//! changed-block bitmaps of a served disk (for backups while it runs).
//!
//! # Protocol
//! One JSON [`Request`] per line, answered by one JSON [`Response`] per
//! line, any number per connection, connections served concurrently. Bitmaps can be megabytes: a frozen one
//! travels through a file whose path the request names
//! ([`FrozenBitmap::write_file`] / [`FrozenBitmap::read_file`]).
//!
//! # Threading model
//! [`spawn`] accepts on its own thread and serves each connection on a
//! thread of its own; nothing runs on the I/O workers. Bitmap operations take the CBT's
//! control mutex (never taken on the write path); [`Request::Drain`] takes
//! each worker's lock once, which waits for the kick being served.
//!
//! # Trust
//! The socket is created 0600: only the agent (root) talks to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cbt::{Cbt, FrozenBitmap};
use crate::server::StopHandle;

/// Longest request line accepted (a request names a bitmap and a path).
const MAX_LINE: u64 = 8 << 10;

/// How long the client waits for an answer (a freeze of a large disk
/// writes a few MB).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// One control operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Geometry and bitmaps. (Variants without fields are empty structs,
    /// so `deny_unknown_fields` holds for them too.)
    Status {},
    /// Adds bitmap `name` (tracking from now on) unless it exists.
    AddBitmap {
        /// Bitmap name.
        name: String,
    },
    /// Waits until no request taken from a queue is still in flight.
    /// With the VM paused (QEMU stops the rings, see
    /// `BlockDevice::stop_vring`) this is already the case; it is a cheap
    /// check that also holds for frontends that do not stop them.
    Drain {},
    /// Takes bitmap `name` out, clears it, and writes it to `path`
    /// (created 0600, replaced).
    Freeze {
        /// Bitmap name.
        name: String,
        /// Where the frozen bitmap goes.
        path: PathBuf,
    },
    /// ORs a frozen bitmap (as written by `Freeze`) back into its live
    /// bitmap, after the backup that froze it failed.
    MergeBack {
        /// The frozen bitmap file.
        path: PathBuf,
    },
}

/// State of one live bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// False after a crash until its next freeze.
    pub valid: bool,
    /// Dirty granules now.
    pub dirty_granules: u64,
}

/// The answer to one [`Request`]; `error` is set when it failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Why the request failed (the other fields are then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Disk size in bytes (`status`).
    #[serde(default)]
    pub disk_size: u64,
    /// Bytes per bit (`status`, `freeze`).
    #[serde(default)]
    pub granularity: u64,
    /// Bitmaps (`status`).
    #[serde(default)]
    pub bitmaps: Vec<BitmapInfo>,
    /// `add_bitmap`: whether it was created now.
    #[serde(default)]
    pub added: bool,
    /// `freeze`: whether the frozen bits are complete (false after a crash).
    #[serde(default)]
    pub valid: bool,
    /// `freeze`: dirty granules frozen.
    #[serde(default)]
    pub dirty_granules: u64,
}

impl Response {
    fn failed(e: impl std::fmt::Display) -> Self {
        Self {
            error: Some(e.to_string()),
            ..Self::default()
        }
    }
}

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding the socket failed.
    #[error("Cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// Connecting or talking to the server failed.
    #[error("Control socket {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The answer was not a [`Response`].
    #[error("Invalid answer on {0}")]
    Answer(PathBuf, #[source] serde_json::Error),
    /// The server answered with an error.
    #[error("Disk server refused: {0}")]
    Refused(String),
}

/// What the control thread serves.
#[derive(Clone)]
pub struct ControlTarget {
    /// The disk's tracker (None: no CBT, bitmap operations fail).
    pub cbt: Option<Arc<Cbt>>,
    /// Reaches the current frontend connection's workers (for `Drain`).
    pub stop: StopHandle,
    /// Disk size in bytes.
    pub disk_size: u64,
}

/// Binds `path` (replacing an old socket) and serves it on a new thread
/// for the life of the process.
pub fn spawn(path: &Path, target: ControlTarget) -> Result<(), ControlError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| ControlError::Listen(path.into(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ControlError::Listen(path.into(), e))?;
    std::thread::Builder::new()
        .name("vhost-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(conn) => {
                        // A thread per connection: a client that stalls
                        // mid-line must not lock the agent out.
                        let target = target.clone();
                        let spawned = std::thread::Builder::new()
                            .name("vhost-control-conn".into())
                            .spawn(move || {
                                if let Err(e) = serve_connection(conn, &target) {
                                    tracing::warn!(error = %e, "control connection ended with error");
                                }
                            });
                        if let Err(e) = spawned {
                            tracing::warn!(error = %e, "cannot start a control connection thread");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control accept failed"),
                }
            }
        })
        .map_err(|e| ControlError::Listen(path.into(), e))?;
    Ok(())
}

fn serve_connection(conn: UnixStream, target: &ControlTarget) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let answer = if !line.ends_with('\n') {
            // Over-long line: answer and drop the connection.
            let mut a = serde_json::to_vec(&Response::failed("request line too long"))?;
            a.push(b'\n');
            out.write_all(&a)?;
            return Ok(());
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => handle(&req, target),
                Err(e) => Response::failed(format!("invalid request: {e}")),
            }
        };
        let mut a = serde_json::to_vec(&answer)?;
        a.push(b'\n');
        out.write_all(&a)?;
    }
}

/// Runs one request.
pub fn handle(req: &Request, target: &ControlTarget) -> Response {
    let cbt = || {
        target
            .cbt
            .as_deref()
            .ok_or("the disk server does not track changed blocks")
    };
    let result = (|| -> Result<Response, String> {
        Ok(match req {
            Request::Status {} => Response {
                disk_size: target.disk_size,
                granularity: target.cbt.as_ref().map_or(0, |c| c.granularity()),
                bitmaps: target
                    .cbt
                    .as_ref()
                    .map(|c| {
                        c.status()
                            .into_iter()
                            .map(|b| BitmapInfo {
                                name: b.name,
                                valid: b.valid,
                                dirty_granules: b.dirty_granules,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Response::default()
            },
            Request::AddBitmap { name } => {
                let cbt = cbt()?;
                let added = cbt.peek(name).is_err();
                if added {
                    cbt.add_bitmap(name).map_err(|e| e.to_string())?;
                }
                Response {
                    added,
                    ..Response::default()
                }
            }
            Request::Drain {} => {
                target.stop.drain();
                Response::default()
            }
            Request::Freeze { name, path } => {
                let cbt = cbt()?;
                let frozen = cbt.freeze_and_reset(name).map_err(|e| e.to_string())?;
                if let Err(e) = frozen.write_file(path) {
                    // Nobody will get these bits: they go back.
                    if let Err(m) = cbt.merge_back(&frozen) {
                        tracing::error!(error = %m, "cannot merge a frozen bitmap back");
                    }
                    return Err(format!("write {}: {e}", path.display()));
                }
                Response {
                    granularity: frozen.granularity,
                    valid: frozen.valid,
                    dirty_granules: frozen.words.iter().map(|w| u64::from(w.count_ones())).sum(),
                    ..Response::default()
                }
            }
            Request::MergeBack { path } => {
                let frozen = FrozenBitmap::read_file(path)
                    .map_err(|e| format!("read {}: {e}", path.display()))?;
                cbt()?.merge_back(&frozen).map_err(|e| e.to_string())?;
                Response::default()
            }
        })
    })();
    result.unwrap_or_else(Response::failed)
}

/// A connection to a disk server's control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let io = |e| ControlError::Io(path.into(), e);
        let conn = UnixStream::connect(path).map_err(io)?;
        conn.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
        conn.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
        Ok(Self {
            path: path.into(),
            writer: conn.try_clone().map_err(io)?,
            reader: BufReader::new(conn),
        })
    }

    /// Sends `req`; an answer with `error` set becomes [`ControlError::Refused`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ControlError> {
        let io = |e| ControlError::Io(self.path.clone(), e);
        let mut line =
            serde_json::to_vec(req).map_err(|e| ControlError::Answer(self.path.clone(), e))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        let n = (&mut self.reader)
            .take(64 << 20)
            .read_line(&mut answer)
            .map_err(io)?;
        if n == 0 {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let r: Response = serde_json::from_str(&answer)
            .map_err(|e| ControlError::Answer(self.path.clone(), e))?;
        match r.error {
            Some(e) => Err(ControlError::Refused(e)),
            None => Ok(r),
        }
    }

    /// [`Request::Status`].
    pub fn status(&mut self) -> Result<Response, ControlError> {
        self.call(&Request::Status {})
    }

    /// [`Request::AddBitmap`]; true when it was created now.
    pub fn add_bitmap(&mut self, name: &str) -> Result<bool, ControlError> {
        Ok(self.call(&Request::AddBitmap { name: name.into() })?.added)
    }

    /// [`Request::Drain`].
    pub fn drain(&mut self) -> Result<(), ControlError> {
        self.call(&Request::Drain {}).map(drop)
    }

    /// [`Request::Freeze`] into `path`, read back.
    pub fn freeze(&mut self, name: &str, path: &Path) -> Result<FrozenBitmap, ControlError> {
        self.call(&Request::Freeze {
            name: name.into(),
            path: path.into(),
        })?;
        FrozenBitmap::read_file(path).map_err(|e| ControlError::Io(path.into(), e))
    }

    /// [`Request::MergeBack`] of `frozen` (written to `path` first).
    pub fn merge_back(&mut self, frozen: &FrozenBitmap, path: &Path) -> Result<(), ControlError> {
        frozen
            .write_file(path)
            .map_err(|e| ControlError::Io(path.into(), e))?;
        self.call(&Request::MergeBack { path: path.into() })
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbt::DEFAULT_GRANULARITY;
    use crate::hook::{WriteData, WriteHook};

    const SIZE: u64 = 64 << 20;

    fn server(dir: &Path) -> (PathBuf, Arc<Cbt>) {
        let cbt = Arc::new(Cbt::new(SIZE, DEFAULT_GRANULARITY).unwrap());
        let sock = dir.join("disk.ctl");
        spawn(
            &sock,
            ControlTarget {
                cbt: Some(cbt.clone()),
                stop: StopHandle::new(),
                disk_size: SIZE,
            },
        )
        .unwrap();
        (sock, cbt)
    }

    #[test]
    fn add_freeze_merge_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, cbt) = server(dir.path());
        let mut c = Client::connect(&sock).unwrap();
        assert!(c.add_bitmap("b").unwrap());
        assert!(!c.add_bitmap("b").unwrap(), "existing bitmap is kept");
        cbt.on_write(0, 4096, &WriteData::new(&[]));
        cbt.on_write(10 << 20, 1, &WriteData::new(&[]));
        let st = c.status().unwrap();
        assert_eq!(st.disk_size, SIZE);
        assert_eq!(st.granularity, DEFAULT_GRANULARITY);
        let b = st.bitmaps.iter().find(|b| b.name == "b").unwrap();
        assert_eq!(b.dirty_granules, 2);
        c.drain().unwrap();

        let file = dir.path().join("frozen");
        let f = c.freeze("b", &file).unwrap();
        assert!(f.valid);
        assert_eq!(
            f.dirty_granules(),
            vec![0, (10 << 20) / DEFAULT_GRANULARITY]
        );
        assert_eq!(cbt.peek("b").unwrap().dirty_granules(), Vec::<u64>::new());
        // A write after the freeze lands in the new epoch.
        cbt.on_write(20 << 20, 1, &WriteData::new(&[]));
        // The backup failed: the frozen bits go back, the new ones stay.
        c.merge_back(&f, &file).unwrap();
        assert_eq!(
            cbt.peek("b").unwrap().dirty_granules(),
            vec![
                0,
                (10 << 20) / DEFAULT_GRANULARITY,
                (20 << 20) / DEFAULT_GRANULARITY
            ]
        );
        // Several connections in a row.
        drop(c);
        let mut c = Client::connect(&sock).unwrap();
        assert_eq!(c.status().unwrap().bitmaps.len(), 1);
    }

    #[test]
    fn errors_are_answers_not_disconnects() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _cbt) = server(dir.path());
        let mut c = Client::connect(&sock).unwrap();
        let e = c.freeze("missing", &dir.path().join("f")).unwrap_err();
        assert!(matches!(e, ControlError::Refused(m) if m.contains("missing")));
        // Hostile lines: garbage, unknown op, unknown field.
        let mut raw = UnixStream::connect(&sock).unwrap();
        let mut reader = BufReader::new(raw.try_clone().unwrap());
        for bad in [
            "not json\n",
            "{\"op\":\"format_disk\"}\n",
            "{\"op\":\"status\",\"x\":1}\n",
        ] {
            raw.write_all(bad.as_bytes()).unwrap();
            let mut a = String::new();
            reader.read_line(&mut a).unwrap();
            let r: Response = serde_json::from_str(&a).unwrap();
            assert!(r.error.unwrap().contains("invalid request"));
        }
        // A merge of a file that is not a frozen bitmap is refused.
        std::fs::write(dir.path().join("junk"), b"junk").unwrap();
        assert!(c
            .call(&Request::MergeBack {
                path: dir.path().join("junk")
            })
            .is_err());
        // An over-long line is answered, then the connection closes.
        let mut raw = UnixStream::connect(&sock).unwrap();
        let long = vec![b'x'; usize::try_from(MAX_LINE).unwrap() + 10];
        raw.write_all(&long).unwrap();
        let mut a = String::new();
        BufReader::new(raw).read_line(&mut a).unwrap();
        assert!(a.contains("too long"));
        // The server still answers.
        assert!(c.status().is_ok());
    }

    #[test]
    fn no_cbt_refuses_bitmap_operations() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.ctl");
        spawn(
            &sock,
            ControlTarget {
                cbt: None,
                stop: StopHandle::new(),
                disk_size: SIZE,
            },
        )
        .unwrap();
        let mut c = Client::connect(&sock).unwrap();
        assert!(c.status().unwrap().bitmaps.is_empty());
        assert!(matches!(
            c.add_bitmap("b"),
            Err(ControlError::Refused(m)) if m.contains("does not track")
        ));
    }
}
