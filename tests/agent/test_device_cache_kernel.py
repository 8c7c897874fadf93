"""The probes' per-CPU caches (lt_filter_dev, lt_filter_net) keep a device's answer by the device's
address: a device created after its address was freed would inherit the answer (an untraced pod's eth0
taken for a host device where a host-side veth was). The agent makes every CPU forget them when the host
has a device it did not have (Agent.refresh_host_devices, at start and every interval), as it does when
the targets change."""

from __future__ import annotations


def want_generations(agent) -> set[int]:
    """The generation each CPU's caches are to hold (lt_cpu.want_gen)."""
    return {int(v.want_gen) for v in agent.tracer.table("lt_cpu").values()}


def test_a_new_host_device_makes_every_cpu_forget_its_device_answers(agent, lab):
    agent.refresh_host_devices()
    [before] = want_generations(agent)
    agent.refresh_host_devices()
    assert want_generations(agent) == {before}  # no new device: the caches keep their answers
    lab.add_pod("new")  # its veth's host side is a new device of the host
    agent.refresh_host_devices()
    [after] = want_generations(agent)
    assert after != before
    lab.remove_pod("new")  # a device gone leaves nothing to forget
    agent.refresh_host_devices()
    assert want_generations(agent) == {after}
