//! [`Output`]: the frames a session has queued for the link, and the order they leave in.
//!
//! One FIFO for the whole session let a bulk channel's queued frames hold back every other
//! channel's small frame (a 64-byte round trip beside a bulk transfer took ten times its idle
//! time). So frames leave in two tiers:
//!
//! - **urgent**, first, in the order queued: everything on stream 0 (pings, their answers,
//!   GoAway), window updates that only grant credit or acknowledge a SYN, and any other
//!   bodiless frame of a stream that has nothing queued (a FIN, an RST);
//! - **lanes**, one FIFO per stream with queued data, taken round-robin, one frame per stream
//!   per turn.
//!
//! Per-stream order never changes: a frame joins its stream's lane whenever that lane holds
//! anything, and urgent frames all leave before any lane frame queued after them. Credit-only
//! updates may overtake their stream's queued data: they concern the peer's direction, and the
//! peer knows the stream already (credit is granted only for data it sent; an update that must
//! still open the stream carries SYN and keeps its place).

use super::{
    frame::{FrameType, ACK},
    ids::IdMap,
    Frame,
};
use std::collections::VecDeque;

/// What a lane holds in memory besides its frames: its map entry and its place in the turn
/// order. Counted against the output limit with the frames, so that many streams with one
/// small frame each are bounded by what they really hold.
pub(crate) const LANE_COST: usize =
    std::mem::size_of::<(u32, VecDeque<Frame>)>() + std::mem::size_of::<u32>();

/// The output queue of one session; see the module docs for the order frames leave in.
#[derive(Debug, Default)]
pub(crate) struct Output {
    urgent: VecDeque<Frame>,
    lanes: IdMap<VecDeque<Frame>>,
    /// The streams with a lane, each once, in the order they take their next turn.
    turns: VecDeque<u32>,
    /// Memory held: [`Frame::cost`] of every queued frame plus [`LANE_COST`] per lane.
    bytes: usize,
}

impl Output {
    /// Queues `frame` behind everything queued for its stream.
    pub(crate) fn push(&mut self, frame: Frame) {
        self.bytes += frame.cost();
        let (ty, flags, stream) = parse(&frame.header);
        let credit_only = ty == FrameType::WindowUpdate as u8 && flags & !ACK == 0;
        if stream == 0 || credit_only {
            self.urgent.push_back(frame);
            return;
        }
        if let Some(lane) = self.lanes.get_mut(&stream) {
            lane.push_back(frame);
            return;
        }
        if ty != FrameType::Data as u8 && ty != FrameType::Fds as u8 {
            // A bodiless control frame with nothing ahead of it on its stream.
            self.urgent.push_back(frame);
            return;
        }
        self.bytes += LANE_COST;
        self.lanes.insert(stream, VecDeque::from([frame]));
        self.turns.push_back(stream);
    }

    /// The next frame to send: urgent ones first, then one from the stream whose turn it is.
    pub(crate) fn pop(&mut self) -> Option<Frame> {
        let frame = match self.urgent.pop_front() {
            Some(frame) => frame,
            None => {
                let stream = self.turns.pop_front()?;
                let lane = self
                    .lanes
                    .get_mut(&stream)
                    .expect("every stream in `turns` has a lane");
                let frame = lane.pop_front().expect("lanes are never empty");
                if lane.is_empty() {
                    self.lanes.remove(&stream);
                    self.bytes -= LANE_COST;
                } else {
                    self.turns.push_back(stream);
                }
                frame
            }
        };
        self.bytes -= frame.cost();
        Some(frame)
    }

    /// Whether frames of stream `id` are queued.
    pub(crate) fn has_lane(&self, id: u32) -> bool {
        self.lanes.contains_key(&id)
    }

    /// Whether frames of a stream other than `id` are queued (session frames aside).
    pub(crate) fn others_queued(&self, id: u32) -> bool {
        self.lanes.len() > usize::from(self.lanes.contains_key(&id))
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.turns.is_empty()
    }

    /// Memory held by the queued frames ([`Frame::cost`], plus a little per stream queued).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops everything queued (closing any file descriptors in it).
    pub(crate) fn clear(&mut self) {
        *self = Output::default();
    }
}

