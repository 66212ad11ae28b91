/*
 * pykvmm's exit fast path: KVM_RUN in a loop that answers, without returning to Python, the
 * exits whose answer is pure and table-driven (pykvmm/fastexit.py says which and why).
 *
 * An exit to userspace costs ~8 us on the development host in any VMM; Python's exit path
 * adds 5-8 us more, C well under one. Python fills the table; this loop only reads it.
 * Everything it does not recognise returns to Python exactly as a plain KVM_RUN would, with
 * kvm_run holding that exit.
 *
 * FASTEXIT_RULES, FASTEXIT_PLANES, HVCALL_VTL_CALL, HVCALL_VTL_RETURN and ENTRY_VTL_CALL are
 * defined by fastexit.py (C_FACTS) from pykvmm's own constants before this text.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>


enum { RULE_NONE, RULE_CLOCK_READ, RULE_COUNT_WRITE };
enum { SPACE_PORT, SPACE_MMIO };

/* absent[port]: what the port bus answers for a port nobody owns (reads all ones, writes
 * dropped); Python sets a bit after it answered that port itself once (and warned). */
#define ABSENT_READ 1
#define ABSENT_WRITE 2

struct fastexit_rule {
    uint32_t kind;          /* RULE_*: Python stores it last, this loop loads it first */
    uint32_t space;         /* SPACE_* */
    uint64_t addr;          /* port or guest-physical address */
    uint32_t size;          /* the one access width answered here; other widths go to Python */
    int32_t match;          /* RULE_COUNT_WRITE: the byte that counts (-1: any); others are dropped */
    uint32_t *counter;      /* RULE_COUNT_WRITE: owned by the Python device, which reads it */
    /* RULE_CLOCK_READ: ((CLOCK_MONOTONIC ns - epoch_ns) * hz / 1e9) & mask, little-endian */
    int64_t epoch_ns;
    uint64_t hz;
    uint64_t mask;
};

struct fastexit_table {
    uint8_t absent[65536];
    struct fastexit_rule rules[FASTEXIT_RULES];
};

/* The clock formula, split at whole seconds: elapsed_ns * hz overflows 64 bits after
 * 2^64 / 3.58e6 ns (85 minutes) at the PM timer's rate. Exact: the same floor as Python's. */
uint64_t fastexit_clock_value(const struct fastexit_rule *rule, int64_t now_ns)
{
    uint64_t elapsed = (uint64_t)(now_ns - rule->epoch_ns);
    uint64_t seconds = elapsed / 1000000000u, rest = elapsed % 1000000000u;
    return (seconds * rule->hz + rest * rule->hz / 1000000000u) & rule->mask;
}

/* The device's own (Python) path adds with this too when the library is loaded: a C
 * increment on one vCPU and a Python one on another must not lose a count. */
