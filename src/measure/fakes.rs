//! Test doubles for the measurer's event source (tests only).

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
