//! One task polling several futures that wake each other, without waking
//! itself through the scheduler.
//!
//! A task that drives an HTTP/2 connection together with its streams (the
//! tunnel's connections), or an HTTP/1.1 connection together with the
//! client connection its requests go on (the agent's inspector), is woken
//! by its own futures: h2 wakes the task polling a connection whenever a
//! stream queues data, hyper's client wakes its connection when a request
//! is handed over, and the connection wakes the request's future when the
//! response comes. When
//! those are all polled by the same task, each such wake is the task waking
//! itself, and tokio reschedules a self-woken task as a yield: at the back
//! of the queue, with an idle worker woken to steal it. That is a futex
//! wake-up and a hop between cores per message. Measured in the product,
//! one connection at a time: 0.35 more context switches per request at
//! each end of a TCP endpoint's tunnel, and 15–20 µs on its p50.
//!
//! [`drive`] polls such futures with a waker of its own that, while the
//! task is in one of its passes, only notes a wake; a wake that came
//! during the pass means another pass, in the same turn of the task.
//! Wakes from elsewhere (a socket, another task) wake the task as usual.

use std::{
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, Waker},
};

use futures_util::task::AtomicWaker;

/// Passes in one turn of the task at most; a task still woken after them
/// yields to the scheduler. Bounds a future that wakes itself on every
/// poll (tokio's cooperative budget does, once spent).
const MAX_PASSES: usize = 8;

/// Runs `pass` until it is ready. A pass polls what the task drives,
/// through [`Pass::poll`] for what may wake the task itself; `cx` is the
/// task's own context, for what only other tasks and sockets wake.
pub fn drive<R>(
    mut pass: impl FnMut(&mut Context<'_>, &Pass) -> Poll<R>,
) -> impl Future<Output = R> {
    let quiet = Arc::new(Quiet {
        state: AtomicU8::new(IDLE),
        task: AtomicWaker::new(),
    });
    let handle = Pass {
        waker: Waker::from(quiet.clone()),
        quiet,
    };
    poll_fn(move |cx| {
        handle.quiet.task.register(cx.waker());
        for _ in 0..MAX_PASSES {
            handle.quiet.state.store(IN_PASS, Ordering::Release);
            let polled = pass(cx, &handle);
            if handle.quiet.state.swap(IDLE, Ordering::AcqRel) != WOKEN || polled.is_ready() {
                return polled;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

/// What a pass of [`drive`] polls through.
pub struct Pass {
    quiet: Arc<Quiet>,
    waker: Waker,
}

impl Pass {
    /// Polls with the pass's waker. A wake noted before this call is served
    /// by it (the caller polls here what such a wake asked to be polled:
    /// h2's connection after its streams); one during it means another
    /// pass.
    pub fn poll<R>(&self, poll: impl FnOnce(&mut Context<'_>) -> R) -> R {
        self.quiet.state.store(IN_PASS, Ordering::Release);
        poll(&mut Context::from_waker(&self.waker))
    }
}

/// The waker [`Pass::poll`] polls with.
struct Quiet {
    state: AtomicU8,
    task: AtomicWaker,
}

/// The task is between passes: a wake wakes it.
const IDLE: u8 = 0;
/// The task is in a pass: a wake is noted.
const IN_PASS: u8 = 1;
/// Woken during the pass: another pass follows.
const WOKEN: u8 = 2;

impl std::task::Wake for Quiet {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let noted =
            self.state
                .compare_exchange(IN_PASS, WOKEN, Ordering::AcqRel, Ordering::Acquire);
        if let Err(IDLE) = noted {
            self.task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::AtomicUsize,
        task::{Context, Poll, Wake, Waker},
    };

    use super::*;

    /// A task's waker that counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn wakes(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn task() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    /// Polls `future` once, as the task of `waker`.
    fn poll_once<F: Future>(future: &mut std::pin::Pin<Box<F>>, waker: &Waker) -> Poll<F::Output> {
        future.as_mut().poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_wake_during_a_pass_is_served_in_the_same_turn_without_waking_the_task() {
        let (count, waker) = task();
        let mut passes = 0;
        let mut driven = Box::pin(drive(|_, pass| {
            pass.poll(|cx| {
                passes += 1;
                if passes < 3 {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                } else {
                    Poll::Ready(passes)
                }
            })
        }));
        assert_eq!(poll_once(&mut driven, &waker), Poll::Ready(3));
        assert_eq!(count.wakes(), 0);
    }

    #[test]
    fn a_future_that_always_wakes_itself_makes_the_task_yield() {
        let (count, waker) = task();
        let mut passes = 0;
        let mut driven = Box::pin(drive(|_, pass| {
            pass.poll(|cx| {
                passes += 1;
                cx.waker().wake_by_ref();
                Poll::<()>::Pending
            })
        }));
        assert!(poll_once(&mut driven, &waker).is_pending());
        assert_eq!(count.wakes(), 1);
        drop(driven);
        assert_eq!(passes, MAX_PASSES);
    }

    #[test]
    fn a_wake_between_passes_wakes_the_task() {
        let (count, waker) = task();
        let mut kept = None;
        let mut driven = Box::pin(drive(|_, pass| {
            pass.poll(|cx| kept = Some(cx.waker().clone()));
            Poll::<()>::Pending
        }));
        assert!(poll_once(&mut driven, &waker).is_pending());
        assert_eq!(count.wakes(), 0);
        drop(driven);
        kept.expect("polled").wake();
        assert_eq!(count.wakes(), 1);
    }
}