void fastexit_count_add(uint32_t *counter)
{
    __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

static int apply_rules(const struct fastexit_table *t, uint32_t space, uint64_t addr,
                       uint32_t size, int is_read, uint8_t *data)
{
    for (int i = 0; i < FASTEXIT_RULES; i++) {
        const struct fastexit_rule *r = &t->rules[i];
        uint32_t kind = __atomic_load_n(&r->kind, __ATOMIC_ACQUIRE);
        if (kind == RULE_NONE || r->space != space || r->addr != addr || r->size != size)
            continue;
        if (kind == RULE_CLOCK_READ && is_read && size <= 8) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            uint64_t value = fastexit_clock_value(r, (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
            memcpy(data, &value, size);             /* x86: little-endian, as the guest reads */
            return 1;
        }
        if (kind == RULE_COUNT_WRITE && !is_read) {
            if (r->match < 0 || data[0] == (uint8_t)r->match)
                fastexit_count_add(r->counter);
            return 1;
        }
        return 0;               /* the rule's address, the other direction: Python's */
    }
    return 0;
}

/* 1 if the exit in `run` was answered here (the next KVM_RUN completes it), 0 for Python. */
static int handle(const struct fastexit_table *t, struct kvm_run *run)
{
    if (run->exit_reason == KVM_EXIT_IO) {
        if (run->io.count != 1)         /* `rep ins/outs`: Python's string path */
            return 0;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        int is_read = run->io.direction == KVM_EXIT_IO_IN;
        uint8_t absent = __atomic_load_n(&t->absent[run->io.port], __ATOMIC_RELAXED);
        if (absent & (is_read ? ABSENT_READ : ABSENT_WRITE)) {
            if (is_read)
                memset(data, 0xff, run->io.size);
            return 1;
        }
        return apply_rules(t, SPACE_PORT, run->io.port, run->io.size, is_read, data);
    }
    if (run->exit_reason == KVM_EXIT_MMIO)
        return apply_rules(t, SPACE_MMIO, run->mmio.phys_addr, run->mmio.len, !run->mmio.is_write,
                           run->mmio.data);
    return 0;
}

/*
 * KVM_RUN until an exit this table does not answer: 0 with that exit in kvm_run, or -errno
 * of the KVM_RUN that failed (EINTR for a kick: immediate_exit set by Python, or its signal).
 * `*handled` is how many exits were answered here. Re-entering after filling the data is how
 * KVM completes the I/O on every host: an `in` (RIP on it) and, on mainline, an `out` (RIP
 * on it too, skipped at the next KVM_RUN) finish there; on kvm_pvm an `out` is already past.
 * A kick's immediate_exit makes that KVM_RUN complete the pending I/O and return EINTR,
 * which is what Python sees after an exit it answered itself.
 * `entry_copy` (or NULL): kvm_run's sync registers are copied there before every KVM_RUN
 * (Vcpu.keep_entry_state, for hosts that reset the vCPU on a triple fault).
 */
int fastexit_run(int vcpu_fd, void *run_area, const struct fastexit_table *t, uint64_t *handled,
                 void *entry_copy)
{
    struct kvm_run *run = run_area;
    uint64_t n = 0;
    for (;;) {
        if (entry_copy)
            memcpy(entry_copy, &run->s.regs, sizeof(struct kvm_sync_regs));
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            int err = errno;
            *handled = n;
            return -err;
        }
        if (!handle(t, run))
            break;
        n++;
    }
    *handled = n;
    return 0;
}

/*
 * The plane switches of one vCPU whose planes are separate KVM vCPUs (the soft-switch
 * backends), for a policy whose VtlCall and VtlReturn move no state and need no look at other
 * planes' LAPICs (pykvmm/vmm/vtl.py's vmpl): such a switch is a check of the caller's
 * registers, a push or pop of the suspended stack, the EntryReason store, and the next
 * KVM_RUN on the other plane's fd. Python fills this struct and reads back what changed
 * (pykvmm/fastexit.py, FastSwitch); anything else returns to Python as a plain KVM_RUN would.
 */

struct fastexit_planes {
    int32_t fd[FASTEXIT_PLANES];            /* each plane's KVM vCPU; -1: none */
    void *run[FASTEXIT_PLANES];             /* its kvm_run */
    void *entry_copy[FASTEXIT_PLANES];      /* as fastexit_run's entry_copy, per plane */
    uint32_t *entry_reason[FASTEXIT_PLANES];/* EntryReason of its control page (host address) */
    uint64_t exits[FASTEXIT_PLANES];        /* switch exits answered here, per plane (Python folds) */
    uint64_t switches[FASTEXIT_PLANES][FASTEXIT_PLANES];    /* [from][to], Python folds */
    uint64_t calls, returns;                /* VtlCalls and VtlReturns answered here */
    uint32_t above[FASTEXIT_PLANES];        /* the planes a VtlCall from p may enter (lowest wins) */
    uint32_t plane;                         /* in: the plane to run; out: the one whose exit returns */
    uint32_t depth;                         /* the suspended stack, bottom first */
    uint8_t stack[FASTEXIT_PLANES];
    uint32_t entered;                       /* planes entered here (Python folds and clears) */
    uint32_t port;                          /* the hypercall port */
};

/* The plane a well-formed VtlCall/VtlReturn at this exit of plane `p` switches to, -1 for
 * Python (anything else, malformed calls included: they become #UD there). */
static int switch_target(struct fastexit_planes *s, struct kvm_run *run, uint32_t p)
{
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
        run->io.port != s->port || run->io.count != 1)
        return -1;
    if ((run->kvm_valid_regs & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)) !=
        (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS))
        return -1;
    struct kvm_regs *regs = &run->s.regs.regs;
    if (run->s.regs.sregs.cs.dpl != 0)
        return -1;
    if (regs->rcx == HVCALL_VTL_CALL && regs->rax == 0) {
        uint32_t above = s->above[p];
        if (!above || s->depth >= FASTEXIT_PLANES)
            return -1;
        int target = __builtin_ctz(above);
        if (s->fd[target] < 0)
            return -1;
        s->stack[s->depth++] = (uint8_t)p;
        if (s->entry_reason[target])
            __atomic_store_n(s->entry_reason[target], ENTRY_VTL_CALL, __ATOMIC_RELAXED);
        s->calls++;
        return target;
    }
    if (regs->rcx == HVCALL_VTL_RETURN && (regs->rax & ~1ull) == 0 && p != 0 && s->depth &&
        s->stack[s->depth - 1] < p && s->fd[s->stack[s->depth - 1]] >= 0) {
        s->returns++;
        return s->stack[--s->depth];
    }
    return -1;
}

/*
 * As fastexit_run, for plane s->plane of a vCPU, switching planes for the calls
 * switch_target answers. Returns 0 with the exit in plane s->plane's kvm_run, or -errno of
 * the KVM_RUN that failed (EINTR for a kick: Python sets immediate_exit in every plane's
 * kvm_run while this runs, so a kick between two KVM_RUNs is not lost). No device table:
 * with more than one plane every other exit is Python's (pykvmm/vmm/machine.py says why).
 */
int fastexit_run_planes(struct fastexit_planes *s)
{
    uint32_t p = s->plane;
    for (;;) {
        struct kvm_run *run = s->run[p];
        s->entered |= 1u << p;
        if (s->entry_copy[p])
            memcpy(s->entry_copy[p], &run->s.regs, sizeof(struct kvm_sync_regs));
        if (ioctl(s->fd[p], KVM_RUN, 0) < 0) {
            int err = errno;
            s->plane = p;
            return -err;
        }
        int target = switch_target(s, run, p);
        if (target < 0)
            break;
        s->exits[p]++;
        s->switches[p][target]++;
        p = (uint32_t)target;
    }
    s->plane = p;
    return 0;
}
