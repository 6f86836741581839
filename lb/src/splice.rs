//! TCP relaying for L4 listeners; bulk flows move with splice(2), socket →
//! pipe → socket inside the kernel, never crossing into user space. One pipe per
//! direction, drained completely after every fill, so a splice into the
//! pipe never finds it full. Readiness comes from tokio (`readable` /
//! `writable` + `try_io`), so a relay costs no thread.
//!
//! Hand-written because no maintained crate offers splice on tokio sockets
//! (tokio-splice exists but is young and unmaintained-looking); the unsafe
//! surface is the two libc calls below.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two file descriptors into the 2-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: splice only reads and writes kernel objects behind the two
    // descriptors, which outlive the call; null offsets mean "current".
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Reads at least this much in one go: the flow is bulk, switch to splice.
const BULK: usize = 16 * 1024;

/// Relays `from` → `to` until `from` reaches EOF, then half-closes `to`.
///
/// Starts with plain reads and writes through a small buffer: for small
/// request/response messages splice costs two calls (socket → pipe → socket)
/// where read/write costs two as well, plus the pipe. Once a read fills the
/// buffer the flow is bulk and the direction switches to splice.
async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; BULK];
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        if n == BULK {
            return Ok(total + spliced(from, to).await?);
        }
    }
}

/// The bulk phase of [`one_way`]: socket → pipe → socket in the kernel.
async fn spliced(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_r, pipe_w) = pipe()?;
    let mut total = 0u64;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Relays both directions until both have ended (or one fails); returns
/// bytes (client → member, member → client).
pub async fn relay(client: &TcpStream, member: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(client, member), one_way(member, client))
}
