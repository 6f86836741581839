//! TCP state tracking with loose window checks.
//!
//! States follow the handshake and teardown seen on the wire: SYN_SENT →
//! SYN_RECV (SYN-ACK from the responder) → ESTABLISHED (ACK from the
//! initiator) → FIN_WAIT (one FIN) → TIME_WAIT (both FINs); an RST moves
//! any state to CLOSE. A SYN on a closed or time-wait entry reopens it.
//!
//! Window checks are those of Guido van Rooij's "Real Stateful TCP Packet
//! Filtering in IP Filter" as Linux applies them (`tcp_in_window`), with
//! slack: a segment must not start beyond what the receiver advertised (I),
//! must not end before the receiver's largest window behind the highest
//! sequence sent (II), and must not acknowledge data never sent (III).
//! A connection picked up mid-stream (no SYN seen) is liberal in the
//! directions not yet seen, so real stacks are never cut by a missed packet.

use super::Timeouts;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Extra bytes tolerated by the window checks (retransmissions of
/// segments already acknowledged, window probes, late window updates).
const SLACK: u32 = 1 << 16;

/// A segment that does not fit its connection (out of window, wrong
/// handshake direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Segment invalid for the connection's TCP state")]
pub struct InvalidSegment;

/// The fields of one TCP segment the tracker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeg {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    /// Payload bytes.
    pub len: u32,
    /// Window scale option (SYN segments only).
    pub wscale: Option<u8>,
}

impl TcpSeg {
    /// Reads a segment whose header is at `off`; `l4_len` is the IP payload length.
    pub fn read(frame: &[u8], off: usize, flags: u8, l4_len: usize) -> Option<TcpSeg> {
        let h = frame.get(off..off.checked_add(20)?)?;
        let word = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let doff = usize::from(h[12] >> 4) * 4;
        let mut wscale = None;
        if flags & SYN != 0 && doff > 20 {
            // Walk the options for window scale (kind 3, length 3).
            let opts = frame.get(off + 20..off + doff.min(60))?;
            let mut i = 0;
            while let Some(&kind) = opts.get(i) {
                match kind {
                    0 => break,
                    1 => i += 1,
                    _ => {
                        let len = usize::from(*opts.get(i + 1)?);
                        if kind == 3 && len == 3 {
                            wscale = opts.get(i + 2).map(|s| (*s).min(14));
                        }
                        if len < 2 {
                            break;
                        }
                        i += len;
                    }
                }
            }
        }
        Some(TcpSeg {
            flags,
            seq: word(4),
            ack: word(8),
            win: u16::from_be_bytes([h[14], h[15]]),
            len: u32::try_from(l4_len.saturating_sub(doff)).unwrap_or(u32::MAX),
            wscale,
        })
    }

    /// Sequence number just past this segment (SYN and FIN count one).
    fn end(&self) -> u32 {
        let mut end = self.seq.wrapping_add(self.len);
        if self.flags & SYN != 0 {
            end = end.wrapping_add(1);
        }
        if self.flags & FIN != 0 {
            end = end.wrapping_add(1);
        }
        end
    }
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    TimeWait,
    Close,
}

/// One direction's view (Rooij's `td_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Side {
    seen: bool,
    /// Highest sequence number sent, plus one.
    end: u32,
    /// Highest sequence number this side may send (peer's ack + window).
    maxend: u32,
    /// Largest window this side advertised (scaled).
    maxwin: u32,
    wscale: u8,
    scale_ok: bool,
    fin: bool,
}

const SIDE: Side = Side {
    seen: false,
    end: 0,
    maxend: 0,
    maxwin: 0,
    wscale: 0,
    scale_ok: false,
    fin: false,
};

/// Per-connection TCP tracking state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpState {
    pub state: State,
    sides: [Side; 2],
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

impl TcpState {
    /// Nothing seen yet.
    pub const NONE: TcpState = TcpState {
        state: State::None,
        sides: [SIDE; 2],
    };

    /// Seconds to keep the entry in its current state.
    pub fn timeout(&self, t: &Timeouts) -> u32 {
        match self.state {
            State::None | State::SynSent | State::SynRecv => t.tcp_syn,
            State::Established => t.tcp_established,
            State::FinWait => t.tcp_fin,
            State::TimeWait => t.tcp_time_wait,
            State::Close => t.tcp_close,
        }
    }