/// Type, flags and stream id of an encoded header.
fn parse(h: &[u8; super::HEADER_LEN]) -> (u8, u16, u32) {
    (
        h[1],
        u16::from_be_bytes([h[2], h[3]]),
        u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Header, FIN, RST, SYN};
    use bytes::Bytes;

    fn frame(ty: FrameType, flags: u16, stream: u32, body: &'static [u8]) -> Frame {
        let length = match ty {
            FrameType::Data => body.len() as u32,
            _ => 0,
        };
        Frame {
            header: Header::new(ty, flags, stream, length).encode(),
            body: Bytes::from_static(body),
            fds: Vec::new(),
        }
    }

    /// (stream, flags, body) of every frame, in the order they leave.
    fn drain(out: &mut Output) -> Vec<(u32, u16, String)> {
        let mut order = Vec::new();
        while let Some(f) = out.pop() {
            let (_, flags, stream) = parse(&f.header);
            order.push((stream, flags, String::from_utf8(f.body.to_vec()).unwrap()));
        }
        order
    }

    fn expect(frames: &[(u32, u16, &str)]) -> Vec<(u32, u16, String)> {
        frames
            .iter()
            .map(|&(stream, flags, body)| (stream, flags, body.to_owned()))
            .collect()
    }

    #[test]
    fn streams_take_turns_one_frame_each_and_keep_their_own_order() {
        let mut out = Output::default();
        for body in [&b"a1"[..], b"a2", b"a3"] {
            out.push(frame(FrameType::Data, 0, 1, body));
        }
        out.push(frame(FrameType::Data, 0, 3, b"b1"));
        out.push(frame(FrameType::WindowUpdate, FIN, 1, b""));
        out.push(frame(FrameType::Data, 0, 3, b"b2"));
        out.push(frame(FrameType::Data, 0, 5, b"c1"));
        assert_eq!(
            drain(&mut out),
            expect(&[
                (1, 0, "a1"),
                (3, 0, "b1"),
                (5, 0, "c1"),
                (1, 0, "a2"),
                (3, 0, "b2"),
                (1, 0, "a3"),
                (1, FIN, ""),
            ])
        );
        assert!(out.is_empty());
        assert_eq!(out.bytes(), 0);
    }

    #[test]
    fn session_frames_and_credit_leave_before_queued_data() {
        let mut out = Output::default();
        out.push(frame(FrameType::Data, SYN, 1, b"bulk1"));
        out.push(frame(FrameType::Data, 0, 1, b"bulk2"));
        out.push(frame(FrameType::Ping, SYN, 0, b""));
        out.push(frame(FrameType::WindowUpdate, 0, 1, b""));
        out.push(frame(FrameType::WindowUpdate, ACK, 2, b""));
        assert_eq!(
            drain(&mut out),
            expect(&[
                (0, SYN, ""),
                (1, 0, ""),
                (2, ACK, ""),
                (1, SYN, "bulk1"),
                (1, 0, "bulk2"),
            ])
        );
    }

    #[test]
    fn a_control_frame_waits_behind_its_streams_data_and_goes_first_without_it() {
        let mut out = Output::default();
        out.push(frame(FrameType::Data, 0, 1, b"x"));
        out.push(frame(FrameType::WindowUpdate, RST, 1, b""));
        out.push(frame(FrameType::WindowUpdate, RST, 3, b""));
        out.push(frame(FrameType::WindowUpdate, SYN, 5, b""));
        out.push(frame(FrameType::Data, 0, 5, b"y"));
        assert_eq!(
            drain(&mut out),
            expect(&[
                (3, RST, ""),
                (5, SYN, ""),
                (1, 0, "x"),
                (5, 0, "y"),
                (1, RST, "")
            ])
        );
    }

    #[test]
    fn memory_is_counted_per_frame_and_per_lane_and_returns_to_zero() {
        let mut out = Output::default();
        let small = frame(FrameType::WindowUpdate, RST, 3, b"");
        let per_frame = small.cost();
        out.push(small);
        assert_eq!(out.bytes(), per_frame, "no lane for a lone control frame");
        out.push(frame(FrameType::Data, 0, 1, b"abc"));
        assert_eq!(out.bytes(), 2 * per_frame + 3 + LANE_COST);
        out.push(frame(FrameType::Data, 0, 1, b"de"));
        assert_eq!(out.bytes(), 3 * per_frame + 5 + LANE_COST);
        drain(&mut out);
        assert_eq!(out.bytes(), 0);
        out.push(frame(FrameType::Data, 0, 1, b"f"));
        out.clear();
        assert!(out.is_empty());
        assert_eq!(out.bytes(), 0);
    }
}
