//! Resilience primitives (work in progress).
