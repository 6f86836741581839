//! A message relay between QEMU and the vhost-user backend that lets one
//! early request through the backend's (correct) protocol check.
//!
//! QEMU 7.2's virtio-net sends `SET_VRING_ENABLE` when the guest driver sets
//! its features (`peer_attach`), before `SET_FEATURES` acks
//! `VHOST_USER_F_PROTOCOL_FEATURES`. The vhost crate rejects that request
//! and drops the connection; without protocol features QEMU 7.2 crashes at
//! device start. So QEMU connects here, and every message is relayed
//! unchanged (with its file descriptors) to the backend's private socket,
//! except a `SET_VRING_ENABLE` arriving before protocol features are acked:
//! it is answered (if asked to), remembered, and replayed to the backend
//! right after `SET_FEATURES` (QEMU 7.2 does not repeat it, and with
//! protocol features acked the rings stay disabled until enabled). Control
//! path only: a few dozen messages per connection.
//!
//! Hand-written with libc: the vhost crate's `Connection` parses and
//! validates messages for one role, it cannot forward them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

const HDR_LEN: usize = 12;
const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// vhost-user allows at most 8 fds per message; room for more does no harm.
const MAX_FDS: usize = 32;
const MAX_BODY: usize = 4096;

/// Receives into `buf`, appending any passed descriptors to `fds`; returns
/// the bytes read (0 at EOF).
fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<RawFd>) -> io::Result<usize> {
    let mut cmsg = [0u64; 64]; // 512 bytes, 8-aligned, ≥ CMSG_SPACE(MAX_FDS * 4)
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: msg points to a live iovec over `buf` and a live control buffer.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel just wrote into `cmsg`
    // with the libc macros, which stay within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let bytes = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(std::ptr::read_unaligned(data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Sends all of `buf` with `fds` attached to its first byte.
fn send_with_fds(sock: RawFd, buf: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let fds = &fds[..fds.len().min(MAX_FDS)];
    if !fds.is_empty() {
        let fd_bytes = std::mem::size_of_val(fds);
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE(u32::try_from(fd_bytes).unwrap_or(0)) } as usize;
        // SAFETY: the control buffer is large enough for one SCM_RIGHTS
        // message of MAX_FDS descriptors; the header and data are written
        // through the libc macros inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap_or(0)) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points to live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    if n < buf.len() {
        // The rest without descriptors (they went with the first byte).
        let mut s = std::mem::ManuallyDrop::new(borrow_stream(sock));
        io::Write::write_all(&mut *s, &buf[n..])?;
    }
    Ok(())
}

/// A `UnixStream` view of a descriptor owned elsewhere (never dropped).
fn borrow_stream(fd: RawFd) -> UnixStream {
    // SAFETY: the caller wraps the result in ManuallyDrop, so the borrowed
    // descriptor is never closed through it.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

fn close_all(fds: &mut Vec<RawFd>) {
    for fd in fds.drain(..) {
        // SAFETY: these descriptors were received by us and are ours to close.
        unsafe { libc::close(fd) };
    }
}

/// Reads exactly `buf.len()` bytes (collecting fds); `false` at EOF.
fn recv_exact(sock: RawFd, buf: &mut [u8], fds: &mut Vec<RawFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_with_fds(sock, &mut buf[got..], fds)?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(true)
}

fn word(msg: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]])
}

/// Frontend → backend, message by message.
fn frontend_to_backend(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let (f, b) = (front.as_raw_fd(), back.as_raw_fd());
    let mut msg = vec![0u8; HDR_LEN + MAX_BODY];
    let mut fds = Vec::with_capacity(MAX_FDS);
    let mut protocol_acked = false;
    // Last absorbed enable state per vring index.
    let mut absorbed: [Option<u32>; 64] = [None; 64];
    loop {
        close_all(&mut fds);
        if !recv_exact(f, &mut msg[..HDR_LEN], &mut fds)? {
            return Ok(());
        }
        let (req, flags, size) = (word(&msg, 0), word(&msg, 4), word(&msg, 8) as usize);
        if size > MAX_BODY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "vhost-user message too large",
            ));
        }
        if !recv_exact(f, &mut msg[HDR_LEN..HDR_LEN + size], &mut fds)? {
            return Ok(());
        }
        tracing::trace!(req, flags, size, fds = fds.len(), "vhost-user request");
        if req == REQ_SET_FEATURES && size >= 8 {
            let mut v = [0u8; 8];
            v.copy_from_slice(&msg[HDR_LEN..HDR_LEN + 8]);
            protocol_acked = u64::from_le_bytes(v) & PROTOCOL_FEATURES_BIT != 0;
        }
        if req == REQ_SET_VRING_ENABLE && !protocol_acked && size >= 8 {
            let index = word(&msg, HDR_LEN) as usize;
            let num = word(&msg, HDR_LEN + 4);
            if let Some(slot) = absorbed.get_mut(index) {
                *slot = Some(num);
            }
            tracing::debug!(index, num, "vhost-user: early SET_VRING_ENABLE absorbed");
            if flags & FLAG_NEED_REPLY != 0 {
                let mut reply = [0u8; HDR_LEN + 8];
                reply[0..4].copy_from_slice(&req.to_le_bytes());
                reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
                reply[8..12].copy_from_slice(&8u32.to_le_bytes());
                send_with_fds(f, &reply, &[])?;
            }
            continue;
        }
        send_with_fds(b, &msg[..HDR_LEN + size], &fds)?;
        if req == REQ_SET_FEATURES && protocol_acked {
            for (index, num) in absorbed.iter_mut().enumerate() {
                let Some(num) = num.take() else { continue };
                let mut replay = [0u8; HDR_LEN + 8];
                replay[0..4].copy_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                replay[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
                replay[8..12].copy_from_slice(&8u32.to_le_bytes());
                replay[12..16].copy_from_slice(&u32::try_from(index).unwrap_or(0).to_le_bytes());
                replay[16..20].copy_from_slice(&num.to_le_bytes());
                send_with_fds(b, &replay, &[])?;
            }
        }
    }
}

/// Backend → frontend: replies, relayed as they come.
fn backend_to_frontend(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let (f, b) = (front.as_raw_fd(), back.as_raw_fd());
    let mut buf = vec![0u8; HDR_LEN + MAX_BODY];
    let mut fds = Vec::with_capacity(MAX_FDS);
    loop {
        close_all(&mut fds);
        let n = recv_with_fds(b, &mut buf, &mut fds)?;
        if n == 0 {
            return Ok(());
        }
        send_with_fds(f, &buf[..n], &fds)?;
    }
}

/// Relays between `front` (QEMU) and `back` (the backend) until either
/// side closes; then closes both.
pub(crate) fn spawn(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let (front2, back2) = (front.try_clone()?, back.try_clone()?);
    std::thread::Builder::new()
        .name("keel-vnet-relay".into())
        .spawn(move || {
            if let Err(e) = backend_to_frontend(&front2, &back2) {
                tracing::debug!(error = %e, "vhost-user relay (backend side) ended");
            }
            let _ = front2.shutdown(std::net::Shutdown::Both);
            let _ = back2.shutdown(std::net::Shutdown::Both);
        })?;
    std::thread::Builder::new()
        .name("keel-vnet-relay".into())
        .spawn(move || {
            if let Err(e) = frontend_to_backend(&front, &back) {
                tracing::debug!(error = %e, "vhost-user relay (frontend side) ended");
            }
            let _ = front.shutdown(std::net::Shutdown::Both);
            let _ = back.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(())
}
