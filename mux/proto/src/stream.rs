//! One stream's state: receive buffer, windows, half-close flags and blocked tasks.

use super::{Fd, Ready};
use bytes::{Buf, BytesMut};
use std::{collections::VecDeque, time::Instant};

/// Frames up to this size are copied into the stream's own tail buffer instead of being kept
/// as slices of the connection's read buffer: a slice pins its whole read chunk, so a peer
/// sending many tiny frames to a stream nobody reads could otherwise hold far more memory
/// than the window it was granted.
const COPY_BELOW: usize = 4 * 1024;

/// Capacity of the tail buffers tiny frames are gathered in.
const TAIL_CAPACITY: usize = 16 * 1024;

/// Data received on a stream and not yet read, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct RecvBuffer {
    chunks: VecDeque<BytesMut>,
    /// Whether the last chunk is a tail buffer of ours (extendable), not a shared slice.
    tail_owned: bool,
    len: usize,
}

impl RecvBuffer {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends a frame's body. A tiny body goes into the tail buffer, a new one taken from
    /// `spare` when it can hold it (see [`RecvBuffer::read`]) rather than allocated.
    pub(crate) fn push(&mut self, body: BytesMut, spare: &mut Option<BytesMut>) {
        let n = body.len();
        if n == 0 {
            return;
        }
        self.len += n;
        if n < COPY_BELOW {
            if let (true, Some(tail)) = (self.tail_owned, self.chunks.back_mut()) {
                if tail.capacity() - tail.len() >= n {
                    tail.extend_from_slice(&body);
                    return;
                }
            }
            let reused = spare.take().filter(|kept| kept.capacity() >= n);
            let mut tail = reused.unwrap_or_else(|| BytesMut::with_capacity(TAIL_CAPACITY.max(n)));
            tail.extend_from_slice(&body);
            self.chunks.push_back(tail);
            self.tail_owned = true;
        } else {
            self.chunks.push_back(body);
            self.tail_owned = false;
        }
    }

    /// Hands up to `max` bytes to `sink`, in order; returns how many. A tail buffer read to
    /// its end as the last chunk is kept in `spare` for the next tiny body (one allocation
    /// and free less per small message).
    pub(crate) fn read(
        &mut self,
        max: usize,
        spare: &mut Option<BytesMut>,
        mut sink: impl FnMut(&[u8]),
    ) -> usize {
        let mut done = 0;
        while done < max {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let n = front.len().min(max - done);
            sink(&front[..n]);
            front.advance(n);
            done += n;
            if front.is_empty() {
                let emptied = self.chunks.pop_front();
                if self.chunks.is_empty() {
                    if let (true, Some(mut emptied)) = (self.tail_owned, emptied) {
                        // Empty, and nobody else holds any of it: all of it is room again.
                        if emptied.try_reclaim(TAIL_CAPACITY) {
                            *spare = Some(emptied);
                        }
                    }
                    self.tail_owned = false;
                }
            }
        }
        self.len -= done;
        done
    }

    /// How many chunks hold the data (tests bound memory with it).
    #[cfg(test)]
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Drops everything; returns how many bytes were dropped.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.len;
        self.chunks.clear();
        self.tail_owned = false;
        self.len = 0;
        n
    }
}

/// File descriptors received on a stream, each batch at the place in the byte stream where it
/// arrived: a read never crosses such a place, and the batch becomes the reader's to take
/// once everything before it has been read.
#[derive(Debug, Default)]
pub(crate) struct StreamFds {
    /// Bytes received on the stream so far.
    received: u64,
    /// Bytes the reader has consumed so far.
    read: u64,
    /// Batches not reached yet: each after `.0` bytes of the stream.
    marks: VecDeque<(u64, Vec<Fd>)>,
    /// Fds the reader has reached and not taken yet, in arrival order.
    ready: VecDeque<Fd>,
}

impl StreamFds {
    /// `n` more bytes were received.
    pub(crate) fn on_data(&mut self, n: usize) {
        self.received += n as u64;
    }

    /// A batch arrived after everything received so far.
    pub(crate) fn on_fds(&mut self, fds: Vec<Fd>) {
        if self.received == self.read && self.marks.is_empty() {
            self.ready.extend(fds);
        } else {
            self.marks.push_back((self.received, fds));
        }
    }

    /// Makes the batches the reader has reached takeable.
    pub(crate) fn advance(&mut self) {
        while let Some((at, _)) = self.marks.front() {
            if *at > self.read {
                break;
            }
            if let Some((_, fds)) = self.marks.pop_front() {
                self.ready.extend(fds);
            }
        }
    }

    /// How much of `max` the reader may read now without crossing a batch.
    pub(crate) fn limit(&mut self, max: usize) -> usize {
        self.advance();
        match self.marks.front() {
            Some((at, _)) => max.min(usize::try_from(at - self.read).unwrap_or(usize::MAX)),
            None => max,
        }
    }

    /// The reader consumed `n` bytes.
    pub(crate) fn consumed(&mut self, n: usize) {
        self.read += n as u64;
        self.advance();
    }

    /// Takes the fds the reader has reached.
    pub(crate) fn take(&mut self) -> Vec<Fd> {
        self.advance();
        self.ready.drain(..).collect()
    }

