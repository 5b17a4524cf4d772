"""The edge's routes, one small module per area."""
