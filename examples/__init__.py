"""Runnable examples: playbooks (``examples/playbooks``) and the Python tools they call (``examples.tools``).

``examples`` is not part of the installed distribution. A data worker imports
``examples.tools.*`` when the repository root is on its import path: run it
with ``PYTHONPATH=<repo root>`` (or from the repo root with ``python -m``),
and let the operator policy allow the prefix: ``NOETL_PYTHON_ALLOW=examples.tools.``.
"""
