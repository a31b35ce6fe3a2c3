//! File descriptors with calls: a request or a response may carry open files, sockets or
//! memfds, on a mux channel whose session passes them (`netchan_mux::Session::with_fds`, a
//! unix socket). Elsewhere a call with descriptors fails at once with `FailedPrecondition`.
//!
//! On the wire (docs/protocol.md Part 2, "File descriptors"): the sender writes an
//! `Fds { id, count }` frame right before the call's `Request` or `Response`, and hands the
//! descriptors to the mux channel just before that frame's first byte, so they travel as
//! the mux's fd frame at exactly that place. The reader has them once it has read the
//! `Fds` frame, and attaches them to the call's next frame.

use crate::{
    error::Error,
    status::Status,
    wire::{Frame, Header},
};
use std::{collections::HashMap, sync::Arc};

/// The most descriptors one call's request or response carries: what one `SCM_RIGHTS`
/// message can (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Descriptors a conn's reader holds at most for messages that have not come yet (a peer
/// announcing batches for calls it never sends ends the conn instead).
const MAX_HELD: usize = 1024;

/// A descriptor travelling with a call (unix only; elsewhere no value exists).
#[cfg(unix)]
pub(crate) type Fd = std::os::fd::OwnedFd;
/// A descriptor travelling with a call (unix only; elsewhere no value exists).
#[cfg(not(unix))]
#[derive(Debug)]
pub(crate) enum Fd {}

/// Descriptors queued to send: shared, because the caller's options may be reused (each
/// send hands duplicates to the kernel).
pub(crate) type FdBatch = Arc<Vec<Fd>>;

/// The channel's descriptor handle, when the conn is a mux channel.
#[derive(Clone, Debug, Default)]
pub(crate) struct FdLink {
    #[cfg(unix)]
    fds: Option<netchan_mux::ConnFds>,
}

impl FdLink {
    /// The handle of `conn` if it is a mux [`Conn`](netchan_mux::Conn) (the only conn that can
    /// carry descriptors); other conns get one that carries none.
    pub(crate) fn of<T: 'static>(conn: &T) -> FdLink {
        #[cfg(unix)]
        {
            let any: &dyn std::any::Any = conn;
            FdLink {
                fds: any
                    .downcast_ref::<netchan_mux::Conn>()
                    .map(netchan_mux::Conn::fds),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = conn;
            FdLink {}
        }
    }

    /// Checks, before anything is queued, that `count` descriptors can go to the peer now.
    pub(crate) fn check_send(&self, count: usize, what: &str) -> Result<(), Status> {
        if count > MAX_FDS_PER_MESSAGE {
            return Err(Status::invalid_argument(format!(
                "{what}: {count} file descriptors; at most {MAX_FDS_PER_MESSAGE} go with one message"
            )));
        }
        #[cfg(unix)]
        if let Some(fds) = &self.fds {
            if fds.can_send() {
                return Ok(());
            }
            if fds.session_carries() {
                return Err(Status::failed_precondition(format!(
                    "{what}: cannot send file descriptors: the peer does not take them"
                )));
            }
        }
        Err(Status::failed_precondition(format!(
            "{what}: cannot send file descriptors: this link does not carry them (only a mux \
             channel of a unix-socket session made with netchan_mux::Session::with_fds does)"
        )))
    }

    /// Hands `batch` to the channel: it reaches the peer ahead of the next byte written.
    pub(crate) fn send(&self, batch: &FdBatch) -> Result<(), Error> {
        #[cfg(unix)]
        if let Some(fds) = &self.fds {
            use std::os::fd::AsFd;
            let borrowed: Vec<_> = batch.iter().map(AsFd::as_fd).collect();
            return fds
                .send(&borrowed)
                .map_err(|e| Error::Io(std::io::Error::from(e)));
        }
        let _ = batch;
        Err(Error::Protocol {
            reason: "file descriptors queued on a conn that cannot carry them".into(),
        })
    }

    /// Whether the conn is a mux channel of a session that passes descriptors.
    fn carries(&self) -> bool {
        #[cfg(unix)]
        if let Some(fds) = &self.fds {
            return fds.session_carries();
        }
        false
    }

    fn take(&self) -> Vec<Fd> {
        #[cfg(unix)]
        if let Some(fds) = &self.fds {
            return fds.take();
        }
        Vec::new()
    }
}

/// The reading side: descriptors announced by `Fds` frames, kept for the call's next frame.
/// Bounded: one batch per call id (at most 253), and the mux session caps what it holds.
#[derive(Debug)]
pub(crate) struct FdInbox {
    link: FdLink,
    /// Taken from the channel, not yet announced by a frame (in arrival order).
    arrived: Vec<Fd>,
    per_call: HashMap<u64, Vec<Fd>>,
}

impl FdInbox {
    pub(crate) fn new(link: FdLink) -> FdInbox {
        FdInbox {
            link,
            arrived: Vec::new(),
            per_call: HashMap::new(),
        }
    }

    /// Handles an `Fds` frame: its descriptors are here by now (they arrive ahead of it).
    fn on_frame(&mut self, id: u64, count: u32) -> Result<(), Error> {
        let count = count as usize;
        if count == 0 || count > MAX_FDS_PER_MESSAGE {
            return Err(Error::Protocol {
                reason: format!("fds frame for call {id} announces {count} descriptors"),
            });
        }
        if self.per_call.contains_key(&id) {
            return Err(Error::Protocol {
                reason: format!("a second fds frame for call {id} before its message"),
            });
        }
        if !self.link.carries() {
            return Err(Error::Protocol {
                reason: format!(
                    "fds frame for call {id} on a conn that cannot carry file descriptors"
                ),
            });
        }
        self.arrived.extend(self.link.take());
        if self.arrived.len() < count {
            return Err(Error::Protocol {
                reason: format!(
                    "fds frame for call {id} announces {count} descriptors, {} arrived",
                    self.arrived.len()
                ),
            });
        }
        let held: usize = self.per_call.values().map(Vec::len).sum();
        if held + count > MAX_HELD {
            return Err(Error::Protocol {
                reason: format!(
                    "more than {MAX_HELD} file descriptors announced for messages not sent"
                ),
            });
        }
        let rest = self.arrived.split_off(count);
        let batch = std::mem::replace(&mut self.arrived, rest);
        self.per_call.insert(id, batch);
        Ok(())
    }

    /// Takes in one decoded frame: an `Fds` frame is absorbed (`None`); any other comes back
    /// with the descriptors announced for it (empty for most).
    pub(crate) fn route<'a>(
        &mut self,
        frame: Frame<'a>,
    ) -> Result<Option<(Frame<'a>, Vec<Fd>)>, Error> {
        let id = match frame.header {
            Header::Fds { id, count } => {
                self.on_frame(id, count)?;
                return Ok(None);
            }
            Header::Request { id, .. } | Header::Response { id, .. } => Some(id),
            _ => None,
        };
        // Most conns never carry descriptors: no lookup (and no hashing of the
        // id) then.
        if self.per_call.is_empty() {
            return Ok(Some((frame, Vec::new())));
        }
        let fds = id
            .and_then(|id| self.per_call.remove(&id))
            .unwrap_or_default();
        Ok(Some((frame, fds)))
    }
}
