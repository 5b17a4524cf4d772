"""The fold (events -> projection, a pure function), projection cache, Feather snapshots, bounded replay."""
