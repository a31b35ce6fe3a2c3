//! The write side of the link: frames leave in vectored writes, from whichever task gets there
//! first.
//!
//! The driver flushes what the core queued on every turn; a handle that has just queued a
//! frame tries to write it at once itself (if nobody else is writing), which saves the hop to
//! the driver task on the common path. Either way the writes are made with the driver's
//! waker, so when the link is full it is the driver that is woken once it drains.

use super::transport::LinkWrite;
use netchan_mux_proto::Frame;
use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    task::{Context, Poll},
};

/// Frames taken from the core per batch (bytes; at least one frame): bounds the write side's
/// own queue. Small on purpose: the core decides which stream's frame goes next (round-robin),
/// but a frame it queues while the link is busy still waits behind the batch already taken
/// here. At 64 KiB that is one bulk frame (`split_send_size`, 512 KiB by default) or up to
/// 32 small frames, which still leave together in one vectored write; at 512 KiB a 64-byte
/// frame beside a bulk channel waited behind four bulk frames.
pub(crate) const WRITE_BATCH: usize = 64 * 1024;

/// Slices per vectored write (two per frame).
const MAX_SLICES: usize = 64;

/// Slices of the caller's a direct write takes into its one frame (the header is one more):
/// a vectored write of more slices sends what these hold.
pub(crate) const MAX_DIRECT_SLICES: usize = 15;

/// The byte stream's write half, and the frames taken from the core but not yet fully
/// written (`offset` bytes of the front one are).
///
/// A frame with file descriptors starts a write of its own (they go with that write's first
/// byte, which is the frame's first byte), and a write never reaches into the next such frame.
pub(crate) struct Outbound {
    io: Box<dyn LinkWrite>,
    queue: VecDeque<Frame>,
    offset: usize,
    needs_flush: bool,
    /// An error met by a handle's write, for the driver to end the session with.
    failed: Option<io::Error>,
}

impl Outbound {
    pub(crate) fn new(io: Box<dyn LinkWrite>) -> Outbound {
        Outbound {
            io,
            queue: VecDeque::new(),
            offset: 0,
            needs_flush: false,
            failed: None,
        }
    }

    /// Whether nothing is waiting here to be written (a direct write may go first).
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.failed.is_none()
    }

    /// Writes one frame straight from the caller's buffers (header and the first `n` bytes of
    /// `bufs` in one vectored write) while nothing else is queued; whatever the link did not
    /// take is copied into the queue, to be written next. `bufs` hold at least `n` bytes in
    /// at most [`MAX_DIRECT_SLICES`] slices. Returns an error only if the write failed.
    pub(crate) fn write_frame(
        &mut self,
        cx: &mut Context<'_>,
        header: [u8; netchan_mux_proto::HEADER_LEN],
        bufs: &[IoSlice<'_>],
        n: usize,
    ) -> io::Result<()> {
        debug_assert!(self.is_idle());
        let mut slices = [IoSlice::new(&[]); MAX_DIRECT_SLICES + 1];
        slices[0] = IoSlice::new(&header);
        let mut count = 1;
        let mut left = n;
        for b in bufs.iter().take(MAX_DIRECT_SLICES) {
            if left == 0 {
                break;
            }
            let take = b.len().min(left);
            slices[count] = IoSlice::new(&b[..take]);
            count += 1;
            left -= take;
        }
        debug_assert_eq!(left, 0, "the slices hold the frame's body");
        let written = match self.io.poll_write(cx, &slices[..count], &mut Vec::new()) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => 0,
        };
        if written > 0 {
            self.needs_flush = true;
        }
        let total = header.len() + n;
        if written < total {
            // The rest is the next thing on the wire: the header's rest (if any) and the
            // body's, copied.
            let skip = written.saturating_sub(header.len());
            let mut body = bytes::BytesMut::with_capacity(n - skip);
            let mut at = 0;
            for slice in &slices[1..count] {
                let end = at + slice.len();
                if end > skip {
                    body.extend_from_slice(&slice[skip.saturating_sub(at)..]);
                }
                at = end;
            }
            self.offset = written.min(header.len());
            self.queue.push_back(Frame {
                header,
                body: body.freeze(),
                fds: Vec::new(),
            });
        }
        Ok(())
    }

    /// Whether a write error met outside the driver waits for the driver.
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Records a write error met outside the driver.
    pub(crate) fn fail(&mut self, e: io::Error) {
        self.failed.get_or_insert(e);
    }

    /// Writes queued frames, refilling from `take` (which moves frames out of the core) when
    /// the local queue is empty, and flushes once everything is written. Returns (wrote
    /// something, everything written and flushed).
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        mut take: impl FnMut(&mut VecDeque<Frame>),
    ) -> io::Result<(bool, bool)> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut wrote = false;
        loop {
            if self.queue.is_empty() {
                take(&mut self.queue);
                if self.queue.is_empty() {
                    if self.needs_flush {
                        match self.io.poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.needs_flush = false,
                            Poll::Ready(Err(e)) => return Err(e),
                            Poll::Pending => return Ok((wrote, false)),
                        }
                    }
                    return Ok((wrote, true));
                }
            }
            // The front frame's fds, if any, go with this write: its first byte is the
            // frame's (a frame with fds is written from its start, see the loop below).
            let mut fds = match self.queue.front_mut() {
                Some(front) if self.offset == 0 => std::mem::take(&mut front.fds),
                _ => Vec::new(),
            };
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            let mut skip = self.offset;
            for (i, frame) in self.queue.iter().enumerate() {
                if count + 2 > MAX_SLICES || (i > 0 && !frame.fds.is_empty()) {
                    break;
                }
                for part in [&frame.header[..], &frame.body[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[count] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    count += 1;
                }
            }
            let result = self.io.poll_write(cx, &slices[..count], &mut fds);
            if !fds.is_empty() {
                if let Some(front) = self.queue.front_mut() {
                    // Not sent (pending or failed): kept for the next try.
                    front.fds = fds;
                }
            }
            let n = match result {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok((wrote, false)),
            };
            wrote = true;
            self.needs_flush = true;
            self.advance(n);
        }
    }

    /// Shuts the write side down (the peer reads end of stream).
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.poll_shutdown(cx)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front() else {
                return;
            };
            let left = front.len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.offset = 0;
            self.queue.pop_front();
        }
    }
}
