/* Emulated grant table: see gnt_emu.h for what it enforces and why. */
#include "gnt_emu.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sched.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GTF_SUB_PAGE (1u << 8)
#define MAP_BUCKETS 256u
/* Copies are done in chunks: pins for a chunk are taken under the lock, the memcpys run unlocked (other
 * threads may copy meanwhile), then the pins are dropped under the lock again. */
#define COPY_CHUNK 64u

_Static_assert(sizeof(struct pv_gnt_emu_pintab) == 64, "the pin table header is one cache line");

struct emu_dom {
    uint32_t domid;
    int mem_fd;
    uint8_t *mem;
    uint64_t mem_pages;
    struct pv_grant_entry_v1 *gtab;
    size_t gtab_len;
    uint32_t nr_entries;
    struct pv_gnt_emu_pintab *pins; /* shared with the broker (or private memory without one) */
    size_t pins_len;
    int64_t mapped; /* pages */
    int64_t pinned; /* pins held */
    int claimed;    /* in the current batch's `struct claims` */
};

struct emu_map {
    struct emu_map *next;
    uint8_t *addr;
    uint32_t n;
    int writable;
    struct emu_dom *dom;
    uint32_t refs[];
};

struct gnt_emu {
    struct pv_gnt pub; /* first: the ops see a struct pv_gnt * */
    uint16_t self;
    pthread_mutex_t lock;
    struct emu_dom **doms;
    uint32_t ndoms, cap;
    struct emu_map *maps[MAP_BUCKETS];
};

static struct gnt_emu *to_emu(struct pv_gnt *g) { return (struct gnt_emu *)g; }

static struct emu_dom *find_dom(struct gnt_emu *e, uint32_t domid)
{
    for (uint32_t i = 0; i < e->ndoms; i++)
        if (e->doms[i]->domid == domid)
            return e->doms[i];
    return NULL;
}

static uint32_t *entry_word(struct emu_dom *d, uint32_t ref) { return (uint32_t *)(void *)&d->gtab[ref]; }

/* Counts are only written by this handle under its lock, but the broker reads them from another process:
 * single-copy atomic accesses, no ordering of their own. */
