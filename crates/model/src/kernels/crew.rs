//! Runs the chunks of one matmul on the calling thread plus rayon workers kept spinning between
//! calls, for callers outside rayon's pool (the engine's own thread).
//!
//! Why not `rayon::join`: from outside the pool it injects the job, wakes a sleeping worker,
//! blocks the caller and wakes it again. On these VMs a wake costs ~30 us, more than a whole
//! 576 x 576 mat-vec (measured: 50 us per call after a 100 us pause vs 19 us on one thread), and
//! decode makes ~180 such calls per token with other work in between. llama.cpp keeps its threads
//! polling between ops for the same reason.
//!
//! - the caller publishes a task (`state`: job sequence number, chunk count, next chunk, in one
//!   word) and claims chunks itself; helpers claim the rest with a CAS on `state`, so a chunk runs
//!   exactly once, always with the task of its own job, and the caller never waits for a chunk
//!   nobody took;
//! - helpers are rayon jobs (`rayon::spawn`) that poll for tasks and return to rayon after
//!   [`IDLE`] without one, so at most `threads - 1` workers spin, and only while the engine runs;
//! - one caller at a time: a second concurrent caller falls back to `rayon::join`;
//! - a caller about to wait for new work calls [`release`]: the helpers return to rayon at
//!   once instead of polling out [`IDLE`] (on a machine shared with other processes, such as
//!   the stage nodes of one `plexus up`, those polls take the core another stage computes on).

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

/// A task: `f(i)` runs chunk `i`.
type Task<'a> = &'a (dyn Fn(usize) + Sync);

/// How long a helper polls without work before handing its thread back to rayon: longer than the
/// gaps between matmuls within a token (attention, norms: tens of us), short enough that spinning
/// stops soon after generation does.
const IDLE: Duration = Duration::from_millis(2);

/// `state` layout: sequence number in bits 32..64, chunk count in 16..32, next chunk in 0..16.
const FIELD: u64 = 0xFFFF;

fn unpack(s: u64) -> (u64, usize, usize) {
    (s >> 32, ((s >> 16) & FIELD) as usize, (s & FIELD) as usize)
}

struct Crew {
    /// The current job: see [`unpack`]. Published last, so a claim validates all three at once.
    state: AtomicU64,
    /// Chunks of the current job finished.
    finished: AtomicUsize,
    /// The current task, a `Task` on the caller's stack; only dereferenced after claiming a
    /// chunk of the job it belongs to, while its caller is still waiting for that chunk.
    task: AtomicPtr<Task<'static>>,
    /// Helpers alive (polling or working).
    helpers: AtomicUsize,
    /// Held by the one caller currently posting jobs.
    busy: AtomicBool,
    /// Raised by [`release`]: a helper that sees it change with no work left stops polling.
    released: AtomicU64,
}

static CREW: Crew = Crew {
    state: AtomicU64::new(0),
    finished: AtomicUsize::new(0),
    task: AtomicPtr::new(std::ptr::null_mut()),
    helpers: AtomicUsize::new(0),
    busy: AtomicBool::new(false),
    released: AtomicU64::new(0),
};

/// Tells the polling helpers that no job is coming soon (the caller is about to block waiting
/// for work): each returns its thread to rayon as soon as it finds no chunk to run. The next
/// [`run`] spawns helpers again.
pub(crate) fn release() {
    CREW.released.fetch_add(1, Release);
}

/// Runs `f(i)` for `i in 0..n`, each exactly once, on this thread and up to `threads - 1`
/// polling rayon workers. Returns `false` (having run nothing) when another caller holds the
/// crew; the caller then uses another way.
pub(super) fn run(n: usize, threads: usize, f: Task) -> bool {
    if n == 0 {
        return true;
    }
    if n as u64 > FIELD || CREW.busy.swap(true, Acquire) {
        return false;
    }
    let crew = &CREW;
    let want = threads.min(n).saturating_sub(1);
    while crew.helpers.load(Acquire) < want {
        crew.helpers.fetch_add(1, AcqRel);
        let released = crew.released.load(Acquire);
        rayon::spawn(move || CREW.help(IDLE, released));
    }
    // SAFETY: the task is only called while this function waits for every claimed chunk: the
    // guard below does that wait on every exit, unwinding included, so the extended lifetime
    // never outlives the frame.
    let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
    crew.finished.store(0, Relaxed);
    crew.task
        .store(&task as *const Task<'static> as *mut Task<'static>, Relaxed);
    let seq = (crew.state.load(Relaxed) >> 32).wrapping_add(1) & 0xFFFF_FFFF;
    crew.state.store(seq << 32 | (n as u64) << 16, Release);
    let _wait = JobGuard { crew, n };
    while crew.claim_and_run() {}
    true
}

