//! A small persistent worker pool for the kernels.
//!
//! Decoding one token makes about 120 parallel kernel calls, a few microseconds apart. rayon's
//! workers go to sleep between them and each wake-up costs a futex round trip (measured: 15 % of
//! a two-thread decode in the kernel's sleep and wake paths). Here idle workers spin briefly
//! (about 100 µs) for the next call and then park on a condition variable, so a busy machine does
//! not have them burning cores: they never spin for long.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Spins before parking (each is a `pause`, tens of nanoseconds).
const SPINS: u32 = 4_000;

/// A job as the workers see it: its generation, task count and the function (lifetime erased;
/// `Pool::run` does not return before every call of it has finished).
#[derive(Clone, Copy)]
struct Job {
    generation: u64,
    tasks: usize,
    f: *const (dyn Fn(usize) + Sync),
}

// SAFETY: the function is `Sync`, and `run` keeps it alive until every task that uses it ends.
unsafe impl Send for Job {}

struct Shared {
    /// Held by the thread whose job the workers are running: one job at a time.
    caller: Mutex<()>,
    job: Mutex<Option<Job>>,
    wake: Condvar,
    generation: AtomicU64,
    /// High 32 bits: generation; low 32 bits: next task index.
    next: AtomicU64,
    done: AtomicUsize,
    /// A task panicked on a worker (reported by `run`).
    panicked: AtomicBool,
    /// Workers parked on `wake` (changed only under `job`'s lock), so that `run` makes the
    /// wake-up system call only when someone sleeps.
    parked: AtomicUsize,
}

/// The pool: `threads - 1` workers plus the calling thread.
pub(crate) struct Pool {
    shared: &'static Shared,
    threads: usize,
    _workers: Vec<JoinHandle<()>>,
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets how many threads the kernels use. Takes effect only before the first kernel call;
/// returns false if the pool already exists with another size.
pub fn set_threads(threads: usize) -> bool {
    THREADS.store(threads.max(1), Ordering::Relaxed);
    POOL.get().is_none_or(|p| p.threads == threads.max(1))
}

/// Threads the kernels use (all cores unless [`set_threads`] said otherwise).
pub fn threads() -> usize {
    pool().threads
}

pub(crate) fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let threads = match THREADS.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Pool::new(threads)
    })
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            caller: Mutex::new(()),
            job: Mutex::new(None),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            next: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
        }));
        let workers = (1..threads)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("exo-kernels-{i}"))
                    .spawn(move || worker(shared))
                    .ok()
            })
            .collect::<Vec<_>>();
        Pool {
            shared,
            threads: workers.len() + 1,
            _workers: workers,
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(i)` for every `i` in `0..tasks`, spread over the pool; returns when all are done.
    pub(crate) fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        let s = self.shared;
        // Another thread's job is running (two requests decoding at once): run this one here
        // rather than wait, so neither stalls the other.
        let Ok(_caller) = s.caller.try_lock() else {
            (0..tasks).for_each(f);
            return;
        };
        let generation = s.generation.load(Ordering::Relaxed) + 1;
        // SAFETY: erases the borrow's lifetime; the wait below outlives every use.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Job {
            generation,
            tasks,
            f,
        };
        let parked = {
            // Publish under the lock, so a worker about to park cannot miss the new generation:
            // it counts itself in `parked` and checks the generation under this same lock.
            let mut slot = s.job.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(job);
            s.done.store(0, Ordering::Relaxed);
            s.next.store(generation << 32, Ordering::Relaxed);
            s.generation.store(generation, Ordering::Release);
            s.parked.load(Ordering::Relaxed)
        };
        if parked > 0 {
            s.wake.notify_all();
        }
        work(s, job);
        // Every claimed task must end before `f` (borrowed from the caller's stack) goes away;
        // `work` catches panics, so a failing task still counts as done.
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < tasks {
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            // A kernel bug, not an input error: inputs are checked before any task runs.
            std::panic::resume_unwind(Box::new("a kernel task panicked"));
        }
    }
}

/// Claims and runs tasks of `job` until none is left.
fn work(s: &Shared, job: Job) {
    loop {
        let v = s.next.load(Ordering::Acquire);
        let (generation, index) = (v >> 32, (v & 0xffff_ffff) as usize);
        if generation != job.generation || index >= job.tasks {
            return;
        }
        if s.next
            .compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: the task was claimed under this job's generation, so `run` is still waiting
            // for it and the function is alive.
            let call = std::panic::AssertUnwindSafe(|| unsafe { (*job.f)(index) });
            if std::panic::catch_unwind(call).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
            s.done.fetch_add(1, Ordering::Release);
        }
    }
}

fn worker(s: &'static Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == seen {
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.job.lock().unwrap_or_else(|p| p.into_inner());
            s.parked.fetch_add(1, Ordering::Relaxed);
            let _guard = s
                .wake
                .wait_while(guard, |_| s.generation.load(Ordering::Acquire) == seen)
                .unwrap_or_else(|p| p.into_inner());
            s.parked.fetch_sub(1, Ordering::Relaxed);
            break;
        }
        let job = *s.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = job {
            seen = job.generation;
            work(s, job);
        }
    }
}
