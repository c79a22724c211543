/* nbn_pool.h: the shim's persistent worker threads (included once, by nbn_shim.c).
 *
 * Before ABI 1.2's pool every parallel step started its threads and joined them (~25 us a
 * thread, three steps in a split call). Now:
 *   - workers start on the first step that runs on more than one thread, as many as it needs
 *     (the caller is one of the threads), and stay;
 *   - between steps a worker spins for NBN_POOL_SPIN_NS on the step counter (the next step of
 *     the same call follows within microseconds), then looks at it once per sched_yield() (a
 *     thread with work of its own gets the CPU meanwhile) until it has been awake for
 *     NBN_POOL_AWAKE_NS (the next call of a program that does other work in between), then
 *     sleeps on its own condition variable: a parked pool uses no CPU. Waking a sleeping worker
 *     costs ~100-200 us on a VM (its CPU must be scheduled again), more than a step of a
 *     (256, 512) tensor takes, so the workers stay awake about as long as OpenMP's do (Numba's
 *     parallel drivers paid the same from gaps of 5-20 ms on; benchmarks/README.md, "Calls
 *     with pauses between them"). A call that finds workers parked (`parked`) runs serially
 *     unless its work repays NBN_PARKED_WAKE_NS (nbn_shim.c, call_threads), and wakes them
 *     ahead (pool_wake_ahead) for the calls after it;
 *   - one step at a time owns the pool (`owner`, a trylock): a step of a call from another
 *     application thread that finds it busy runs its items on its calling thread alone. That
 *     thread is a CPU already busy with work of its own, so nothing is oversubscribed and
 *     nobody waits for the pool; the items and each channel's merge order come from the plan,
 *     not from the threads that run them, so the bits are the same either way;
 *   - nbn_set_num_threads(n) joins the workers above n - 1 (it waits for the step in flight;
 *     `leaving` ends the waits of awake workers);
 *   - at unload (dlclose, or exit) a destructor wakes and joins them all, unless a call is in
 *     flight on another thread (only at exit: the process ends them);
 *   - a fork waits for the step in flight; the child starts with no workers (they are not
 *     copied) and starts its own when it needs them.
 * Workers block every signal, so signals go to the application's threads.
 */
#include <limits.h>
#include <signal.h>
#include <time.h>

#ifndef NBN_POOL_SPIN_NS /* a wait's spin (the caller's for its workers, a worker's first) */
#define NBN_POOL_SPIN_NS 50000 /* see benchmarks/README.md, "A persistent thread pool" */
#endif
#ifndef NBN_POOL_AWAKE_NS /* a worker's wait for the next step, awake, before it sleeps */
#define NBN_POOL_AWAKE_NS 10000000 /* benchmarks/README.md, "Calls with pauses between them" */
#endif
#ifndef NBN_PARKED_WAKE_NS /* what waking a parked worker costs a call (VMs: 100-200 us) */
#define NBN_PARKED_WAKE_NS 200000
#endif

typedef struct {
    pthread_t id;
    pthread_cond_t wake; /* signalled when a step for this worker is published, or it must leave */
    int index;
    unsigned seen;    /* the last step this worker has looked at */
    unsigned wakeups; /* the last pool.wakeups it has looked at */
} nbn_worker;

static struct {
    pthread_mutex_t owner; /* held by the step that runs on the pool (and by resizes) */
    pthread_mutex_t lock;  /* guards what follows (writes to step and pending included) */
    pthread_cond_t done;   /* signalled when pending reaches 0 */
    nbn_worker **workers;  /* [0, size): started; touched by the owner only */
    int size, limit;       /* workers with index >= limit leave */
    atomic_uint step;      /* bumped for each step published */
    nbn_loop *loop;        /* the step: workers [0, participants) run it */
    int participants;
    atomic_int pending; /* participants still running the step */
    atomic_int leaving; /* set while pool_shrink joins workers: awake ones stop waiting */
    atomic_int parked;  /* workers asleep on their condition variable */
    unsigned wakeups;   /* bumped by pool_wake_ahead (owner and lock held) */
} pool = {.owner = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER, .limit = INT_MAX};

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Whether pool.step moved on from `seen` (or the pool is shrinking: pool_shrink). */
static int step_after(unsigned seen) {
    return atomic_load_explicit(&pool.step, memory_order_acquire) != seen ||
           atomic_load_explicit(&pool.leaving, memory_order_relaxed);
}

