"""Tool kinds: each a driver registered under the ``noetl_edge.tools`` entry-point group (:mod:`.registry`)."""
