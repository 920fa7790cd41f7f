//! The SnapshotSchedule controller.

pub mod clock;
pub mod plan;

pub use clock::{Clock, ManualClock, SystemClock};
