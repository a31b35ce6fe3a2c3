//! RPC over any conn.
