"""Small Python tools for the example playbooks and the tests (``kind: python``, ``call: examples.tools.<module>:<function>``)."""
