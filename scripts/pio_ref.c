/*
 * pio_ref: the C reference loops of scripts/bench (rows 1 and 2). Built at bench time
 * with `cc -O2`; needs only <linux/kvm.h>.
 *
 * Sets up one vCPU per VM (1 or 2 VMs over the same memory, like pykvmm's multivm planes)
 * whose guest runs guest/pio_loop's loop (`out PORT, al; dec rcx; jnz`; real mode: the
 * 16-bit equivalent) practically forever, and times batches of N KVM_RUN round
 * trips with clock_gettime(CLOCK_MONOTONIC). Per exit it checks the exit reason and port
 * and nothing else: the floor any VMM pays for that exit.
 *
 *   pio_ref [-m real|long] [-i] [-s MASK] [-v VMS] [-c] [-g IOCTLS] [-r REPEATS] [-p PORT] N
 *   pio_ref -i -k [-K US] [-H] N
 *     -m   guest mode: real (16-bit, no setup at all) or long (64-bit, identity-mapped
 *          2 MiB pages, flat GDT, as pykvmm enters its guests). Default long.
 *     -i   create the in-kernel irqchip (pykvmm always does).
 *     -s   kvm_valid_regs (KVM_SYNC_X86_*: 1 regs, 2 sregs, 4 events) as pykvmm asks for.
 *     -v   2: two VMs (same memory), KVM_RUN alternates between their vCPUs: the kernel
 *          cost of a multivm plane switch (a round trip = 2 exits). Default 1.
 *     -c   the guest makes each exit from a `call`ed stub (`out; ret`), as pykvmm's
 *          hypercall page does, instead of an inline `out`.
 *     -n   NOPS extra `nop`s in the loop (0..4096): the cost of guest instructions between
 *          exits (~0.7 us each on the kvm_pvm host: it emulates them).
 *     -g   extra ioctls after every exit, in order, each a letter: l KVM_GET_LAPIC of the
 *          other VM's vCPU (an IRR scan), d KVM_GET_DEBUGREGS, x KVM_GET_XSAVE, D set
 *          kvm_dirty_regs = KVM_SYNC_X86_REGS (registers written back by the next KVM_RUN).
 *     -r   batches (default 5). N: KVM_RUNs per batch.
 *     -k   kick latency instead (N rounds; the floor of a host-delivered cross-plane IPI into
 *          an inactive plane): thread B runs VM 1's vCPU, whose guest spins (`jmp $`), inside
 *          KVM_RUN; thread A waits a pseudo-random 0..-K microseconds, takes t0, sets B's
 *          immediate_exit and sends it SIGUSR1 (pykvmm's kick); B's KVM_RUN returns EINTR, B
 *          runs VM 2's vCPU (the "other plane"), whose guest exits at once with `out`, takes
 *          t1, and goes back to spinning. Prints percentiles of t1 - t0.
 *     -K   the longest random wait between kicks, microseconds (default 500).
 *     -H   with -k: B's guest is halted (`cli; hlt`, needs -i) instead of spinning, so each kick
 *          must wake a sleeping thread (a halted receiver, as in guest/vtl_pingpong).
 *
 * Prints one JSON object: {"n": N, ..., "setup_s": s, "batches_us_per_exit": [...]} (or,
 * with -k, {"kick_latency_us": {"p50": .., "p90": .., "p99": .., "min": .., "max": ..}}).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4u << 20)
#define CODE_ADDR 0x100000u     /* long mode: pykvmm's load address */
#define STUB_ADDR 0x4000u       /* long mode, -c: pykvmm's hypercall page */
#define SPIN_ADDR 0x100800u     /* long mode, -k: the spinning guest */
#define HALT_ADDR 0x100810u     /* long mode, -k -H: the halted guest */
#define REAL_CODE 0x1000u
#define GDT  0x1000u
#define PML4 0x10000u
#define PDPT 0x11000u
#define PD   0x12000u

struct vcpu {
    int vm, fd;
    struct kvm_run *run;
};

static int kvm, longmode = 1, irqchip, port = 0xEB, use_call, nops;
static unsigned sync_mask;
static uint8_t *mem;
static struct kvm_cpuid2 *cpuid;

