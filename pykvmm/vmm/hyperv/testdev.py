"""QEMU's ``hyperv-testdev`` as the kvm-unit-tests drive it: a 32-bit write to port 0x3000
of ``conn_id << 24 | op << 16 | vp_index << 8 | sint``. Ops: 1 create a SINT route to
(vp_index, sint), 2 destroy it, 3 assert the route's SINT, 4/5 create/destroy a message
connection (conn_id -> the route), 6/7 create/destroy an event connection (flag = conn_id).
Routes and ports target the VTL (plane) of the vCPU that wrote the command. Commands for
VPs that do not exist, or on routes never created, are ignored with a warning, as QEMU
ignores them with an error report."""

from __future__ import annotations

from .messaging import EVENT_PORT, MESSAGE_PORT, Port

PORT = 0x3000
SINT_ROUTE_CREATE, SINT_ROUTE_DESTROY, SINT_ROUTE_SET_SINT = 1, 2, 3
MSG_CONN_CREATE, MSG_CONN_DESTROY, EVT_CONN_CREATE, EVT_CONN_DESTROY = 4, 5, 6, 7


class TestDev:
    def __init__(self, hv):
        self.hv = hv
        self.routes: set[tuple[int, int, int]] = set()

    def on_write(self, t, ex) -> None:
        if ex.size != 4:
            self.hv.machine.warn(f"hyperv-testdev: {ex.size}-byte write ignored (it takes 32-bit writes)")
            return
        value = int.from_bytes(ex.data[:4], "little")
        conn, op, vp, sint = value >> 24, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF
        hv = self.hv
        plane = t.plane
        with hv.lock:
            if op in (MSG_CONN_DESTROY, EVT_CONN_DESTROY):
                hv.messaging.disconnect(conn)
                return
            if vp >= hv.machine.config.vcpus or sint >= 16:
                hv.machine.warn(f"hyperv-testdev: command {value:#x} names VP {vp} / SINT {sint}, which do not exist")
                return
            route = (vp, plane, sint)
            if op == SINT_ROUTE_CREATE:
                self.routes.add(route)
            elif op == SINT_ROUTE_DESTROY:
                self.routes.discard(route)
            elif op == SINT_ROUTE_SET_SINT:
                if route not in self.routes:
                    hv.machine.warn(f"hyperv-testdev: SET_SINT on VP {vp} SINT {sint} without a route")
                    return
                hv.synic.assert_sint(hv.vp(vp, plane), sint)
            elif op == MSG_CONN_CREATE:
                self.routes.add(route)
                hv.messaging.connect(conn, Port(MESSAGE_PORT, vp, plane, sint))
            elif op == EVT_CONN_CREATE:
                self.routes.add(route)
                hv.messaging.connect(conn, Port(EVENT_PORT, vp, plane, sint, flag_base=conn))
            else:
                hv.machine.warn(f"hyperv-testdev: unknown command {op}")


def install(hv) -> None:
    hv.testdev = TestDev(hv)
