//! Test doubles for the measurer's event source, and a wait for its published counts
//! (tests only).

use std::io;
use std::sync::mpsc;
use std::time::Duration;

use super::{ProcEvent, ProcEventSource};

/// Process events fed by the test through a channel.
pub struct ChannelSource(pub mpsc::Receiver<ProcEvent>);

impl ProcEventSource for ChannelSource {
    fn next_events(&mut self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        if let Ok(ev) = self.0.recv_timeout(Duration::from_millis(20)) {
            out.push(ev);
        }
        Ok(())
    }
}

/// Polls `done` until it holds, or panics after 10 s with `what` (the reader thread
/// publishes its counts after each batch of events).
pub fn wait_until(done: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