static void die(const char *what) { fprintf(stderr, "pio_ref: %s: %s\n", what, strerror(errno)); exit(1); }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code)
{
    memset(s, 0, sizeof(*s));
    s->limit = 0xffffffff; s->selector = sel; s->type = type;
    s->present = 1; s->s = 1; s->g = 1; s->l = code; s->db = !code;
}

static void setup_memory(void)
{
    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    /* The loop of guest/pio_loop: `out PORT, al; dec rcx; jnz` (every guest instruction
     * counts: on the kvm_pvm host each one costs ~0.7 us, see -n). */
    uint8_t code[64 + 4096], *p = code;
    if (!longmode) {
        *p++ = 0x66; *p++ = 0xB9; memset(p, 0xFF, 4); p[3] = 0x3F; p += 4;   /* mov ecx, 0x3fffffff */
    } else {
        if (use_call) {
            *p++ = 0xBB; *p++ = STUB_ADDR & 0xFF; *p++ = STUB_ADDR >> 8 & 0xFF; /* mov ebx, STUB */
            *p++ = STUB_ADDR >> 16 & 0xFF; *p++ = 0;
        }
        *p++ = 0x48; *p++ = 0xB9; memset(p, 0xFF, 8); p[7] = 0x3F; p += 8;   /* mov rcx, 0x3fff... */
    }
    uint8_t *loop = p;
    memset(p, 0x90, nops);                                                  /* -n: nops */
    p += nops;
    if (use_call) {
        *p++ = 0xFF; *p++ = 0xD3;                                           /* call rbx (out; ret) */
    } else {
        *p++ = 0xE6; *p++ = (uint8_t)port;                                  /* out PORT, al */
    }
    if (longmode)
        *p++ = 0x48;
    else
        *p++ = 0x66;
    if (longmode) {
        *p++ = 0xFF; *p++ = 0xC9;                                           /* dec rcx */
    } else {
        *p++ = 0x49;                                                        /* dec ecx */
    }
    if (longmode) {
        long rel = loop - (p + 6);
        *p++ = 0x0F; *p++ = 0x85;                                           /* jnz loop (rel32) */
        memcpy(p, &(int32_t){ (int32_t)rel }, 4);
        p += 4;
    } else {
        *p++ = 0x75; *p = (uint8_t)(int8_t)(loop - (p + 1)); p++;          /* jnz loop (rel8) */
    }
    *p++ = 0xF4;                                                            /* hlt (never reached) */
    memcpy(mem + (longmode ? CODE_ADDR : REAL_CODE), code, p - code);
    if (!longmode)
        return;
    uint8_t stub[] = { 0xE6, (uint8_t)port, 0xC3 };                         /* -c: out; ret */
    memcpy(mem + STUB_ADDR, stub, sizeof(stub));
    uint8_t spin[] = { 0xEB, 0xFE };                                       /* -k: jmp $ */
    memcpy(mem + SPIN_ADDR, spin, sizeof(spin));
    uint8_t halt[] = { 0xFA, 0xF4, 0xEB, 0xFD };                           /* -k -H: cli; 1: hlt; jmp 1b */
    memcpy(mem + HALT_ADDR, halt, sizeof(halt));
    uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT), *pd = (uint64_t *)(mem + PD);
    pml4[0] = PDPT | 3;
    pdpt[0] = PD | 3;
    for (unsigned i = 0; i < MEM_SIZE >> 21; i++)
        pd[i] = ((uint64_t)i << 21) | 0x83;                                 /* present, writable, 2 MiB */
    uint64_t *gdt = (uint64_t *)(mem + GDT);
    gdt[1] = 0x00AF9A000000FFFFull;                                        /* code64 */
    gdt[2] = 0x00CF92000000FFFFull;                                        /* data */
}

