/*
 * vsm_tlb (2 vCPUs, 2 VTLs, --hyperv, pykvmm boot): VTL1 locks VTL0's TLB on its VP
 * (HvRegisterVsmVpSecureVtlConfigVtl0.TlbLocked) and VTL0's address-space flushes aimed at
 * that VP are held back until the lock is lifted: by clearing the bit, then by a VtlReturn.
 *   VP1/VTL1 (VtlCall CMD_LOCK): 0x11 SetVpRegisters(TlbLocked) status (SUCCESS | 1 rep);
 *     0x12 the register read back (2); publishes locked = 1 and waits until VP0 started its
 *     flush; 40 exits later 0x13 flush_done (0: VP0's flush has not completed); clears the
 *     bit: 0x14 status; waits for flush_done = 1. Locks again, locked = 2, waits for VP0's
 *     second flush (FlushVirtualAddressListEx); 200 ms of reference time later (long enough that pykvmm
 *     returned the call to the guest to re-issue it) 0x15 flush_done (still 1), then returns
 *     to VTL0 (fast), which releases the lock.
 *   VP1/VTL0: 0x02 flush_done once it is 2; VtlCall CMD_READ: 0x16 TlbLocked read back (0:
 *     the return released it).
 *   VP0/VTL0, once VP1 locked: 0x01 a flush of its own VP (SUCCESS: not held); VtlCall
 *     CMD_FLUSH: VP0/VTL1 flushes VP1 (0x21 SUCCESS: VTL1's TLB is not locked); then
 *     FlushVirtualAddressSpace of VP1 from VTL0: 0x03 its status once it completed (SUCCESS);
 *     once VP1 locked again, FlushVirtualAddressListEx of VP1 (an HV_VP_SET, 1 rep): 0x04
 *     (SUCCESS | 1 rep).
 * DONE on both.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set CMD_LOCK, 0x7101
.set CMD_READ, 0x7102
.set CMD_FLUSH, 0x7103
.set HELD_EXITS, 40
.set HELD_LONG, 2000000                 /* 200 ms */

/* FLUSH control, mask: rax = status of a memory-form flush of every address space of the VPs
 * in `mask` (FlushVirtualAddressSpace, or a list call with one GVA range element). */
.macro FLUSH control:req, mask:req
    mov rdi, \control
    mov rsi, \mask
    call flush
.endm

.text
.globl main
main:
    VTL_MAIN_DISPATCH 2
    VSM_VTL_INIT
    call vtl_call                       /* VTL1 sets itself up */
    cmp qword ptr gs:[PCPU_VCPU], 0
    je vp0

    /* VP1/VTL0 */
    mov rbx, CMD_LOCK
    call vtl_call
    WAIT_EQ flush_done, 2
    GUEST_SYNC 0x02, [rip + flush_done]
    mov rbx, CMD_READ
    call vtl_call
    jmp .Ldone

vp0:
    WAIT_EQ locked, 1
    FLUSH HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, 1
    GUEST_SYNC 0x01, rax
    mov rbx, CMD_FLUSH
    call vtl_call
    mov qword ptr [rip + flush_started], 1
    FLUSH HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, 2
    mov qword ptr [rip + flush_done], 1
    GUEST_SYNC 0x03, rax
    WAIT_EQ locked, 2
    mov qword ptr [rip + flush_started], 2
    call flush_list_ex                  /* VP1, as an HV_VP_SET */
    mov qword ptr [rip + flush_done], 2
    GUEST_SYNC 0x04, rax
.Ldone:
    GUEST_DONE

/* flush(rdi = control, rsi = processor mask) -> rax = status; every other register kept */
flush:
    push rdx
    push rsi
    push rbx
    mov rbx, rsi
    call vsm_buffer
    mov qword ptr [rax], 0
    mov qword ptr [rax + 8], HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES
    mov [rax + 16], rbx
    mov qword ptr [rax + 24], 0x200     /* the list call's element: GVA page 0x200 */
    mov rsi, rax
    xor edx, edx
    call hv_call
    pop rbx
    pop rsi
    pop rdx
    ret