    /// Fds held, reached or not.
    pub(crate) fn held(&self) -> usize {
        self.ready.len() + self.marks.iter().map(|(_, f)| f.len()).sum::<usize>()
    }

    /// Closes every fd held (the stream was reset).
    pub(crate) fn clear(&mut self) {
        self.marks.clear();
        self.ready.clear();
    }
}

/// The state of one open stream.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) recv: RecvBuffer,
    /// File descriptors received with the data, not yet taken by the reader.
    pub(crate) fds: StreamFds,
    /// How many more bytes the peer may send before it needs a window update from us.
    pub(crate) recv_window: u32,
    /// The receive window this stream is allowed: the initial 256 KiB, grown while the
    /// sender is limited by it and the reader keeps up.
    pub(crate) window: u32,
    /// Bytes the reader consumed that we have not yet granted back.
    pub(crate) credit: u32,
    /// Bytes consumed since `epoch`, when the reader started on the current window's worth
    /// (window auto-tuning).
    pub(crate) consumed: u64,
    pub(crate) epoch: Option<Instant>,
    /// When a data frame last arrived while the stream ran bulk: its window grown, or the
    /// peer having used more than half of it.
    pub(crate) heavy_at: Option<Instant>,
    /// How many more bytes we may send.
    pub(crate) send_window: u32,
    /// Outbound stream the peer has not seen yet: the next frame carries SYN.
    pub(crate) syn_pending: bool,
    /// We sent (queued) our FIN.
    pub(crate) local_fin: bool,
    /// The peer sent its FIN: after the buffered data, reads see end of stream.
    pub(crate) remote_fin: bool,
    /// Reset by either side: reads and writes fail.
    pub(crate) reset: bool,
    /// A read is waiting (it returned pending): the next change it waits for is reported as
    /// [`Ready::Read`], once.
    pub(crate) read_waiting: bool,
    /// A write is waiting for send window: the next window update is reported as
    /// [`Ready::Write`], once.
    pub(crate) write_waiting: bool,
}

impl Stream {
    pub(crate) fn new(initial_window: u32, outbound: bool) -> Stream {
        Stream {
            recv: RecvBuffer::default(),
            fds: StreamFds::default(),
            recv_window: initial_window,
            window: initial_window,
            credit: 0,
            consumed: 0,
            epoch: None,
            heavy_at: None,
            send_window: initial_window,
            syn_pending: outbound,
            local_fin: false,
            remote_fin: false,
            reset: false,
            read_waiting: false,
            write_waiting: false,
        }
    }

    /// Reports to `ready` that the reader of this stream (`id`) may make progress, if it
    /// waits.
    pub(crate) fn wake_reader(&mut self, id: u32, ready: &mut Vec<Ready>) {
        if std::mem::take(&mut self.read_waiting) {
            ready.push(Ready::Read(id));
        }
    }

    /// Reports to `ready` that the writer of this stream (`id`) may make progress, if it
    /// waits for send window.
    pub(crate) fn wake_writer(&mut self, id: u32, ready: &mut Vec<Ready>) {
        if std::mem::take(&mut self.write_waiting) {
            ready.push(Ready::Write(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_frames_share_one_tail_buffer_and_read_back_in_order() {
        let mut buf = RecvBuffer::default();
        let mut spare = None;
        for i in 0..100u8 {
            buf.push(BytesMut::from(&[i][..]), &mut spare);
        }
        assert_eq!(buf.chunks.len(), 1);
        let mut big = BytesMut::new();
        big.extend_from_slice(&vec![7u8; 8192]);
        buf.push(big, &mut spare);
        buf.push(BytesMut::from(&b"end"[..]), &mut spare);
        assert_eq!(buf.len(), 100 + 8192 + 3);
        let mut out = Vec::new();
        let n = buf.read(usize::MAX, &mut spare, |s| out.extend_from_slice(s));
        assert_eq!(n, 8295);
        assert_eq!(&out[..100], (0..100u8).collect::<Vec<_>>().as_slice());
        assert_eq!(&out[8292..], b"end");
        assert_eq!(buf.len(), 0);
    }

    #[test]
    fn a_tail_read_to_its_end_is_reused_for_the_next_tiny_body() {
        let mut buf = RecvBuffer::default();
        let mut spare = None;
        buf.push(BytesMut::from(&b"ping"[..]), &mut spare);
        let first = buf.chunks[0].as_ptr();
        let mut out = Vec::new();
        assert_eq!(buf.read(2, &mut spare, |s| out.extend_from_slice(s)), 2);
        assert!(spare.is_none(), "kept only once read to its end");
        assert_eq!(buf.read(64, &mut spare, |s| out.extend_from_slice(s)), 2);
        assert!(spare.is_some());
        buf.push(BytesMut::from(&b"pong"[..]), &mut spare);
        assert!(spare.is_none());
        assert_eq!(
            buf.chunks[0].as_ptr(),
            first,
            "the same memory, from its start"
        );
        assert_eq!(buf.read(64, &mut spare, |s| out.extend_from_slice(s)), 4);
        assert_eq!(out, b"pingpong");
    }
}