static struct vcpu make_vcpu(void)
{
    struct vcpu v;
    v.vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (v.vm < 0) die("KVM_CREATE_VM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem };
    if (ioctl(v.vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    if (irqchip && ioctl(v.vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    v.fd = ioctl(v.vm, KVM_CREATE_VCPU, 0);
    if (v.fd < 0) die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v.run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
    if (v.run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs sregs;
    struct kvm_regs regs;
    if (ioctl(v.fd, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    memset(&regs, 0, sizeof(regs));
    regs.rflags = 2;
    if (longmode) {
        if (ioctl(v.fd, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
        sregs.gdt.base = GDT; sregs.gdt.limit = 3 * 8 - 1;
        seg(&sregs.cs, 0x08, 0xB, 1);
        seg(&sregs.ds, 0x10, 0x3, 0);
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        sregs.cr3 = PML4;
        sregs.cr4 = 1u << 5;                                               /* PAE */
        sregs.cr0 = 0x80000001u | (1u << 4) | (1u << 5);                   /* PG, PE, ET, NE */
        sregs.efer = (1u << 8) | (1u << 10);                               /* LME, LMA */
        regs.rip = CODE_ADDR;
        regs.rsp = 0x200000;
    } else {
        sregs.cs.base = 0; sregs.cs.selector = 0;
        regs.rip = REAL_CODE;
    }
    if (ioctl(v.fd, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    if (ioctl(v.fd, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    v.run->kvm_valid_regs = sync_mask;
    return v;
}

static struct kvm_lapic_state lapic;
static struct kvm_debugregs dregs;
static struct kvm_xsave xsave;

static inline void one_exit(struct vcpu *v, struct vcpu *other, const char *extra)
{
    if (ioctl(v->fd, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (v->run->exit_reason != KVM_EXIT_IO || v->run->io.port != port) {
        struct kvm_regs r; ioctl(v->fd, KVM_GET_REGS, &r);
        fprintf(stderr, "pio_ref: unexpected exit %u (rip %#llx rsp %#llx)\n", v->run->exit_reason, (unsigned long long)r.rip, (unsigned long long)r.rsp);
        exit(1);
    }
    for (const char *e = extra; *e; e++) {
        switch (*e) {
        case 'l': if (ioctl(other->fd, KVM_GET_LAPIC, &lapic) < 0) die("KVM_GET_LAPIC"); break;
        case 'd': if (ioctl(v->fd, KVM_GET_DEBUGREGS, &dregs) < 0) die("KVM_GET_DEBUGREGS"); break;
        case 'x': if (ioctl(v->fd, KVM_GET_XSAVE, &xsave) < 0) die("KVM_GET_XSAVE"); break;
        case 'D': v->run->kvm_dirty_regs = KVM_SYNC_X86_REGS; break;
        }
    }
}

/* ---- -k: kick latency ------------------------------------------------------------------------ */

static struct vcpu kv[2];
static atomic_int k_state;               /* 0 B spinning or about to, 1 kicked, 2 B done with the round, 3 stop */
static pthread_t k_thread_b;
static double *k_lat;

static void on_kick(int sig) { (void)sig; }

static void *kick_thread_b(void *arg)
{
    long n = (long)arg;
    (void)n;
    for (;;) {
        int r = ioctl(kv[0].fd, KVM_RUN, 0);                 /* spins (or halts) in the guest until kicked */
        if (r < 0 && errno != EINTR && errno != EAGAIN) die("KVM_RUN (spin)");
        kv[0].run->immediate_exit = 0;
        if (atomic_load(&k_state) == 3)
            return NULL;
        if (r == 0) {                                         /* an exit of its own (none expected) */
            continue;
        }
        if (ioctl(kv[1].fd, KVM_RUN, 0) < 0) die("KVM_RUN (other)");
        if (kv[1].run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "pio_ref: unexpected exit\n"); exit(1); }
        atomic_store(&k_state, 2);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long n, double q)
{
    long k = (long)(q / 100 * n + 0.5) - 1;
    if (k < 0) k = 0;
    if (k >= n) k = n - 1;
    return v[k];
}

static int kick_latency(long n, int max_wait_us, int halted)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_kick;                                  /* no SA_RESTART: KVM_RUN returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    struct kvm_regs regs;
    if (ioctl(kv[0].fd, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
    regs.rip = halted ? HALT_ADDR : SPIN_ADDR;
    if (ioctl(kv[0].fd, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    k_lat = calloc(n, sizeof(double));
    pthread_create(&k_thread_b, NULL, kick_thread_b, (void *)n);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    struct timespec pause = { 0, 2000000 };
    nanosleep(&pause, NULL);                                  /* B is in KVM_RUN */
    for (long i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        double wait = (double)((x >> 33) % (uint64_t)(max_wait_us + 1)) * 1e-6;
        double until = now() + wait;
        while (now() < until)
            ;
        atomic_store(&k_state, 1);
        double t0 = now();
        kv[0].run->immediate_exit = 1;
        pthread_kill(k_thread_b, SIGUSR1);
        while (atomic_load(&k_state) != 2)
            ;
        k_lat[i] = (now() - t0) * 1e6;
        atomic_store(&k_state, 0);
    }
    atomic_store(&k_state, 3);
    kv[0].run->immediate_exit = 1;
    pthread_kill(k_thread_b, SIGUSR1);
    pthread_join(k_thread_b, NULL);
    qsort(k_lat, n, sizeof(double), cmp_double);
    printf("{\"n\": %ld, \"max_wait_us\": %d, \"kick_latency_us\": {\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, "
           "\"min\": %.2f, \"max\": %.2f}}\n", n, max_wait_us, pct(k_lat, n, 50), pct(k_lat, n, 90),
           pct(k_lat, n, 99), k_lat[0], k_lat[n - 1]);
    return 0;
}

int main(int argc, char **argv)
{
    int repeats = 5, vms = 1, kick = 0, halted = 0, max_wait_us = 500, opt;
    const char *extra = "";
    while ((opt = getopt(argc, argv, "m:is:v:cg:r:p:kK:n:H")) != -1) {
        switch (opt) {
        case 'm': longmode = strcmp(optarg, "real") != 0; break;
        case 'i': irqchip = 1; break;
        case 's': sync_mask = (unsigned)strtoul(optarg, NULL, 0) & 7; break;
        case 'v': vms = atoi(optarg); break;
        case 'c': use_call = 1; break;
        case 'g': extra = optarg; break;
        case 'r': repeats = atoi(optarg); break;
        case 'p': port = (int)strtol(optarg, NULL, 0); break;
        case 'k': kick = 1; break;
        case 'H': halted = 1; break;
        case 'K': max_wait_us = atoi(optarg); break;
        case 'n': nops = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: pio_ref [-m real|long] [-i] [-s MASK] [-v 1|2] [-c] [-g ldxD] [-n NOPS] [-r N] [-p PORT] [-k [-K US] [-H]] N\n");
            return 2;
        }
    }
    if (optind >= argc) { fprintf(stderr, "pio_ref: N missing\n"); return 2; }
    long n = atol(argv[optind]);
    if (kick)
        vms = 2, longmode = 1;
    if (repeats < 1 || repeats > 1000 || n < 1 || vms < 1 || vms > 2 || (use_call && !longmode) || max_wait_us < 0 || (halted && (!kick || !irqchip)) || nops < 0 || nops > 4096
        || (!longmode && (nops > 64 || use_call))) {
        fprintf(stderr, "pio_ref: bad arguments\n");
        return 2;
    }
    if (vms == 2)
        n += n & 1;

    double t_start = now();
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int nent = 256;
    cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    if (longmode && ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    setup_memory();
    struct vcpu v[2];
    v[0] = make_vcpu();
    v[1] = vms == 2 ? make_vcpu() : v[0];
    double t_ready = now();
    if (kick) {
        kv[0] = v[0];
        kv[1] = v[1];
        return kick_latency(n, max_wait_us, halted);
    }

    for (int i = 0; i < 1000; i++)                                          /* warm up */
        one_exit(&v[i & 1], &v[!(i & 1)], extra);
    printf("{\"mode\": \"%s\", \"irqchip\": %d, \"sync_regs\": %u, \"vms\": %d, \"call\": %d, \"extra\": \"%s\", "
           "\"nops\": %d, \"n\": %ld, \"setup_s\": %.6f, \"batches_us_per_exit\": [",
           longmode ? "long" : "real", irqchip, sync_mask, vms, use_call, extra, nops, n, t_ready - t_start);
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        for (long i = 0; i < n; i++)
            one_exit(&v[i & 1], &v[!(i & 1)], extra);
        double t1 = now();
        printf("%s%.4f", r ? ", " : "", (t1 - t0) / n * 1e6);
        fflush(stdout);
    }
    printf("]}\n");
    return 0;
}