    /// Whether a new connection may start with this segment: a SYN, or
    /// (loose pick-up, as Linux's `nf_conntrack_tcp_loose`) a plain ACK.
    pub fn may_start(seg: &TcpSeg) -> bool {
        let f = seg.flags & (SYN | ACK | RST | FIN);
        f == SYN || (f & (SYN | RST) == 0 && f & ACK != 0)
    }

    /// Whether `seg` on an existing entry starts a new connection on the same tuple.
    pub fn reopens(&self, dir: usize, seg: &TcpSeg) -> bool {
        dir == 0
            && seg.flags & (SYN | ACK | RST) == SYN
            && matches!(self.state, State::TimeWait | State::Close)
    }

    /// Advances with a segment from side `dir` (0 = original). `Err` = invalid.
    pub fn advance(&mut self, dir: usize, seg: &TcpSeg) -> Result<(), InvalidSegment> {
        let o = 1 - dir.min(1);
        let f = seg.flags;
        if self.reopens(dir, seg) {
            *self = TcpState::NONE;
        }
        // The handshake: who may send what.
        match self.state {
            State::None if f & SYN != 0 && f & ACK == 0 => {
                self.state = State::SynSent;
                self.init_side(dir, seg);
                return Ok(());
            }
            State::None => {
                // Mid-stream pick-up: liberal until both sides are seen.
                self.state = State::Established;
                self.init_side(dir, seg);
                return Ok(());
            }
            State::SynSent if dir == 1 && f & (SYN | ACK) == SYN | ACK => {
                self.state = State::SynRecv;
                self.init_side(dir, seg);
                // Window scaling only when both SYNs carried the option.
                let both = seg.wscale.is_some() && self.sides[0].scale_ok;
                if !both {
                    self.sides[0].wscale = 0;
                    self.sides[1].wscale = 0;
                }
                self.sides[0].maxend = seg.ack.wrapping_add(u32::from(seg.win).max(1));
                return Ok(());
            }
            State::SynSent if dir == 0 && f & (SYN | ACK) == SYN => return Ok(()),
            State::SynSent if f & RST == 0 => return Err(InvalidSegment),
            _ => {}
        }
        if f & RST != 0 {
            self.state = State::Close;
            return Ok(());
        }
        if !self.side(o).seen {
            // The peer's first packet: start tracking it, no checks yet.
            self.init_side(dir, seg);
        } else if self.side(dir).seen && !self.in_window(dir, o, seg) {
            return Err(InvalidSegment);
        }
        self.record(dir, o, seg);
        match self.state {
            State::SynRecv if dir == 0 && f & ACK != 0 && f & SYN == 0 => {
                self.state = State::Established;
            }
            _ => {}
        }
        if f & FIN != 0 {
            self.side_mut(dir).fin = true;
            self.state = if self.sides[0].fin && self.sides[1].fin {
                State::TimeWait
            } else {
                State::FinWait
            };
        }
        Ok(())
    }

    fn side(&self, i: usize) -> &Side {
        &self.sides[i.min(1)]
    }

    fn side_mut(&mut self, i: usize) -> &mut Side {
        &mut self.sides[i.min(1)]
    }

    fn init_side(&mut self, dir: usize, seg: &TcpSeg) {
        let s = self.side_mut(dir);
        s.seen = true;
        s.end = seg.end();
        s.maxwin = u32::from(seg.win).max(1);
        s.maxend = s.end.wrapping_add(s.maxwin);
        s.wscale = seg.wscale.unwrap_or(0);
        s.scale_ok = seg.wscale.is_some();
    }

    fn in_window(&self, dir: usize, o: usize, seg: &TcpSeg) -> bool {
        let (s, r) = (self.side(dir), self.side(o));
        let end = seg.end();
        // I: does not start beyond what the receiver allowed.
        let i = !after(seg.seq, s.maxend.wrapping_add(SLACK));
        // II: not older than the receiver's largest window behind our highest byte.
        let ii = !before(end, s.end.wrapping_sub(r.maxwin).wrapping_sub(SLACK));
        // III: does not acknowledge data the receiver never sent.
        let iii = seg.flags & ACK == 0 || !after(seg.ack, r.end.wrapping_add(SLACK));
        i && ii && iii
    }

