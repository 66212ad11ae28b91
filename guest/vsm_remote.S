/*
 * vsm_remote (2 vCPUs, 2 VTLs, --hyperv, pykvmm boot): HvCallGetVpRegisters,
 * HvCallSetVpRegisters and HvCallTranslateVirtualAddress aimed at another VP.
 * VP1/VTL0 sets its LSTAR (a register private to each VTL) to VP1_LSTAR and parks in its
 * VTL1 (VtlCall CMD_PARK: VTL1 spins until `released`). Then VP0:
 *   VTL0: 0x01 GetVpRegisters(VP1, VTL0, LSTAR) status (SUCCESS | 1 rep), 0x03 the value
 *     (VP1_LSTAR); 0x04 the same for VP1's VTL1 (ACCESS_DENIED: a higher VTL, on any VP);
 *     0x05 VP 5 (INVALID_VP_INDEX).
 *   VTL1 (VtlCall CMD_REMOTE): 0x11 GetVpRegisters(VP1, VTL0, LSTAR) status, 0x12 the value;
 *     0x13 SetVpRegisters(VP1, VTL0, LSTAR = NEW_LSTAR) status; 0x14 VP1's VTL1 LSTAR
 *     (INVALID_VP_STATE: VP1 runs VTL1); 0x15 VP1's RBX, a shared register (INVALID_VP_STATE);
 *     0x16 TranslateVirtualAddress(VP1, VTL0, `parked`) status (SUCCESS), 0x17 GPA page -
 *     `parked`'s page (0); 0x18 VP1's VsmVpStatus (0x301: VTL1 active, VTL0 and 1 enabled);
 *     then releases VP1.
 *   VTL0, once VP1 is back in its VTL0 (spinning): 0x06 GetVpRegisters(VP1, VTL0, LSTAR)
 *     (INVALID_VP_STATE: VP1 runs VTL0).
 * VP1/VTL0 after its VtlCall: 0x02 its LSTAR (NEW_LSTAR: set from VP0). DONE on both.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set VP1_LSTAR, 0x11110000
.set NEW_LSTAR, 0x22220000
.set CMD_PARK, 0x7201
.set CMD_REMOTE, 0x7202
.set TO_VTL0, HV_INPUT_VTL_USE_TARGET | 0
.set TO_VTL1, HV_INPUT_VTL_USE_TARGET | 1

/* GET_VP name, input_vtl, vp: rax = status, rdx = value (vsm_get_vp_register) */
.macro GET_VP name:req, input_vtl:req, vp:req
    mov edi, \name
    mov esi, \input_vtl
    mov edx, \vp
    call vsm_get_vp_register
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
    mov ecx, MSR_LSTAR
    mov eax, VP1_LSTAR
    xor edx, edx
    wrmsr
    mov rbx, CMD_PARK
    call vtl_call
    mov ecx, MSR_LSTAR
    rdmsr
    GUEST_SYNC 0x02, rax
    mov qword ptr [rip + in_vtl0], 1
    WAIT_EQ checked, 1
    jmp .Ldone

vp0:
    WAIT_EQ parked, 1
    GET_VP HV_REG_LSTAR, TO_VTL0, 1
    GUEST_SYNC 0x01, rax
    GUEST_SYNC 0x03, rdx
    GET_VP HV_REG_LSTAR, TO_VTL1, 1
    GUEST_SYNC 0x04, rax
    GET_VP HV_REG_LSTAR, TO_VTL0, 5
    GUEST_SYNC 0x05, rax
    mov rbx, CMD_REMOTE
    call vtl_call
    WAIT_EQ in_vtl0, 1
    GET_VP HV_REG_LSTAR, TO_VTL0, 1
    GUEST_SYNC 0x06, rax
    mov qword ptr [rip + checked], 1
.Ldone:
    GUEST_DONE

vtl1_main:
    VSM_VTL_INIT
    lea rdi, [rip + vtl1_call]
    jmp vtl_serve

vtl1_call:
    cmp rbx, CMD_PARK
    jne vtl1_remote
    mov qword ptr [rip + parked], 1
    WAIT_EQ released, 1
    clc
    ret

vtl1_remote:
    GET_VP HV_REG_LSTAR, TO_VTL0, 1
    GUEST_SYNC 0x11, rax
    GUEST_SYNC 0x12, rdx
    mov edi, HV_REG_LSTAR
    mov esi, NEW_LSTAR
    mov edx, TO_VTL0
    mov ecx, 1
    call vsm_set_vp_register
    GUEST_SYNC 0x13, rax
    GET_VP HV_REG_LSTAR, 0, 1
    GUEST_SYNC 0x14, rax
    GET_VP HV_REG_RBX, TO_VTL0, 1
    GUEST_SYNC 0x15, rax
    lea rdi, [rip + parked]
    mov rsi, HV_TRANSLATE_VALIDATE_READ | TO_VTL0 << 56
    mov edx, 1
    call vsm_translate_vp
    GUEST_SYNC 0x16, rax
    lea rax, [rip + parked]
    shr rax, 12
    sub rcx, rax
    GUEST_SYNC 0x17, rcx
    GET_VP HV_REG_VSM_VP_STATUS, TO_VTL0, 1
    GUEST_SYNC 0x18, rdx
    mov qword ptr [rip + released], 1
    clc
    ret

.data
parked: .quad 0
released: .quad 0
in_vtl0: .quad 0
checked: .quad 0
