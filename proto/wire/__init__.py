"""The wire: the gRPC contract's shared names (`contract`), the codec between `Sample`s and its
messages (`codec`), and a node aggregator's form of them (`node`). Both the agent and the
collector import it; it imports neither."""
