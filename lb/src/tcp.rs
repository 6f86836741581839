//! L4 proxying for TCP and HTTPS-passthrough listeners: pick a member,
//! connect within `timeout_member_connect`, then copy both directions until
//! both sides have closed (half-close is forwarded).
//!
//! Small messages move with read/write, bulk flows with splice(2) (see
//! `splice.rs`): never copied into user space. Should splice be refused (it is not for TCP sockets on Linux), the
//! relay falls back to tokio's `copy_bidirectional`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::listener::Route;
use crate::stats::{ActiveGuard, Counters};

pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    route: &Route,
    listener: &Arc<Counters>,
) {
    let Some(pool) = route.default_pool.as_ref() else {
        Counters::add(&listener.request_errors, 1);
        return;
    };
    let Some(member) = pool.pick(peer) else {
        Counters::add(&listener.request_errors, 1);
        Counters::add(&pool.counters.request_errors, 1);
        return;
    };
    let _active = ActiveGuard::enter([pool.counters.clone(), member.counters.clone()]);
    let connect = tokio::time::timeout(
        route.plan.member_connect_timeout,
        TcpStream::connect(member.addr),
    )
    .await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            fail(listener, &pool.counters, &member.counters);
            tracing::debug!(client = %peer, member = %member.addr, error = %e, "member connect failed");
            return;
        }
        Err(_) => {
            fail(listener, &pool.counters, &member.counters);
            tracing::debug!(client = %peer, member = %member.addr, "member connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (up, down) = match crate::splice::relay(&client, &upstream).await {
        Ok(moved) => moved,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tokio::io::copy_bidirectional(&mut client, &mut upstream)
                .await
                .unwrap_or((0, 0))
        }
        Err(e) => {
            tracing::debug!(client = %peer, member = %member.addr, error = %e, "relay ended with an error");
            (0, 0)
        }
    };
    for c in [listener, &pool.counters, &member.counters] {
        Counters::add(&c.bytes_in, up);
        Counters::add(&c.bytes_out, down);
    }
    if route.access_log {
        tracing::info!(target: "keel_lb::access", listener = %route.plan.id, client = %peer,
            pool = %pool.id, member = %member.id, bytes_in = up, bytes_out = down, "tcp");
    }
}

fn fail(listener: &Counters, pool: &Counters, member: &Counters) {
    for c in [listener, pool, member] {
        Counters::add(&c.request_errors, 1);
    }
}
