/* Cold O_DIRECT reads through the staging ring with no Python between the reads.

   Reader threads claim the load's bytes from the front, slot by slot, and read each slot in one request.
   Reader t reads into slot t only (at most one reader a slot), queues that slot's copy to the GPU, and
   waits for the copy through its own event (~10 us) before its next read into the slot, so the reads
   land in as few places as a raw read by as many threads. On the H200 machine each read then took as
   long as raw's, where reads into the 24 slots of a shared ring, handed to one copier thread, took up to
   12-17% longer: 0.97 of raw against the copier's 0.90 (docs/perf-notes.md, twenty-first session). The
   copier was removed once own slots read at 97-108% of the disk in six of eight runs.

   Slots not pinned yet (pinned[slot] == 0) are pinned at their first copy, by the reader that owns them,
   while the other readers read. In Python the same loop needs the GIL at each hand-off: with 17 threads
   a full slot took 1.2-1.9 ms to come back to a reader, against ~10 us of copy, and the readers waited
   for slots (docs/perf-notes.md, nineteenth session). Here a reader hands no slot to another thread; the
   readers share only a mutex, taken to claim the next slot's worth and to count.

   The CUDA runtime is not linked: the caller passes the addresses of cudaMemcpyAsync, cudaEventRecord,
   cudaEventSynchronize, cudaSetDevice and cudaHostRegister from the runtime torch loaded. Without them
   (NULL) the copies are memcpy into host memory, which the CPU tests use.

   Built at install time (setup.py), or else on first use by flashtensors.engine.native with the system C
   compiler; loaded with ctypes, whose calls let go of the GIL. */

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef FT_SOURCE_TAG
#define FT_SOURCE_TAG "" /* set by the build: the first 16 hex digits of this file's sha256 */
#endif

#define FT_ALIGN 4096
#define FT_OK 0
#define FT_EREAD 1   /* a read failed: err_errno, err_region */
#define FT_ESHRANK 2 /* a file ended before its region did: err_region */
#define FT_ECUDA 3   /* the runtime refused a copy or an event: cuda_error */
#define FT_ESTOPPED 4
#define FT_ETHREAD 5 /* a thread could not be started: err_errno */
#define FT_EPIN 6    /* the runtime refused to pin a slot (cudaHostRegister): cuda_error */

typedef int (*memcpy_async_fn)(void *, const void *, size_t, int, void *);
typedef int (*event_record_fn)(void *, void *);
typedef int (*event_sync_fn)(void *);
typedef int (*set_device_fn)(int);
typedef int (*host_register_fn)(void *, size_t, unsigned int);

struct ft_region {
    int64_t fd;
    int64_t file_start, file_end; /* file_start on a 4 KiB file offset */
    int64_t arena_offset;
};

struct ft_load {
    /* set by the caller */
    const struct ft_region *regions;
    int64_t nregions;
    uint8_t *ring;
    int64_t slot_size; /* a multiple of 4 KiB */
    int64_t nslots;
    uint8_t *arena;  /* a device address, or host memory without memcpy_async */
    int64_t threads; /* readers: at most nslots, one slot each (start lowers it to nslots) */
    int64_t device;
    void *stream;
    void **events; /* one per reader, for its own slot's copy; with event_record only */
    memcpy_async_fn memcpy_async;
    event_record_fn event_record;
    event_sync_fn event_sync;
    set_device_fn set_device;
    host_register_fn host_register; /* NULL: every slot is pinned already */
    int64_t register_flags;
    int8_t *pinned; /* per slot, 1 once pinned; the readers set it for the slots they pin */
    /* results */
    int64_t error, err_errno, err_region, cuda_error;
    double first_read, last_read; /* CLOCK_MONOTONIC seconds, as Python's perf_counter */
    int64_t reads, copies;
    double read_s; /* the reads' own time, summed: over the window, the reads in flight */
    double pin_s;  /* time spent pinning slots, summed */
    /* private */
    pthread_mutex_t lock;
    int64_t region, pos; /* the next claim */
    int64_t readers_running;
    int stop;
    pthread_t *readers;
    struct ft_reader *reader_args;
    int64_t started;
    int done; /* the last reader has left: nothing more is read or copied */
    pthread_cond_t done_cv;
};

