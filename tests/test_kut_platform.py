"""The PC platform a multiboot guest finds, checked on the real /dev/kvm from the host side:
how the in-kernel interrupt controllers are wired (KVM_GET_IRQCHIP after KVM_IRQ_LINE)."""

import pytest

from pykvmm.uapi import constants as C
from pykvmm.vmm.machine import Machine, MachineConfig

from conftest import guest_image


def test_isa_irq0_reaches_ioapic_pin_2_as_the_madt_says(kvm_available):
    # QEMU's routing: GSI 0 (the PIT's line) -> PIC master pin 0 and IOAPIC pin 2, GSI 2 -> nowhere.
    # Every IOAPIC pin is masked at reset, so an asserted pin stays in the IOAPIC's IRR.
    with Machine(guest_image("hello"), MachineConfig(quiet=True)) as m:
        vm = m.platform.vm
        vm.irq_line(0, 1)
        vm.irq_line(2, 1)
        assert vm.get_irqchip(C.KVM_IRQCHIP_IOAPIC).chip.ioapic.irr == 1 << 2
        assert vm.get_irqchip(C.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr == 1 << 0
        vm.irq_line(14, 1)                    # the slave 8259's pin 6, cascaded into master pin 2
        assert vm.get_irqchip(C.KVM_IRQCHIP_IOAPIC).chip.ioapic.irr == 1 << 2 | 1 << 14
        assert vm.get_irqchip(C.KVM_IRQCHIP_PIC_SLAVE).chip.pic.irr == 1 << 6
        assert vm.get_irqchip(C.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr == 1 << 0 | 1 << 2


@pytest.mark.parametrize("pit", [True, False])
def test_the_in_kernel_pit_exists_unless_turned_off(kvm_available, pit):
    # KVM_CREATE_PIT2 answers EEXIST when the VM has a PIT already (`-machine pit=off`: none).
    import errno
    from pykvmm.kvm import KvmError

    with Machine(guest_image("hello"), MachineConfig(quiet=True, pit=pit)) as m:
        if pit:
            with pytest.raises(KvmError) as e:
                m.platform.vm.create_pit2()
            assert e.value.errno == errno.EEXIST
        else:
            m.platform.vm.create_pit2()
