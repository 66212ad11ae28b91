"""C declarations of every KVM struct pykvmm uses (x86-64), for cffi's ABI mode.

Mainline layouts follow <linux/kvm.h> and <asm/kvm.h>; tests/test_uapi_layout.py compiles a
probe against the system headers and checks every size and offset declared here.
RFC additions are marked: they live in mainline padding (kvm_run.plane...) or in union
members mainline does not have (plane_event), so one declaration serves every ABI profile.
"""

MAINLINE_CDEF = r"""
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
typedef int32_t __s32; typedef int64_t __s64;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8  type;
    __u8  present, dpl, db, s, l, g, avl;
    __u8  unusable;
    __u8  padding;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    __u16 padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};

struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 flags;
    __u64 pdptrs[4];
};

struct kvm_fpu {
    __u8  fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8  ftwx;
    __u8  pad1;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8  xmm[16][16];
    __u32 mxcsr;
    __u32 pad2;
};

struct kvm_xsave {
    __u32 region[1024];
};

struct kvm_xcr {
    __u32 xcr;
    __u32 reserved;
    __u64 value;
};

struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[16];
    __u64 padding[16];
};

struct kvm_debugregs {
    __u64 db[4];
    __u64 dr6;
    __u64 dr7;
    __u64 flags;
    __u64 reserved[9];
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_msr_entry {
    __u32 index;
    __u32 reserved;
    __u64 data;
};

struct kvm_msrs {
    __u32 nmsrs;
    __u32 pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    __u32 padding[3];
};

struct kvm_cpuid2 {
    __u32 nent;
    __u32 padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_device_attr {
    __u32 flags;
    __u32 group;
    __u64 attr;
    __u64 addr;
};

struct kvm_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    __u32 flags;
    __u32 devid;
    __u8  pad[12];
};

struct kvm_irq_routing_irqchip {
    __u32 irqchip;
    __u32 pin;
};

struct kvm_irq_routing_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    __u32 devid;
};

struct kvm_irq_routing_entry {
    __u32 gsi;
    __u32 type;
    __u32 flags;
    __u32 pad;          /* svsm-6.17 planes branch: "plane" */
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        __u32 pad[8];
    } u;
};

struct kvm_irq_routing {
    __u32 nr;
    __u32 flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_pic_state {
    __u8 last_irr;
    __u8 irr;
    __u8 imr;
    __u8 isr;
    __u8 priority_add;
    __u8 irq_base;
    __u8 read_reg_select;
    __u8 poll;
    __u8 special_mask;
    __u8 init_state;
    __u8 auto_eoi;
    __u8 rotate_on_auto_eoi;
    __u8 special_fully_nested_mode;
    __u8 init4;
    __u8 elcr;
    __u8 elcr_mask;
};

struct kvm_ioapic_state {
    __u64 base_address;
    __u32 ioregsel;
    __u32 id;
    __u32 irr;
    __u32 pad;
    union {
        __u64 bits;     /* the header's bitfield view ("fields") is left out: read the bits */
    } redirtbl[24];
};

struct kvm_irqchip {
    __u32 chip_id;
    __u32 pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        struct kvm_ioapic_state ioapic;
    } chip;
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    __u8 pad[36];
};

struct kvm_pit_config {
    __u32 flags;
    __u32 pad[15];
};

struct kvm_irq_level {
    __u32 irq;
    __u32 level;
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    __u8  pad[64];
};

struct kvm_guest_debug_arch {
    __u64 debugreg[8];
};

struct kvm_guest_debug {
    __u32 control;
    __u32 pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_debug_exit_arch {
    __u32 exception;
    __u32 pad;
    __u64 pc;
    __u64 dr6;
    __u64 dr7;
};

struct kvm_vcpu_events {
    struct {
        __u8 injected;
        __u8 nr;
        __u8 has_error_code;
        __u8 pending;
        __u32 error_code;
    } exception;
    struct {
        __u8 injected;
        __u8 nr;
        __u8 soft;
        __u8 shadow;
    } interrupt;
    struct {
        __u8 injected;
        __u8 pending;
        __u8 masked;
        __u8 pad;
    } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct {
        __u8 smm;
        __u8 pending;
        __u8 smm_inside_nmi;
        __u8 latched_init;
    } smi;
    struct {
        __u8 pending;
    } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};

struct kvm_mp_state {
    __u32 mp_state;
};

struct kvm_interrupt {
    __u32 irq;
};

struct kvm_translation {
    __u64 linear_address;
    __u64 physical_address;
    __u8  valid;
    __u8  writeable;
    __u8  usermode;
    __u8  pad[5];
};

struct kvm_msr_filter_range {
    __u32 flags;
    __u32 nmsrs;
    __u32 base;
    __u8 *bitmap;
};

struct kvm_msr_filter {
    __u32 flags;
    struct kvm_msr_filter_range ranges[16];
};

struct kvm_sync_regs {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
};

/* KVM_EXIT_PLANE_EVENT payload, April 2025 planes RFC (and the svsm-6.17 branch) */
struct kvm_plane_event_exit {
    __u16 cause;
    __u16 pending_event_planes;
    __u16 target;
    __u16 padding;
    __u32 flags;
    __u64 extra[8];
};

/* KVM_EXIT_PLANE_EVENT payload, June 2026 planes v1 (Roedel/Bonzini) */
struct kvm_plane_event_exit_v1 {
    __u32 cause;
    __u32 plane;
    __u64 extra[8];
};

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u8 plane;                 /* planes RFC; mainline: padding1[0] */
    __u8 padding1;              /* the RFC's 1-byte hole */
    __u16 suspended_planes;     /* planes RFC */
    __u16 req_exit_planes;      /* planes RFC */

    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;

    __u64 cr8;
    __u64 apic_base;

    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u64 nr; __u64 args[6]; __u64 ret; __u32 longmode; __u32 pad; } hypercall;
        struct { __u64 rip; __u32 is_write; __u32 pad; } tpr_access;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 suberror; __u32 ndata; __u64 flags; __u8 insn_size; __u8 insn_bytes[15]; } emulation_failure;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        struct { __u8 vector; } eoi;
        struct { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; } msr;
        struct { __u32 flags; } notify;
        struct { __u64 flags; __u64 gpa; __u64 size; } memory_fault;
        struct kvm_plane_event_exit plane_event;
        struct kvm_plane_event_exit_v1 plane_event_v1;
        char padding[256];
    };

    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    union {
        struct kvm_sync_regs regs;
        char padding[2048];
    } s;
};

/* APIC-ID-groups RFC (Amazon VSM, Nov 2023) */
struct kvm_apic_id_groups {
    __u8 n_bits;
};
"""

LIBC_CDEF = r"""
int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
"""
