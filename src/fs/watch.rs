//! Watches the real directories behind the mount (inotify) and invalidates the kernel's
//! cached entries the moment something changes underneath: a package upgrade replacing
//! `/usr/bin/x` is seen by the very next exec, although entries are cached for long.

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use inotify::{EventMask, Inotify, WatchMask};

use crate::fs::Overlay;

/// The watcher thread; stops when [`Watcher::stop`] is called or the overlay is dropped.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(overlay: Weak<Overlay>, dirs: Vec<PathBuf>) -> anyhow::Result<Self> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::ATTRIB
            | WatchMask::CLOSE_WRITE
            | WatchMask::ONLYDIR;
        let mut by_wd = HashMap::new();
        for dir in dirs {
            match inotify.watches().add(&dir, mask) {
                Ok(wd) => {
                    by_wd.insert(wd, dir);
                }
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch"),
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("optbin-inotify".into())
            .spawn(move || watch_loop(inotify, by_wd, overlay, stop2))
            .context("spawning the inotify thread")?;
        Ok(Self { stop, thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch_loop(
    mut inotify: Inotify,
    by_wd: HashMap<inotify::WatchDescriptor, PathBuf>,
    overlay: Weak<Overlay>,
    stop: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = [PollFd::new(&inotify, PollFlags::IN)];
        // A timeout so that `stop` is noticed.
        let ready = poll(&mut pfd, Some(&Timespec { tv_sec: 0, tv_nsec: 200_000_000 }));
        if !matches!(ready, Ok(n) if n > 0) {
            continue;
        }
        let events = match inotify.read_events(&mut buffer) {
            Ok(events) => events,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading inotify events; watching stops");
                return;
            }
        };
        let Some(overlay) = overlay.upgrade() else { return };
        for event in events {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                tracing::warn!("inotify queue overflow: invalidating every watched directory");
                for dir in by_wd.values() {
                    overlay.invalidate_real(dir, None);
                }
                continue;
            }
            let Some(dir) = by_wd.get(&event.wd) else { continue };
            tracing::debug!(dir = %dir.display(), name = ?event.name, mask = ?event.mask, "changed underneath");
            overlay.invalidate_real(dir, event.name);
            if let Some(name) = event.name
                && event.mask.intersects(EventMask::MOVED_TO | EventMask::CLOSE_WRITE)
            {
                overlay.revisit_changed(dir, name);
            }
        }
    }
}