/// Ends the caller's job, also when one of its chunks panics on the calling thread: closes the
/// job to further claims, waits for every chunk a helper claimed (they point into the caller's
/// frame), then frees the crew for the next caller.
struct JobGuard {
    crew: &'static Crew,
    n: usize,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        let unclaimed = self.crew.close_job();
        let mut polls = 0u32;
        while self.crew.finished.load(Acquire) + unclaimed < self.n {
            pause(&mut polls);
        }
        self.crew.busy.store(false, Release);
    }
}

/// Counts a claimed chunk as finished when it returns or unwinds.
struct ChunkDone<'a>(&'a AtomicUsize);

impl Drop for ChunkDone<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Release);
    }
}

impl Crew {
    /// Claims the next chunk of the current job and runs it; `false` if none is left.
    fn claim_and_run(&self) -> bool {
        loop {
            let s = self.state.load(Acquire);
            let (_, n, i) = unpack(s);
            if i >= n {
                return false;
            }
            let task = self.task.load(Acquire);
            if self
                .state
                .compare_exchange_weak(s, s + 1, AcqRel, Relaxed)
                .is_ok()
            {
                let _done = ChunkDone(&self.finished);
                // SAFETY: the claim succeeded while `state` still named this job, so `task` is
                // its task, and its caller waits in `run` until this chunk counts as finished.
                unsafe { (*task)(i) };
                return true;
            }
        }
    }

    /// Marks every chunk of the current job as claimed; returns how many nobody had claimed.
    fn close_job(&self) -> usize {
        loop {
            let s = self.state.load(Acquire);
            let (_, n, i) = unpack(s);
            if i >= n {
                return 0;
            }
            let closed = (s & !FIELD) | n as u64;
            if self
                .state
                .compare_exchange_weak(s, closed, AcqRel, Relaxed)
                .is_ok()
            {
                return n - i;
            }
        }
    }

    /// A helper's life: poll for chunks until `idle` passes without any, or until
    /// [`release`] moves `released` on while there is none.
    fn help(&self, idle: Duration, released: u64) {
        let mut last = Instant::now();
        let mut polls = 0u32;
        loop {
            if self.claim_and_run() {
                last = Instant::now();
                continue;
            }
            if self.released.load(Acquire) != released {
                break;
            }
            pause(&mut polls);
            if polls.is_multiple_of(256) && last.elapsed() > idle {
                break;
            }
        }
        self.helpers.fetch_sub(1, AcqRel);
    }
}

/// One step of a polling loop: a spin hint, and every 64th step a `yield`, so that on a busy
/// machine a poller gives its core to the thread it waits for (a preempted helper holding a
/// chunk, or the engine's thread) instead of burning the time slice.
#[inline]
fn pause(polls: &mut u32) {
    *polls = polls.wrapping_add(1);
    if polls.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicIsize;
    use std::sync::Mutex;

    /// The crew is one static: its tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn every_chunk_runs_once() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let hits: Vec<AtomicUsize> = (0..300).map(|_| AtomicUsize::new(0)).collect();
        assert!(run(hits.len(), 4, &|i| {
            hits[i].fetch_add(1, Relaxed);
        }));
        assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
    }

    #[test]
    fn a_released_helper_stops_polling_before_its_idle_time() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // A helper that would poll for an hour: only the release can end it.
        let released = CREW.released.load(Acquire);
        CREW.helpers.fetch_add(1, AcqRel);
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            CREW.help(Duration::from_secs(3600), released);
            done.send(()).ok();
        });
        release();
        assert!(
            ended.recv_timeout(Duration::from_secs(60)).is_ok(),
            "a released helper kept polling"
        );
        // The crew still runs jobs afterwards (with helpers spawned anew).
        let count = AtomicUsize::new(0);
        assert!(run(64, 2, &|_| {
            count.fetch_add(1, Relaxed);
        }));
        assert_eq!(count.load(Relaxed), 64);
    }

    /// Issue 7: a chunk that panics on the calling thread used to unwind out of `run` while
    /// helpers still ran chunks pointing into the freed frame, and left the crew busy for good.
    #[test]
    fn a_panicking_chunk_waits_for_the_helpers_chunks_issue_7() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let caller = std::thread::current().id();
        let running = AtomicIsize::new(0);
        let helper_started = AtomicBool::new(false);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(64, 4, &|_| {
                running.fetch_add(1, SeqCst);
                if std::thread::current().id() == caller {
                    // Give a helper time to claim a chunk, then fail.
                    let start = Instant::now();
                    while !helper_started.load(SeqCst) && start.elapsed() < Duration::from_secs(2) {
                        std::thread::yield_now();
                    }
                    running.fetch_sub(1, SeqCst);
                    panic!("chunk failed");
                }
                helper_started.store(true, SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                running.fetch_sub(1, SeqCst);
            })
        }));
        assert!(result.is_err(), "the panic reaches the caller");
        assert_eq!(running.load(SeqCst), 0, "no chunk runs after run() unwound");
        // The crew is free again.
        let count = AtomicUsize::new(0);
        assert!(run(8, 2, &|_| {
            count.fetch_add(1, Relaxed);
        }));
        assert_eq!(count.load(Relaxed), 8);
    }
}
