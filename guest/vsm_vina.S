/*
 * vsm_vina (1 vCPU, 2 VTLs, --hyperv, pykvmm boot): VINA. VTL1 enables HvRegisterVsmVina
 * (vector 0x60, AutoReset) and, while it runs with interrupts on, sends VTL0 (a lower VTL: allowed)
 * a synthetic IPI 0x41. VTL0's interrupt cannot preempt VTL1; instead VTL1 gets its VINA
 * vector once and sees VinaAsserted set in its VTL control area; when VTL1 returns (AutoReset
 * clears VinaAsserted) VTL0 takes 0x41.
 * Reports: SYNC 0x11 SetVpRegisters(VsmVina) status (SUCCESS | 1 rep); 0x12 VINA interrupts
 * VTL1 took (1); 0x13 VinaAsserted in VTL1's control area (1); 0x14 VsmVina read back
 * (0x360); 0x15 a VsmVina with a reserved bit -> INVALID_PARAMETER;
 * VTL0: SYNC 1 its 0x41 count (1); VtlCall again: 0x16 VinaAsserted after the AutoReset (0). DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set VINA_VECTOR, 0x60
.set VTL0_VECTOR, 0x41
.set CMD_VINA, 0x71
.set CMD_CHECK, 0x72

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    VSM_VTL_INIT
    SET_HANDLER VTL0_VECTOR, vtl0_handler
    call apic_enable
    call vtl_call                       /* VTL1 sets itself up */
    sti
    mov rbx, CMD_VINA
    call vtl_call
    lea rdi, [rip + vtl0_count]
    mov esi, 1
    call pause_until_eq
    GUEST_SYNC 1, [rip + vtl0_count]
    mov rbx, CMD_CHECK
    call vtl_call
.Ldone:
    GUEST_DONE

vtl0_handler:
    inc qword ptr [rip + vtl0_count]
    call apic_eoi
    iretq

vtl1_main:
    VSM_VTL_INIT
    SET_HANDLER VINA_VECTOR, vina_handler
    call apic_enable
    sti
    lea rdi, [rip + vtl1_call]
    jmp vtl_serve

vtl1_call:
    cmp rbx, CMD_VINA
    jne 2f
    mov edi, HV_REG_VSM_VINA
    mov esi, VINA_VECTOR | HV_VINA_ENABLED | HV_VINA_AUTO_RESET
    xor edx, edx
    call vsm_set_register
    GUEST_SYNC 0x11, rax
    mov edi, VTL0_VECTOR
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, 0, "SendSyntheticClusterIpi to VTL0"
    lea rdi, [rip + vina_count]
    mov esi, 1
    call pause_until_eq
    GUEST_SYNC 0x12, [rip + vina_count]
    mov rax, gs:[PCPU_CONTROL_PAGE]
    movzx eax, byte ptr [rax + VTL_VINA_STATUS]
    GUEST_SYNC 0x13, rax
    mov edi, HV_REG_VSM_VINA
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x14, rdx
    mov edi, HV_REG_VSM_VINA
    mov esi, 1 << 20
    xor edx, edx
    call vsm_set_register
    GUEST_SYNC 0x15, rax
    clc
    ret
2:  mov rax, gs:[PCPU_CONTROL_PAGE]
    movzx eax, byte ptr [rax + VTL_VINA_STATUS]
    GUEST_SYNC 0x16, rax
    clc
    ret

vina_handler:
    inc qword ptr [rip + vina_count]
    call apic_eoi
    iretq

.data
vtl0_count: .quad 0
vina_count: .quad 0
