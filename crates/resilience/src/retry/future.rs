//! Future types
//!
//! The retry service is tower's, so its response future is too.

pub use tower::retry::future::ResponseFuture;
