/*
 * pykvmm's exit fast path: KVM_RUN in a loop that answers, without returning to Python, the
 * exits whose answer is pure and table-driven (pykvmm/fastexit.py says which and why).
 *
 * An exit to userspace costs ~8 us on the development host in any VMM; Python's exit path
 * adds 5-8 us more, C well under one. Python fills the table; this loop only reads it.
 * Everything it does not recognise returns to Python exactly as a plain KVM_RUN would, with
 * kvm_run holding that exit.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

#define FASTEXIT_RULES 8

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
