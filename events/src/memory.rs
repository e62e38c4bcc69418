//! An in-memory sink: the reference implementation of [`EventSink`], for
//! tests. It keeps every event and has no bound, so it is no production
//! destination.

use std::sync::Mutex;

use crate::{Event, EventSink};

/// Keeps every published event, in order.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<Event>>,
}

impl MemorySink {
    /// The events published so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("memory sink lock").clone()
    }
}

impl EventSink for MemorySink {
    fn publish(&self, event: Event) {
        self.events.lock().expect("memory sink lock").push(event);
    }
}