/* flush_list_ex -> rax = status of HvCallFlushVirtualAddressListEx of every address space of
 * VP1 (HV_VP_SET: sparse format, bank 0 = bit 1, the variable header) with one GVA element */
flush_list_ex:
    push rdx
    push rsi
    push rdi
    call vsm_buffer
    mov qword ptr [rax], 0
    mov qword ptr [rax + 8], HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES
    mov qword ptr [rax + 16], HV_GENERIC_SET_SPARSE_4K
    mov qword ptr [rax + 24], 1         /* ValidBankMask: bank 0 */
    mov qword ptr [rax + 32], 1 << 1    /* bank 0: VP1 */
    mov qword ptr [rax + 40], 0x200     /* the element: GVA page 0x200 */
    mov rsi, rax
    mov rdi, HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX | 1 << HV_CONTROL_VARHEAD_SHIFT | 1 << HV_CONTROL_REP_COUNT_SHIFT
    xor edx, edx
    call hv_call
    pop rdi
    pop rsi
    pop rdx
    ret

/* held_long: wait HELD_LONG of reference time (100 ns units), longer than pykvmm holds a
 * call before the VP re-issues it (vsm/tlb.py SUSPEND_SLICE) */
held_long:
    push rax
    push rcx
    push rdx
    push rbx
    mov ecx, HV_MSR_TIME_REF_COUNT
    rdmsr
    shl rdx, 32
    or rax, rdx
    lea rbx, [rax + HELD_LONG]
1:  pause
    mov ecx, HV_MSR_TIME_REF_COUNT
    rdmsr
    shl rdx, 32
    or rax, rdx
    cmp rax, rbx
    jb 1b
    pop rbx
    pop rdx
    pop rcx
    pop rax
    ret

/* held: HELD_EXITS port exits, time for a flush that is not held back to complete */
held:
    push rcx
    mov ecx, HELD_EXITS
1:  out PORT_NULL, al
    dec ecx
    jnz 1b
    pop rcx
    ret

/* set_lock(rsi = TlbLocked value) -> rax = SetVpRegisters status */
set_lock:
    push rdi
    push rdx
    mov edi, HV_REG_VSM_VP_SECURE_CONFIG_VTL0
    xor edx, edx
    call vsm_set_register
    pop rdx
    pop rdi
    ret

vtl1_main:
    VSM_VTL_INIT
    lea rdi, [rip + vtl1_call]
    jmp vtl_serve

vtl1_call:
    cmp rbx, CMD_LOCK
    je vtl1_lock
    cmp rbx, CMD_READ
    je vtl1_read
    FLUSH HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, 2     /* CMD_FLUSH, from VP0's VTL1 */
    GUEST_SYNC 0x21, rax
    clc
    ret

vtl1_lock:
    mov esi, HV_SECURE_CONFIG_TLB_LOCKED
    call set_lock
    GUEST_SYNC 0x11, rax
    mov edi, HV_REG_VSM_VP_SECURE_CONFIG_VTL0
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x12, rdx
    mov qword ptr [rip + locked], 1
    WAIT_EQ flush_started, 1
    call held
    GUEST_SYNC 0x13, [rip + flush_done]
    xor esi, esi
    call set_lock                       /* lift the lock */
    GUEST_SYNC 0x14, rax
    WAIT_EQ flush_done, 1
    mov esi, HV_SECURE_CONFIG_TLB_LOCKED
    call set_lock
    GUEST_ASSERT_EQ rax, 1 << 32, "second lock"
    mov qword ptr [rip + locked], 2
    WAIT_EQ flush_started, 2
    call held_long
    GUEST_SYNC 0x15, [rip + flush_done]
    clc                                 /* return to VTL0: the lock goes with it */
    ret

vtl1_read:
    mov edi, HV_REG_VSM_VP_SECURE_CONFIG_VTL0
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x16, rdx
    clc
    ret

.data
locked: .quad 0
flush_started: .quad 0
flush_done: .quad 0