static uint32_t ld32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static void st32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* A full barrier right after an atomic read-modify-write: on x86 the locked instruction already is one
 * (Linux's smp_mb__after_atomic), so the fast path pays nothing for it. */
static void mb_after_rmw(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Xen's _set_status_v1: validate the entry and set reading (and writing) in one cmpxchg. */
static int entry_claim(struct gnt_emu *e, struct emu_dom *d, uint32_t ref, int fresh, int write, int mapflag)
{
    /* flags (low half) and domid (high half) read and updated as one word, so a guest racing a
     * revoke/regrant cannot make us pin an entry with a domid we never checked. */
    uint32_t *word = entry_word(d, ref);
    uint32_t cur = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    uint16_t mask = PV_GTF_type_mask | (mapflag ? GTF_SUB_PAGE : 0);
    for (int retries = 0;; retries++) {
        uint16_t flags = (uint16_t)cur, domid = (uint16_t)(cur >> 16);
        if (fresh && ((flags & mask) != PV_GTF_permit_access || domid != e->self))
            return PV_GNTST_general_error;
        uint32_t want = cur | PV_GTF_reading;
        if (write) {
            if (flags & PV_GTF_readonly)
                return PV_GNTST_general_error;
            want |= PV_GTF_writing;
        }
        if (__atomic_compare_exchange_n(word, &cur, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return PV_GNTST_okay;
        if (retries == 4) /* the guest keeps changing it under us */
            return PV_GNTST_general_error;
    }
}

/* The guests whose entries a batch (one copy chunk, one map) claimed from a zero count. */
struct claims {
    uint32_t n;
    struct emu_dom *d[2 * COPY_CHUNK];
};

/* Xen's _set_status_v1 + get_paged_frame, for a ref already checked to be in range. */
static int pin_acquire(struct gnt_emu *e, struct emu_dom *d, uint32_t ref, int write, int mapflag,
                       uint32_t *frame, struct claims *cl)
{
    struct pv_gnt_emu_pin *p = &d->pins->e[ref];
    uint32_t pin = ld32(&p->pin), wpin = ld32(&p->wpin);
    int fresh = pin == 0;
    /* Counts before bits: whatever this handle has set in the guest's entry has a count behind it that the
     * broker can see, even if the process dies right after the cmpxchg. */
    st32(&p->pin, pin + 1);
    if (write)
        st32(&p->wpin, wpin + 1);
    if (fresh || (write && wpin == 0)) {
        int rc = entry_claim(e, d, ref, fresh, write, mapflag);
        if (rc == PV_GNTST_okay && fresh) {
            uint32_t f = __atomic_load_n(&d->gtab[ref].frame, __ATOMIC_ACQUIRE);
            if (f >= d->mem_pages) {
                uint16_t clr = PV_GTF_reading | (write ? PV_GTF_writing : 0);
                __atomic_fetch_and(&d->gtab[ref].flags, (uint16_t)~clr, __ATOMIC_RELEASE);
                rc = PV_GNTST_bad_page;
            } else {
                p->frame = f;
            }
        }
        if (rc != PV_GNTST_okay) {
            st32(&p->pin, pin);
            if (write)
                st32(&p->wpin, wpin);
            return rc;
        }
        if (!d->claimed) {
            d->claimed = 1;
            cl->d[cl->n++] = d;
        }
    }
    d->pinned++;
    *frame = p->frame;
    return PV_GNTST_okay;
}

/* The broker is releasing a dead handle's pins of this guest: wait for it (microseconds: one C loop over a
 * table). */
static int wait_reaped(struct emu_dom *d)
{
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (__atomic_load_n(&d->pins->reaping, __ATOMIC_ACQUIRE)) {
        sched_yield();
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec > 5) /* a broker killed mid-release: the platform is gone anyway */
            return -1;
    }
    return 0;
}

/* After a batch of claims, once per batch rather than per claim (a load right after a locked instruction
 * is not free): each count store came before its cmpxchg, and this load after all of them; the broker
 * raises `reaping`, fences and loads our counts (Dekker), so at least one of us sees the other.  0: no
 * release overlapped.  1: one did and is over; it may have cleared a bit before it could see our count, so
 * the caller drops the batch's pins and claims again.  -1: it never ended. */
static int claims_settle(struct claims *cl)
{
    int rc = 0;
    if (cl->n == 0)
        return 0;
    mb_after_rmw();
    for (uint32_t i = 0; i < cl->n; i++) {
        struct emu_dom *d = cl->d[i];
        d->claimed = 0;
        if (__atomic_load_n(&d->pins->reaping, __ATOMIC_RELAXED) && rc >= 0)
            rc = wait_reaped(d) < 0 ? -1 : 1;
    }
    cl->n = 0;
    return rc;
}

static void pin_release(struct emu_dom *d, uint32_t ref, int write)
{
    struct pv_gnt_emu_pin *p = &d->pins->e[ref];
    uint32_t pin = ld32(&p->pin) - 1, wpin = ld32(&p->wpin) - (write ? 1 : 0);
    uint16_t clr = 0;
    if (write && wpin == 0)
        clr |= PV_GTF_writing;
    if (pin == 0)
        clr |= PV_GTF_reading;
    /* Bits before counts: dying in between leaves a count, and the broker clears the (already clear) bit. */
    if (clr)
        __atomic_fetch_and(&d->gtab[ref].flags, (uint16_t)~clr, __ATOMIC_RELEASE);
    st32(&p->pin, pin);
    if (write)
        st32(&p->wpin, wpin);
    d->pinned--;
}

/* One side of a copy segment: a local pointer, or a grant to pin. */
struct copy_side {
    struct emu_dom *dom; /* NULL: local pointer, nothing pinned */
    uint32_t ref;
    uint8_t *ptr;
};

static int side_claim(struct gnt_emu *e, const union pv_gcopy_ptr *p, int is_gref, int write, struct copy_side *s,
                      struct claims *cl)
{
    s->dom = NULL;
    if (!is_gref) {
        s->ptr = p->virt;
        return PV_GNTST_okay;
    }
    struct emu_dom *d = find_dom(e, p->foreign.domid);
    if (!d)
        return PV_GNTST_bad_domain;
    if (p->foreign.ref >= d->nr_entries)
        return PV_GNTST_bad_gntref;
    uint32_t frame;
    int rc = pin_acquire(e, d, p->foreign.ref, write, 0, &frame, cl);
    if (rc != PV_GNTST_okay)
        return rc;
    s->dom = d;
    s->ref = p->foreign.ref;
    s->ptr = d->mem + (uint64_t)frame * PV_PAGE_SIZE + p->foreign.offset;
    return PV_GNTST_okay;
}

static void side_release(struct copy_side *s, int write)
{
    if (s->dom)
        pin_release(s->dom, s->ref, write);
    s->dom = NULL;
}

static int emu_copy(struct pv_gnt *g, struct pv_gcopy_seg *segs, uint32_t n)
{
    struct gnt_emu *e = to_emu(g);
    struct copy_side src[COPY_CHUNK], dst[COPY_CHUNK];
    for (uint32_t base = 0; base < n; base += COPY_CHUNK) {
        uint32_t cnt = n - base < COPY_CHUNK ? n - base : COPY_CHUNK;
        struct claims cl;
        cl.n = 0;
        pthread_mutex_lock(&e->lock);
    claim:
        for (uint32_t i = 0; i < cnt; i++) {
            struct pv_gcopy_seg *s = &segs[base + i];
            int sg = (s->flags & PV_GCOPY_SOURCE_GREF) != 0, dg = (s->flags & PV_GCOPY_DEST_GREF) != 0;
            src[i].dom = dst[i].dom = NULL;
            src[i].ptr = dst[i].ptr = NULL;
            if (s->len == 0) { /* Xen: a zero-length copy succeeds without looking at anything */
                s->status = PV_GNTST_okay;
                continue;
            }
            /* Same order of checks as Xen's gnttab_copy_one: domains, source grant, dest grant, bounds. */
            int rc = PV_GNTST_okay;
            if ((sg && !find_dom(e, s->source.foreign.domid)) || (dg && !find_dom(e, s->dest.foreign.domid)))
                rc = PV_GNTST_bad_domain;
            if (rc == PV_GNTST_okay)
                rc = side_claim(e, &s->source, sg, 0, &src[i], &cl);
            if (rc == PV_GNTST_okay)
                rc = side_claim(e, &s->dest, dg, 1, &dst[i], &cl);
            if (rc == PV_GNTST_okay && ((sg && s->source.foreign.offset + (uint32_t)s->len > PV_PAGE_SIZE) ||
                                        (dg && s->dest.foreign.offset + (uint32_t)s->len > PV_PAGE_SIZE)))
                rc = PV_GNTST_bad_copy_arg;
            if (rc != PV_GNTST_okay) {
                side_release(&src[i], 0);
                side_release(&dst[i], 1);
                src[i].ptr = dst[i].ptr = NULL;
            }
            s->status = (int16_t)rc;
        }
        int settled = claims_settle(&cl);
        if (settled) {
            for (uint32_t i = 0; i < cnt; i++) {
                side_release(&src[i], 0);
                side_release(&dst[i], 1);
                if (settled < 0 && src[i].ptr && dst[i].ptr)
                    segs[base + i].status = PV_GNTST_general_error;
                src[i].ptr = dst[i].ptr = NULL;
            }
            if (settled > 0)
                goto claim;
        }
        pthread_mutex_unlock(&e->lock);
        for (uint32_t i = 0; i < cnt; i++)
            if (src[i].ptr && dst[i].ptr)
                memmove(dst[i].ptr, src[i].ptr, segs[base + i].len);
        pthread_mutex_lock(&e->lock);
        for (uint32_t i = 0; i < cnt; i++) {
            side_release(&src[i], 0);
            side_release(&dst[i], 1);
        }
        pthread_mutex_unlock(&e->lock);
    }
    return 0;
}

static void unpin_refs(struct emu_dom *d, const uint32_t *refs, uint32_t n, int write)
{
    for (uint32_t i = 0; i < n; i++)
        pin_release(d, refs[i], write);
}

static unsigned bucket(const void *addr) { return (unsigned)(((uintptr_t)addr >> 12) % MAP_BUCKETS); }

static void *emu_map(struct pv_gnt *g, uint32_t domid, const uint32_t *refs, uint32_t n, int writable,
                     int16_t *status)
{
    struct gnt_emu *e = to_emu(g);
    int w = writable != 0;
    *status = PV_GNTST_general_error;
    if (n == 0 || n > (1u << 20))
        return NULL;
    struct emu_map *m = malloc(sizeof(*m) + (size_t)n * sizeof(uint32_t));
    uint32_t *frames = malloc((size_t)n * sizeof(uint32_t));
    if (!m || !frames) {
        free(m);
        free(frames);
        *status = PV_GNTST_no_space;
        return NULL;
    }
    struct claims cl;
    cl.n = 0;
    pthread_mutex_lock(&e->lock);
    struct emu_dom *d = find_dom(e, domid);
    uint32_t got;
    int rc;
claim:
    got = 0;
    rc = d ? PV_GNTST_okay : PV_GNTST_bad_domain;
    for (; rc == PV_GNTST_okay && got < n; got++) {
        uint32_t ref = refs[got];
        if (ref >= d->nr_entries) {
            rc = PV_GNTST_bad_gntref;
            break;
        }
        rc = pin_acquire(e, d, ref, w, 1, &frames[got], &cl);
        if (rc != PV_GNTST_okay)
            break;
        m->refs[got] = ref;
    }
    int settled = claims_settle(&cl);
    if (settled && rc == PV_GNTST_okay) {
        unpin_refs(d, m->refs, got, w);
        if (settled > 0)
            goto claim;
        got = 0;
        rc = PV_GNTST_general_error;
    }
    uint8_t *addr = MAP_FAILED;
    if (rc == PV_GNTST_okay) {
        /* One reserved range, then each frame MAP_FIXED over it: a contiguous view of scattered guest
         * pages, with the MMU enforcing read-only. */
        size_t len = (size_t)n * PV_PAGE_SIZE;
        addr = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        int prot = PROT_READ | (w ? PROT_WRITE : 0);
        for (uint32_t i = 0; addr != MAP_FAILED && i < n; i++) {
            void *p = mmap(addr + (size_t)i * PV_PAGE_SIZE, PV_PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, d->mem_fd,
                           (off_t)frames[i] * PV_PAGE_SIZE);
            if (p == MAP_FAILED) {
                munmap(addr, len);
                addr = MAP_FAILED;
            }
        }
        if (addr == MAP_FAILED)
            rc = PV_GNTST_no_space;
    }
    if (rc != PV_GNTST_okay) {
        if (d)
            unpin_refs(d, m->refs, got, w);
        pthread_mutex_unlock(&e->lock);
        free(m);
        free(frames);
        *status = (int16_t)rc;
        return NULL;
    }
    m->addr = addr;
    m->n = n;
    m->writable = w;
    m->dom = d;
    unsigned b = bucket(addr);
    m->next = e->maps[b];
    e->maps[b] = m;
    d->mapped += n;
    e->pub.live_mappings += n;
    pthread_mutex_unlock(&e->lock);
    free(frames);
    *status = PV_GNTST_okay;
    return addr;
}

static void drop_map(struct gnt_emu *e, struct emu_map *m)
{
    munmap(m->addr, (size_t)m->n * PV_PAGE_SIZE);
    unpin_refs(m->dom, m->refs, m->n, m->writable);
    m->dom->mapped -= m->n;
    e->pub.live_mappings -= m->n;
    free(m);
}

static int emu_unmap(struct pv_gnt *g, void *addr, uint32_t n)
{
    struct gnt_emu *e = to_emu(g);
    pthread_mutex_lock(&e->lock);
    struct emu_map **pp = &e->maps[bucket(addr)];
    while (*pp && (*pp)->addr != addr)
        pp = &(*pp)->next;
    struct emu_map *m = *pp;
    if (!m || m->n != n) {
        pthread_mutex_unlock(&e->lock);
        return -EINVAL;
    }
    *pp = m->next;
    drop_map(e, m);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

static void free_dom(struct emu_dom *d)
{
    munmap(d->mem, d->mem_pages * PV_PAGE_SIZE);
    munmap(d->gtab, d->gtab_len);
    close(d->mem_fd);
    munmap(d->pins, d->pins_len);
    free(d);
}

static void emu_close(struct pv_gnt *g)
{
    struct gnt_emu *e = to_emu(g);
    for (unsigned b = 0; b < MAP_BUCKETS; b++)
        while (e->maps[b]) {
            struct emu_map *m = e->maps[b];
            e->maps[b] = m->next;
            drop_map(e, m);
        }
    for (uint32_t i = 0; i < e->ndoms; i++)
        free_dom(e->doms[i]);
    free(e->doms);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

static const struct pv_gnt_ops emu_ops = {
    .copy = emu_copy,
    .map = emu_map,
    .unmap = emu_unmap,
    .close = emu_close,
};

struct pv_gnt *pv_gnt_emu_open(uint16_t self_domid)
{
    struct gnt_emu *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->pub.ops = &emu_ops;
    e->pub.mappings_pinnable = 1; /* the guest's memfd pages, mapped shared: shmem */
    e->self = self_domid;
    pthread_mutex_init(&e->lock, NULL);
    return &e->pub;
}

/* The guest owns the memfds: unless they are sealed against shrinking, it could truncate them and make
 * every backend access SIGBUS. */
static int check_fd(int fd, uint64_t need)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if ((uint64_t)st.st_size < need)
        return -EINVAL;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
        return -EPERM;
    return 0;
}

uint64_t pv_gnt_emu_pintab_size(uint32_t nr_entries)
{
    return sizeof(struct pv_gnt_emu_pintab) + (uint64_t)nr_entries * sizeof(struct pv_gnt_emu_pin);
}

int pv_gnt_emu_attach(struct pv_gnt *g, uint32_t domid, int mem_fd, uint64_t mem_pages, int gtab_fd,
                      uint32_t nr_entries, int pin_fd)
{
    struct gnt_emu *e = to_emu(g);
    if (mem_pages == 0 || mem_pages > (1ull << 32) || nr_entries == 0 || domid > 0xffff)
        return -EINVAL;
    size_t gtab_len = ((size_t)nr_entries * sizeof(struct pv_grant_entry_v1) + PV_PAGE_SIZE - 1) &
                      ~(size_t)(PV_PAGE_SIZE - 1);
    int rc = check_fd(mem_fd, mem_pages * PV_PAGE_SIZE);
    if (rc == 0)
        rc = check_fd(gtab_fd, (uint64_t)nr_entries * sizeof(struct pv_grant_entry_v1));
    if (rc == 0 && pin_fd >= 0)
        rc = check_fd(pin_fd, pv_gnt_emu_pintab_size(nr_entries));
    if (rc)
        return rc;
    struct emu_dom *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->domid = domid;
    d->mem_pages = mem_pages;
    d->nr_entries = nr_entries;
    d->gtab_len = gtab_len;
    d->mem_fd = fcntl(mem_fd, F_DUPFD_CLOEXEC, 3);
    d->pins_len = pv_gnt_emu_pintab_size(nr_entries);
    d->pins = pin_fd >= 0 ? mmap(NULL, d->pins_len, PROT_READ | PROT_WRITE, MAP_SHARED, pin_fd, 0)
                          : mmap(NULL, d->pins_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    d->mem = mmap(NULL, mem_pages * PV_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    d->gtab = mmap(NULL, gtab_len, PROT_READ | PROT_WRITE, MAP_SHARED, gtab_fd, 0);
    if (d->mem_fd < 0 || d->pins == MAP_FAILED || d->mem == MAP_FAILED || d->gtab == MAP_FAILED) {
        rc = -errno;
        if (d->pins != MAP_FAILED)
            munmap(d->pins, d->pins_len);
        if (d->mem != MAP_FAILED)
            munmap(d->mem, mem_pages * PV_PAGE_SIZE);
        if (d->gtab != MAP_FAILED)
            munmap(d->gtab, gtab_len);
        if (d->mem_fd >= 0)
            close(d->mem_fd);
        free(d);
        return rc ? rc : -ENOMEM;
    }
    pthread_mutex_lock(&e->lock);
    if (find_dom(e, domid)) {
        rc = -EEXIST;
    } else if (e->ndoms == e->cap) {
        uint32_t cap = e->cap ? e->cap * 2 : 8;
        struct emu_dom **nd = realloc(e->doms, cap * sizeof(*nd));
        if (!nd)
            rc = -ENOMEM;
        else {
            e->doms = nd;
            e->cap = cap;
        }
    }
    if (rc == 0)
        e->doms[e->ndoms++] = d;
    pthread_mutex_unlock(&e->lock);
    if (rc)
        free_dom(d);
    return rc;
}

int pv_gnt_emu_detach(struct pv_gnt *g, uint32_t domid)
{
    struct gnt_emu *e = to_emu(g);
    pthread_mutex_lock(&e->lock);
    for (uint32_t i = 0; i < e->ndoms; i++) {
        struct emu_dom *d = e->doms[i];
        if (d->domid != domid)
            continue;
        if (d->mapped || d->pinned) {
            pthread_mutex_unlock(&e->lock);
            return -EBUSY;
        }
        e->doms[i] = e->doms[--e->ndoms];
        pthread_mutex_unlock(&e->lock);
        free_dom(d);
        return 0;
    }
    pthread_mutex_unlock(&e->lock);
    return -ENOENT;
}

int64_t pv_gnt_emu_pinned(struct pv_gnt *g, uint32_t domid)
{
    struct gnt_emu *e = to_emu(g);
    pthread_mutex_lock(&e->lock);
    struct emu_dom *d = find_dom(e, domid);
    int64_t n = d ? d->pinned : -1;
    pthread_mutex_unlock(&e->lock);
    return n;
}

int pv_gnt_emu_grant(void *gtab, uint32_t nr_entries, uint32_t ref, uint16_t domid, uint32_t frame, int readonly)
{
    if (ref >= nr_entries)
        return -EINVAL;
    struct pv_grant_entry_v1 *ent = (struct pv_grant_entry_v1 *)gtab + ref;
    if (__atomic_load_n(&ent->flags, __ATOMIC_ACQUIRE) & (PV_GTF_type_mask | PV_GTF_reading | PV_GTF_writing))
        return -EBUSY;
    __atomic_store_n(&ent->domid, domid, __ATOMIC_RELAXED);
    __atomic_store_n(&ent->frame, frame, __ATOMIC_RELAXED);
    /* The backend must never see permit_access with a stale domid/frame. */
    __atomic_store_n(&ent->flags, (uint16_t)(PV_GTF_permit_access | (readonly ? PV_GTF_readonly : 0)),
                     __ATOMIC_RELEASE);
    return 0;
}

int pv_gnt_emu_revoke(void *gtab, uint32_t nr_entries, uint32_t ref)
{
    if (ref >= nr_entries)
        return -EINVAL;
    struct pv_grant_entry_v1 *ent = (struct pv_grant_entry_v1 *)gtab + ref;
    uint16_t cur = __atomic_load_n(&ent->flags, __ATOMIC_ACQUIRE);
    for (;;) {
        if (cur & (PV_GTF_reading | PV_GTF_writing))
            return -EBUSY;
        /* cmpxchg, not a store: the backend may set reading/writing between our load and the clear. */
        if (__atomic_compare_exchange_n(&ent->flags, &cur, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 0;
    }
}

int64_t pv_gnt_emu_release_pins(void *gtab, uint32_t nr_entries, void *dead_tab, void *const *others,
                                uint32_t n_other)
{
    struct pv_grant_entry_v1 *gt = gtab;
    struct pv_gnt_emu_pintab *dead = dead_tab;
    /* Raise `reaping` in every live table, then fence, then read their counts: a live handle that set a
     * bit without our seeing its count sees `reaping` and claims the entry again once we are done. */
    for (uint32_t i = 0; i < n_other; i++)
        __atomic_fetch_add(&((struct pv_gnt_emu_pintab *)others[i])->reaping, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t released = 0;
    for (uint32_t ref = 0; ref < nr_entries; ref++) {
        struct pv_gnt_emu_pin *p = &dead->e[ref];
        uint32_t pin = ld32(&p->pin), wpin = ld32(&p->wpin);
        if (!pin && !wpin)
            continue;
        released++;
        uint32_t clr = (pin ? PV_GTF_reading : 0) | (wpin ? PV_GTF_writing : 0);
        for (uint32_t i = 0; i < n_other && clr; i++) {
            struct pv_gnt_emu_pin *q = &((struct pv_gnt_emu_pintab *)others[i])->e[ref];
            if (ld32(&q->pin))
                clr &= ~(uint32_t)PV_GTF_reading;
            if (ld32(&q->wpin))
                clr &= ~(uint32_t)PV_GTF_writing;
        }
        if (clr) {
            /* The guest may be editing the entry (or trying to revoke it) right now: same cmpxchg on the
             * whole word as the handles use, never a plain store. */
            uint32_t *word = (uint32_t *)(void *)&gt[ref];
            uint32_t cur = __atomic_load_n(word, __ATOMIC_ACQUIRE);
            while ((cur & clr) &&
                   !__atomic_compare_exchange_n(word, &cur, cur & ~clr, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                ;
        }
        st32(&p->pin, 0);
        st32(&p->wpin, 0);
        st32(&p->frame, 0);
    }
    for (uint32_t i = 0; i < n_other; i++)
        __atomic_fetch_sub(&((struct pv_gnt_emu_pintab *)others[i])->reaping, 1, __ATOMIC_RELEASE);
    return released;
}
