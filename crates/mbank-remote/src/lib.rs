//! # mbank-remote
//!
//! The bank server's HTTP API (`docs/api.md`): the types both sides put on the wire
//! ([`wire`]), and the client that lets every bank operation run against a server.

pub mod wire;