/* Whether `ns` have passed since *start, the time of the first call (the clock is read by one
 * look in 64). */
static int passed(double *start, double ns) {
    double t = seconds();
    if (*start == 0) *start = t;
    return t > *start + 1e-9 * ns;
}

/* A worker's wait for the step after `seen`: it spins for NBN_POOL_SPIN_NS, then looks once per
 * sched_yield() until NBN_POOL_AWAKE_NS have passed, or until the step comes (or pool_shrink
 * begins). The worker then takes the lock and looks again, or sleeps. */
static void wait_awake(unsigned seen) {
    double start = 0;
    unsigned looks = 1;
    for (;; looks++) {
        if (step_after(seen)) return;
        cpu_relax();
        if (looks % 64 == 0 && passed(&start, NBN_POOL_SPIN_NS)) break;
    }
    for (;; looks++) {
        if (step_after(seen)) return;
        sched_yield();
        if (looks % 64 == 0 && passed(&start, NBN_POOL_AWAKE_NS)) return;
    }
}

static void *pool_worker(void *arg) {
    nbn_worker *self = arg;
    for (;;) {
        /* after every step, the ones it is left out of too: `parked` then means an idle pool */
        wait_awake(self->seen);
        pthread_mutex_lock(&pool.lock);
        self->wakeups = pool.wakeups;
        while (self->index < pool.limit && atomic_load(&pool.step) == self->seen &&
               pool.wakeups == self->wakeups) {
            atomic_fetch_add(&pool.parked, 1);
            pthread_cond_wait(&self->wake, &pool.lock);
            atomic_fetch_sub(&pool.parked, 1);
        }
        if (self->index >= pool.limit) {
            pthread_mutex_unlock(&pool.lock);
            return NULL;
        }
        if (atomic_load(&pool.step) == self->seen) { /* woken ahead of a step: wait awake */
            pthread_mutex_unlock(&pool.lock);
            continue;
        }
        /* The owner publishes no step before every participant of the last one is done, so a
         * participant never misses its step; a worker left out of one just looks at it. */
        self->seen = atomic_load(&pool.step);
        nbn_loop *loop = self->index < pool.participants ? pool.loop : NULL;
        pthread_mutex_unlock(&pool.lock);
        if (!loop) continue;
        loop_worker(loop); /* loop is the owner's: not touched after pending counts this one */
        if (atomic_fetch_sub(&pool.pending, 1) == 1) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

/* Starts workers up to `wanted` (fewer if a thread cannot start); the owner holds the pool. */
static void pool_grow(int wanted) {
    if (wanted <= pool.size) return;
    nbn_worker **workers = realloc(pool.workers, (size_t)wanted * sizeof *workers);
    if (!workers) return;
    pool.workers = workers;
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before); /* the workers inherit it */
    while (pool.size < wanted) {
        nbn_worker *w = malloc(sizeof *w);
        if (!w) break;
        /* seen is set here, not by the worker: a step published before the worker first runs
         * is one it must not miss */
        *w = (nbn_worker){.index = pool.size, .seen = atomic_load(&pool.step)};
        if (pthread_cond_init(&w->wake, NULL) != 0) {
            free(w);
            break;
        }
        if (pthread_create(&w->id, NULL, pool_worker, w) != 0) {
            pthread_cond_destroy(&w->wake);
            free(w);
            break;
        }
        workers[pool.size++] = w;
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
}

/* Wakes the parked workers without a step, so that they wait awake for the next one: a call
 * that ran serially rather than pay their wake-up (call_threads) leaves them ready for the
 * calls after it. Nothing when a step owns the pool (its workers are awake). */
static void pool_wake_ahead(void) {
    if (pthread_mutex_trylock(&pool.owner) != 0) return;
    pthread_mutex_lock(&pool.lock);
    pool.wakeups++;
    for (int i = 0; i < pool.size; i++) pthread_cond_signal(&pool.workers[i]->wake);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.owner);
}

/* Joins the workers from index `keep` on; the owner holds the pool. */
static void pool_shrink(int keep) {
    if (keep < 0) keep = 0;
    if (keep >= pool.size) return;
    pthread_mutex_lock(&pool.lock);
    pool.limit = keep;
    atomic_store(&pool.leaving, 1);
    for (int i = keep; i < pool.size; i++) pthread_cond_signal(&pool.workers[i]->wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = keep; i < pool.size; i++) {
        pthread_join(pool.workers[i]->id, NULL);
        pthread_cond_destroy(&pool.workers[i]->wake);
        free(pool.workers[i]);
    }
    pthread_mutex_lock(&pool.lock);
    pool.size = keep;
    pool.limit = INT_MAX;
    atomic_store(&pool.leaving, 0);
    pthread_mutex_unlock(&pool.lock);
}

/* Runs `loop` on the calling thread and up to `helpers` workers; the owner holds the pool. */
static void pool_run(nbn_loop *loop, int helpers) {
    pool_grow(helpers);
    int n = helpers < pool.size ? helpers : pool.size;
    if (n > 0) {
        pthread_mutex_lock(&pool.lock);
        pool.loop = loop;
        pool.participants = n;
        atomic_store(&pool.pending, n);
        atomic_fetch_add_explicit(&pool.step, 1, memory_order_release);
        for (int i = 0; i < n; i++) pthread_cond_signal(&pool.workers[i]->wake);
        pthread_mutex_unlock(&pool.lock);
    }
    loop_worker(loop);
    if (n == 0) return;
    double start = 0;
    for (unsigned looks = 1; atomic_load(&pool.pending) != 0; looks++) {
        cpu_relax();
        if (looks % 64 == 0 && passed(&start, NBN_POOL_SPIN_NS)) break;
    }
    pthread_mutex_lock(&pool.lock);
    while (atomic_load(&pool.pending) != 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
}

/* Runs `loop` on `threads` threads, the caller's included: on the pool when it is free, else on
 * the calling thread alone. */
static void run_loop(nbn_loop *loop, int64_t threads) {
    if (threads > 1 && pthread_mutex_trylock(&pool.owner) == 0) {
        pool_run(loop, threads - 1 < INT_MAX ? (int)(threads - 1) : INT_MAX);
        pthread_mutex_unlock(&pool.owner);
    } else {
        loop_worker(loop);
    }
}

/* nbn_set_num_threads: the workers a count of `threads` leaves without work go. */
static void pool_fit(int64_t threads) {
    pthread_mutex_lock(&pool.owner);
    pool_shrink(threads - 1 < INT_MAX ? (int)(threads - 1) : INT_MAX);
    pthread_mutex_unlock(&pool.owner);
}

static void pool_before_fork(void) {
    pthread_mutex_lock(&pool.owner);
    pthread_mutex_lock(&pool.lock);
}

static void pool_after_fork_in_parent(void) {
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.owner);
}

/* The child has only the thread that forked: the workers' structures are dropped (their
 * condition variables are not destroyed: glibc's destroy would wait for waiters that do not
 * exist here). */
static void pool_after_fork_in_child(void) {
    for (int i = 0; i < pool.size; i++) free(pool.workers[i]);
    pool.size = 0;
    atomic_store(&pool.parked, 0);
    pool.limit = INT_MAX;
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.owner);
}

__attribute__((constructor)) static void pool_load(void) {
    pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child);
}

__attribute__((destructor)) static void pool_unload(void) {
    if (pthread_mutex_trylock(&pool.owner) != 0) return; /* a call in flight at exit */
    pool_shrink(0);
    free(pool.workers);
    pool.workers = NULL;
    pthread_mutex_unlock(&pool.owner);
}
