/*
 * util.S: cross-vCPU helpers (all vCPUs and planes share .data/.bss).
 * All functions preserve every register except RFLAGS.
 */
.include "guest.inc"

.text

/* pause_until_eq(rdi = address of a u64, rsi = value): spin (pause) until *rdi == rsi. */
.globl pause_until_eq
.type pause_until_eq, @function
pause_until_eq:
1:  cmp [rdi], rsi
    je 2f
    pause
    jmp 1b
2:  ret
.size pause_until_eq, . - pause_until_eq

/* atomic_inc(rdi = address of a u64): lock inc. */
.globl atomic_inc
.type atomic_inc, @function
atomic_inc:
    lock inc qword ptr [rdi]
    ret
.size atomic_inc, . - atomic_inc

/* spin_lock(rdi = address of a u64 lock, 0 = free). Not interrupt- or plane-switch-safe:
 * do not take a lock that the code you could be interrupted or switched to also takes. */
.globl spin_lock
.type spin_lock, @function
spin_lock:
    push rax
1:  mov eax, 1
    xchg [rdi], rax
    test rax, rax
    jz 3f
2:  pause
    cmp qword ptr [rdi], 0
    jne 2b
    jmp 1b
3:  pop rax
    ret
.size spin_lock, . - spin_lock

/* spin_unlock(rdi = address of the lock). */
.globl spin_unlock
.type spin_unlock, @function
spin_unlock:
    mov qword ptr [rdi], 0
    ret
.size spin_unlock, . - spin_unlock
