//! Named virtual channels over one byte stream.
