"""``system/orchestrate``: playbooks, their sandboxed expressions, and (later) the plug-in that drives them.

Only the playbook format lives here so far: :mod:`.playbook` loads and
validates a playbook into frozen Structs, :mod:`.expressions` is the
expression language of ``when`` guards, ``loop.over`` and arg templates.
"""
