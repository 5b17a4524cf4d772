"""nats-server nodes and clusters: the binary, its configs, the embedded server, the local cluster, replicas, placement."""
