//! The storage trait over HTTP: an axum server and a reqwest client.
