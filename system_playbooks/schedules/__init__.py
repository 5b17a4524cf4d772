"""Schedules: start a playbook at each tick of a cron expression (in a time zone) or an interval.

:mod:`.spec` is what a schedule is and its validation, :mod:`.ticks` when it
fires (pure functions: due ticks, catch-up, overlap, a tick's execution id),
:mod:`.store` where it lives (KV ``schedules``). The kernel's
:class:`system_playbooks.schedules.firer.ScheduleFirer` does the firing on the shards its
kernel holds. They live here, not in ``kernel/``, because they are policy
(like orchestrate's), and the edge and the CLI validate with the same code.
"""
