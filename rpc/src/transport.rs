//! Frame I/O shared by clients and servers, in two halves: `write` (the
//! batching [`Outbox`] and its writer task) and `read` (the
//! [`FrameReader`]).
//!
//! Both directions are bounded. The reader allocates only for bytes that
//! arrived and gives each frame a completion deadline; the writer gives up
//! on a peer that accepts no bytes for the write-stall bound; replies that
//! find the write queue full count against an outbound byte budget.

mod read;
mod write;

pub(crate) use read::{
    read_preamble, writes_only_what_it_delivers, FrameReader, Incoming, Oversize, BIG_FRAME,
};
pub(crate) use write::{Batch, FrameWriter, Outbox, WhenFull, WithFds};
