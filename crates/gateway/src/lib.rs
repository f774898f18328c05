//! Plexus gateway: the OpenAI-compatible HTTP API in front of a [`backend::Backend`].

pub mod backend;
