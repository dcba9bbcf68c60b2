//! The properties of glommio's reactor that shardgate relies on, and that any patch or
//! upgrade of it must keep (docs/performance.md, "The ack path against its floor", tells
//! of a patch that was tried). Each test runs a real executor on its own thread, bounded
//! in time by a watchdog thread outside glommio (`within`).
//!
//! * a sleeping executor is woken by a waker fired from another thread (the sleep
//!   notifier and its barrier) and by a shared channel, every time;
//! * a timer fires at its deadline, not before and not much after, whether the pass
//!   before the sleep was busy or idle, and thousands of short timers in several tasks
//!   never leave the executor asleep with none armed;
//! * preemption happens: a task that never yields sees `need_preempt` within a few
//!   preemption periods;
//! * TCP round trips complete through passes that sleep between them.

use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};

/// Runs `f` on a fresh executor thread and returns its result.
fn on_executor<T: Send + 'static, F, Fut>(preempt: Duration, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let ex = LocalExecutorBuilder::new(Placement::Unbound).preempt_timer(preempt).spawn(f).expect("executor");
    within("the executor", move || ex.join().expect("executor thread"))
}

/// Waits for `join` (an executor thread's end) on a watchdog of its own: a reactor that
/// loses its wake-ups also loses the glommio timers a test bounds itself with, and would
/// leave the test hanging instead of failing.
fn within<T: Send + 'static>(what: &str, join: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(join());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish in 60 s: a wake-up or a timer was lost")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// A future completed by another thread: `fire` wakes whatever waker it last saw.
#[derive(Clone, Default)]
struct Remote {
    done: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Remote {
    fn fire(&self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl Future for Remote {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        if self.done.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[test]
fn a_sleeping_executor_is_woken_by_another_thread_every_time() {
    const ROUNDS: u32 = 300;
    let worst = on_executor(Duration::from_millis(100), || async {
        let mut worst = Duration::ZERO;
        for i in 0..ROUNDS {
            let r = Remote::default();
            let other = r.clone();
            // Waits from 0 to 2 ms, so the wake lands before, during and after the
            // executor's way to sleep.
            let delay = Duration::from_micros((i as u64 * 37) % 2000);
            let t = std::thread::spawn(move || {
                std::thread::sleep(delay);
                other.fire();
            });
            let start = Instant::now();
            let timed_out = glommio::timer::timeout(Duration::from_secs(5), async {
                r.await;
                Ok(())
            })
            .await
            .is_err();
            assert!(!timed_out, "round {i}: the wake from another thread was lost");
            worst = worst.max(start.elapsed().saturating_sub(delay));
            t.join().unwrap();
        }
        worst
    });
    // A lost wake-up would wait for the 5 s timeout; a kept one arrives at once.
    assert!(worst < Duration::from_secs(1), "a wake-up took {worst:?}");
}

#[test]
fn shared_channels_ping_pong_between_two_sleeping_executors() {
    const N: u64 = 5_000;
    let (to_b, from_a) = glommio::channels::shared_channel::new_bounded::<u64>(4);
    let (to_a, from_b) = glommio::channels::shared_channel::new_bounded::<u64>(4);
    let b = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let (rx, tx) = (from_a.connect().await, to_a.connect().await);
            while let Some(v) = rx.recv().await {
                tx.send(v + 1).await.unwrap();
            }
        })
        .unwrap();
    let got = on_executor(Duration::from_millis(100), move || async move {
        let (tx, rx) = (to_b.connect().await, from_b.connect().await);
        let mut last = 0;
        for i in 0..N {
            tx.send(i).await.unwrap();
            last = glommio::timer::timeout(Duration::from_secs(5), async { Ok(rx.recv().await.unwrap()) })
                .await
                .expect("an answer over the shared channel was lost");
            assert_eq!(last, i + 1);
        }
        drop(tx);
        last
    });
    within("the answering executor", move || b.join().unwrap());
    assert_eq!(got, N);
}

#[test]
fn timers_fire_at_their_deadline_after_busy_and_idle_passes() {
    // A long preemption period: a latency timer wrongly kept past a shorter timer's
    // deadline would show as that much lateness.
    let late = on_executor(Duration::from_millis(400), || async {
        let mut worst_late = Duration::ZERO;
        for i in 0..40u64 {
            // A busy pass first (it arms the latency-ring preemption timer), then a
            // sleep on a timer that is due before or after that preemption timer.
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_micros(300 * (i % 4)) {
                std::hint::spin_loop();
            }
            let want = Duration::from_millis([1, 5, 15, 30, 60][i as usize % 5]);
            let start = Instant::now();
            glommio::timer::sleep(want).await;
            let took = start.elapsed();
            assert!(took >= want, "round {i}: a {want:?} timer fired after {took:?}");
            worst_late = worst_late.max(took - want);
        }
        worst_late
    });
    assert!(late < Duration::from_millis(200), "a timer fired {late:?} late");
}

#[test]
fn short_timers_are_never_lost() {
    // Thousands of sub-millisecond sleeps in three tasks at once, with busy stretches in
    // between: timers fire while a pass consumes its rings, right where a pass decides
    // whether the timer it armed earlier will still wake it. A lost one leaves the
    // executor asleep with nothing to wake it: the watchdog below fails the test.
    const SLEEPS: u64 = 3_000;
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let tasks: Vec<_> = (0..3u64)
                .map(|t| {
                    let d = d.clone();
                    glommio::spawn_local(async move {
                        for i in 0..SLEEPS {
                            let us = (i * 7919 + t * 104_729) % 400;
                            if i % 7 == 0 {
                                let spin = Instant::now();
                                while spin.elapsed() < Duration::from_micros(us / 2) {
                                    std::hint::spin_loop();
                                }
                            }
                            glommio::timer::sleep(Duration::from_micros(us)).await;
                            d.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    while done.load(Ordering::Relaxed) < 3 * SLEEPS {
        let now = done.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(5) && Instant::now() < deadline,
            "timers stopped firing after {now} of {} sleeps",
            3 * SLEEPS
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    within("the timer executor", move || ex.join().unwrap());
}

#[test]
fn a_task_that_never_yields_is_still_told_to_preempt() {
    let waits = on_executor(Duration::from_millis(10), || async {
        let mut waits = Vec::new();
        for _ in 0..20 {
            // An idle pass in between, so the next busy stretch starts from a pass that
            // may keep the timer an earlier pass armed.
            glommio::timer::sleep(Duration::from_millis(2)).await;
            let start = Instant::now();
            while !glommio::executor().need_preempt() {
                assert!(start.elapsed() < Duration::from_secs(2), "need_preempt never became true");
                std::hint::spin_loop();
            }
            waits.push(start.elapsed());
            glommio::executor().yield_task_queue_now().await;
        }
        waits
    });
    let worst = waits.iter().max().unwrap();
    assert!(*worst < Duration::from_millis(500), "preemption took {worst:?}: {waits:?}");
}

#[test]
fn tcp_round_trips_through_passes_that_sleep() {
    const ROUNDS: u64 = 2_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let served = Arc::new(AtomicU64::new(0));
    let s = served.clone();
    let server = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let l = glommio::net::TcpListener::bind(addr).unwrap();
            let mut c = l.accept().await.unwrap();
            let mut buf = [0u8; 8];
            while c.read_exact(&mut buf).await.is_ok() {
                let v = u64::from_le_bytes(buf) + 1;
                c.write_all(&v.to_le_bytes()).await.unwrap();
                s.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
    let mut c = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..ROUNDS {
        // Every few rounds the client pauses, so the server goes to sleep between them.
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(3));
        }
        c.write_all(&i.to_le_bytes()).unwrap();
        let mut buf = [0u8; 8];
        c.read_exact(&mut buf).expect("the answer never came");
        assert_eq!(u64::from_le_bytes(buf), i + 1);
    }
    drop(c);
    within("the server executor", move || server.join().unwrap());
    assert_eq!(served.load(Ordering::Relaxed), ROUNDS);
}