    fn record(&mut self, dir: usize, o: usize, seg: &TcpSeg) {
        let end = seg.end();
        let win = u32::from(seg.win) << u32::from(self.side(dir).wscale);
        let s = self.side_mut(dir);
        if after(end, s.end) {
            s.end = end;
        }
        s.maxwin = s.maxwin.max(win.max(1));
        if seg.flags & ACK != 0 {
            // We told the peer how far it may send.
            let limit = seg.ack.wrapping_add(win.max(1));
            let r = self.side_mut(o);
            if !r.seen || after(limit, r.maxend) {
                r.maxend = limit;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(flags: u8, seq: u32, ack: u32, len: u32) -> TcpSeg {
        TcpSeg {
            flags,
            seq,
            ack,
            win: 65535,
            len,
            wscale: None,
        }
    }

    #[test]
    fn handshake_data_and_teardown() {
        let mut t = TcpState::NONE;
        assert!(TcpState::may_start(&seg(SYN, 1000, 0, 0)));
        t.advance(0, &seg(SYN, 1000, 0, 0)).unwrap();
        assert_eq!(t.state, State::SynSent);
        t.advance(1, &seg(SYN | ACK, 5000, 1001, 0)).unwrap();
        assert_eq!(t.state, State::SynRecv);
        t.advance(0, &seg(ACK, 1001, 5001, 0)).unwrap();
        assert_eq!(t.state, State::Established);
        t.advance(0, &seg(ACK, 1001, 5001, 1400)).unwrap();
        t.advance(1, &seg(ACK, 5001, 2401, 100)).unwrap();
        // A retransmission of old data is fine.
        t.advance(0, &seg(ACK, 1001, 5101, 1400)).unwrap();
        t.advance(0, &seg(FIN | ACK, 2401, 5101, 0)).unwrap();
        assert_eq!(t.state, State::FinWait);
        t.advance(1, &seg(FIN | ACK, 5101, 2402, 0)).unwrap();
        assert_eq!(t.state, State::TimeWait);
        // A new SYN on the same tuple reopens.
        t.advance(0, &seg(SYN, 90_000, 0, 0)).unwrap();
        assert_eq!(t.state, State::SynSent);
    }

    #[test]
    fn out_of_window_and_wrong_direction_are_invalid() {
        let mut t = TcpState::NONE;
        t.advance(0, &seg(SYN, 1000, 0, 0)).unwrap();
        // SYN-ACK from the initiator's side is not a handshake.
        assert!(t.advance(0, &seg(SYN | ACK, 1000, 1, 0)).is_err());
        t.advance(1, &seg(SYN | ACK, 5000, 1001, 0)).unwrap();
        t.advance(0, &seg(ACK, 1001, 5001, 0)).unwrap();
        // Far beyond the advertised window.
        assert!(t.advance(0, &seg(ACK, 1001 + (1 << 30), 5001, 10)).is_err());
        // Acknowledges data never sent.
        assert!(t.advance(0, &seg(ACK, 1001, 5001 + (1 << 30), 0)).is_err());
        // RST closes.
        t.advance(1, &seg(RST, 5001, 0, 0)).unwrap();
        assert_eq!(t.state, State::Close);
    }

    #[test]
    fn mid_stream_pickup_is_liberal() {
        let mut t = TcpState::NONE;
        assert!(TcpState::may_start(&seg(ACK, 7, 9, 100)));
        assert!(!TcpState::may_start(&seg(RST, 7, 9, 0)));
        assert!(!TcpState::may_start(&seg(SYN | ACK, 7, 9, 0)));
        t.advance(0, &seg(ACK, 7, 9, 100)).unwrap();
        assert_eq!(t.state, State::Established);
        t.advance(1, &seg(ACK, 123_456, 107, 10)).unwrap();
        t.advance(0, &seg(ACK, 107, 123_466, 10)).unwrap();
    }

    #[test]
    fn window_scale_option_is_read() {
        let mut f = vec![0u8; 14 + 20 + 32];
        let o = 34;
        f[o + 12] = 0x80; // 32-byte header
        f[o + 20..o + 24].copy_from_slice(&[1, 3, 3, 7]);
        let s = TcpSeg::read(&f, o, SYN, 32).unwrap();
        assert_eq!((s.wscale, s.len), (Some(7), 0));
    }
}