struct ft_reader {
    struct ft_load *ld;
    int32_t index;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Record the first error only, and stop every reader after its current slot; the caller holds the lock. */
static void fail(struct ft_load *ld, int64_t code, int64_t err, int64_t region) {
    if (ld->error == FT_OK) {
        ld->error = code;
        ld->err_errno = err;
        ld->err_region = region;
    }
    ld->stop = 1;
}

/* Read up to want bytes at offset; stops at the end of the file. Bytes read, or -errno. */
static int64_t read_full(int fd, uint8_t *buf, int64_t want, int64_t offset) {
    int64_t done = 0;
    while (done < want) {
        ssize_t r = pread(fd, buf + done, (size_t)(want - done), (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -(int64_t)errno;
        }
        if (r == 0)
            break;
        done += r;
        if (r % FT_ALIGN)
            break; /* a short O_DIRECT read ends at the end of the file */
    }
    return done;
}

/* Skip to the next region while the cursor is at a region's end (empty regions too); lock held. */
static void skip_ended(struct ft_load *ld) {
    while (ld->region < ld->nregions && ld->pos >= ld->regions[ld->region].file_end) {
        ld->region++;
        if (ld->region < ld->nregions)
            ld->pos = ld->regions[ld->region].file_start;
    }
}

/* The next slot's worth of the load, from the front: 0 when nothing is left or the load stops. The
   caller holds the lock. */
static int claim(struct ft_load *ld, int64_t *region, int64_t *offset, int64_t *n) {
    if (ld->stop || ld->region >= ld->nregions)
        return 0;
    int64_t left = ld->regions[ld->region].file_end - ld->pos;
    *region = ld->region;
    *offset = ld->pos;
    *n = left < ld->slot_size ? left : ld->slot_size;
    ld->pos += *n;
    skip_ended(ld);
    return 1;
}

/* A read ran from began to ended: the load's window, count and summed time; lock held. */
static void note_read(struct ft_load *ld, double began, double ended) {
    if (ld->first_read == 0 || began < ld->first_read)
        ld->first_read = began;
    if (ended > ld->last_read)
        ld->last_read = ended;
    ld->reads++;
    ld->read_s += ended - began;
}

/* Pin a slot at its first copy (only its reader copies it). 0, or the runtime's error. */
static int pin_slot(struct ft_load *ld, int32_t slot) {
    if (!ld->host_register || !ld->pinned || ld->pinned[slot])
        return 0;
    double began = now();
    int err = ld->host_register(ld->ring + (int64_t)slot * ld->slot_size, (size_t)ld->slot_size,
                                (unsigned int)ld->register_flags);
    double took = now() - began;
    pthread_mutex_lock(&ld->lock);
    ld->pin_s += took;
    pthread_mutex_unlock(&ld->lock);
    if (!err)
        ld->pinned[slot] = 1;
    return err;
}

/* Queue the copy of n bytes of a full slot to where they belong in the arena (or memcpy them). 0, or the
   runtime's error, with *code set to what failed (FT_EPIN or FT_ECUDA). */
static int copy_slot(struct ft_load *ld, int32_t slot, int32_t region, int64_t offset, int64_t n,
                     int *code) {
    const struct ft_region *r = &ld->regions[region];
    uint8_t *dst = ld->arena + r->arena_offset + (offset - r->file_start);
    uint8_t *src = ld->ring + (int64_t)slot * ld->slot_size;
    if (!ld->memcpy_async) {
        memcpy(dst, src, (size_t)n);
        return 0;
    }
    int err = pin_slot(ld, slot);
    *code = FT_EPIN;
    if (!err) {
        err = ld->memcpy_async(dst, src, (size_t)n, 1 /* host to device */, ld->stream);
        *code = FT_ECUDA;
    }
    return err;
}

/* Reader t: reads into slot t, copies it, then waits for the copy before reading into it again. */
static void *reader(void *arg) {
    struct ft_reader *me = arg;
    struct ft_load *ld = me->ld;
    int32_t slot = me->index;
    void *event = ld->event_record ? ld->events[slot] : NULL;
    if (ld->set_device)
        ld->set_device((int)ld->device); /* a new thread's runtime calls go to device 0 otherwise */
    pthread_mutex_lock(&ld->lock);
    int64_t region, offset, n;
    while (claim(ld, &region, &offset, &n)) {
        const struct ft_region *r = &ld->regions[region];
        pthread_mutex_unlock(&ld->lock);

        int64_t want = (n + FT_ALIGN - 1) / FT_ALIGN * FT_ALIGN;
        double began = now();
        int64_t got = read_full((int)r->fd, ld->ring + (int64_t)slot * ld->slot_size, want, offset);
        double ended = now();
        int err = 0, code = FT_ECUDA;
        if (got >= n) {
            err = copy_slot(ld, slot, (int32_t)region, offset, n, &code);
            if (!err && event) {
                err = ld->event_record(event, ld->stream);
                if (!err)
                    err = ld->event_sync(event); /* the slot is read into again next */
            }
        }

        pthread_mutex_lock(&ld->lock);
        note_read(ld, began, ended);
        if (got < 0) {
            fail(ld, FT_EREAD, -got, region);
            break;
        }
        if (got < n) {
            fail(ld, FT_ESHRANK, 0, region);
            break;
        }
        if (err) {
            ld->cuda_error = err;
            fail(ld, code, 0, -1);
            break;
        }
        ld->copies++;
    }
    ld->readers_running--;
    if (ld->readers_running == 0) {
        ld->done = 1; /* the last reader ends the load */
        pthread_cond_broadcast(&ld->done_cv);
    }
    pthread_mutex_unlock(&ld->lock);
    return NULL;
}

size_t ft_load_size(void) { return sizeof(struct ft_load); }

const char *ft_source_tag(void) { return FT_SOURCE_TAG; }

/* Start the readers; returns FT_OK, or an error with no reader started. */
int64_t ft_ring_start(struct ft_load *ld) {
    pthread_mutex_init(&ld->lock, NULL);
    pthread_cond_init(&ld->done_cv, NULL);
    if (ld->threads > ld->nslots)
        ld->threads = ld->nslots; /* one slot each */
    ld->readers = calloc((size_t)ld->threads, sizeof *ld->readers);
    ld->reader_args = calloc((size_t)ld->threads, sizeof *ld->reader_args);
    if (!ld->readers || !ld->reader_args) {
        ld->error = FT_ETHREAD;
        ld->err_errno = ENOMEM;
        ld->done = 1;
        return ld->error;
    }
    ld->region = 0;
    ld->pos = ld->nregions ? ld->regions[0].file_start : 0;
    skip_ended(ld);
    pthread_mutex_lock(&ld->lock); /* the readers start together, once all exist */
    int rc = 0;
    for (int64_t t = 0; rc == 0 && t < ld->threads; t++) {
        ld->reader_args[t].ld = ld;
        ld->reader_args[t].index = (int32_t)t;
        rc = pthread_create(&ld->readers[t], NULL, reader, &ld->reader_args[t]);
        if (rc == 0) {
            ld->started++;
            ld->readers_running++;
        }
    }
    if (rc != 0)
        fail(ld, FT_ETHREAD, rc, -1);
    if (ld->started == 0)
        ld->done = 1;
    pthread_mutex_unlock(&ld->lock);
    return FT_OK;
}

/* Wait up to ms milliseconds for the load to end; 1 when it has (then call ft_ring_finish). The caller
   waits in short steps, so that Python can take an interrupt between them. */
int64_t ft_ring_wait(struct ft_load *ld, int64_t ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&ld->lock);
    while (!ld->done) {
        if (pthread_cond_timedwait(&ld->done_cv, &ld->lock, &until) == ETIMEDOUT)
            break;
    }
    int64_t done = ld->done;
    pthread_mutex_unlock(&ld->lock);
    return done;
}

/* Ask every reader to stop after the slot it is in (a failed or interrupted load). */
void ft_ring_stop(struct ft_load *ld) {
    pthread_mutex_lock(&ld->lock);
    fail(ld, FT_ESTOPPED, 0, -1);
    pthread_mutex_unlock(&ld->lock);
}

/* Join the readers (on a GPU each has waited for its last copy, unless the runtime refused that copy's
   event), then free what start made. Returns the load's error code (FT_OK: every byte of every region
   is in the arena). */
int64_t ft_ring_finish(struct ft_load *ld) {
    for (int64_t t = 0; t < ld->started; t++)
        pthread_join(ld->readers[t], NULL);
    free(ld->readers);
    free(ld->reader_args);
    ld->readers = NULL;
    ld->reader_args = NULL;
    pthread_cond_destroy(&ld->done_cv);
    pthread_mutex_destroy(&ld->lock);
    return ld->error;
}
